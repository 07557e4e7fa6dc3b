"""The ``ais`` CLI as a user types it, against a real cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import LocalCluster


def sh(cmd: str, env: dict[str, str], cwd: Path | None = None,
       input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60, input=input.decode() if input else None)


def test_seed_object_commands_verbatim(ais_env: dict[str, str], tmp_path: Path) -> None:
    r = sh("ais create bucket transform", ais_env)
    assert r.returncode == 0, r.stderr
    r = sh('echo "some text :)" | ais put - transform/shard.in', ais_env)
    assert r.returncode == 0, r.stderr
    r = sh("ais get transform/shard.in -", ais_env)
    assert r.stdout == "some text :)\n"

    (tmp_path / "raw-train.tar").write_bytes(b"tar bytes" * 1000)
    r = sh("ais create bucket ais://imagenet", ais_env)
    assert r.stdout.strip() == '"ais://imagenet" bucket created'
    r = sh("ais put raw-train.tar imagenet", ais_env, cwd=tmp_path)
    assert r.stdout.strip() == 'PUT "raw-train.tar" into bucket "imagenet"', r.stderr
    r = sh("ais put raw-train.tar imagenet/renamed.tar", ais_env, cwd=tmp_path)
    assert r.returncode == 0
    r = sh("ais get imagenet/renamed.tar out.tar", ais_env, cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "out.tar").read_bytes() == b"tar bytes" * 1000
    r = sh("ais ls imagenet", ais_env)
    assert "raw-train.tar" in r.stdout and "renamed.tar" in r.stdout
    r = sh("ais ls", ais_env)
    assert "ais://imagenet" in r.stdout.splitlines()


def test_removal_of_objects_and_buckets(ais_env: dict[str, str]) -> None:
    sh("ais create bucket gone", ais_env)
    sh("echo x | ais put - gone/a", ais_env)
    assert sh("ais object rm gone/a", ais_env).returncode == 0
    r = sh("ais get gone/a -", ais_env)
    assert r.returncode == 1 and "does not exist" in r.stderr
    sh("echo x | ais put - gone/b", ais_env)
    assert sh("ais bucket rm gone", ais_env).returncode == 0
    r = sh("ais ls gone", ais_env)
    assert r.returncode == 1 and "ais create bucket gone" in r.stderr


@pytest.mark.parametrize("cmd,fragment", [
    ("ais get nosuchbucket/x -", "bucket 'nosuchbucket' does not exist"),
    ("ais create bucket 'bad name'", "invalid bucket name"),
    ("ais put /no/such/file transform", "no such file"),
    ("echo x | ais put - transform", "needs an object name"),
    ("ais get s3://b/x -", "only 'ais://'"),
])
def test_failures_exit_nonzero_with_one_line(ais_env: dict[str, str], cmd: str,
                                             fragment: str) -> None:
    r = sh(cmd, ais_env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ais: ") and fragment in lines[0], r.stderr


def test_unreachable_cluster_says_so(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "AIS_ENDPOINT": "http://127.0.0.1:9"}
    r = sh("ais ls", env)
    assert r.returncode == 1 and "cannot reach" in r.stderr


def _commands(parser: object, prefix: list[str]) -> list[list[str]]:
    import argparse

    out = [prefix]
    for action in getattr(parser, "_actions", []):
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, [*prefix, name])
    return out


@pytest.mark.parametrize("prog", ["ais", "aisetl"])
def test_every_command_has_help(prog: str) -> None:
    if prog == "ais":
        from aisetl.cli import ais_etl  # noqa: F401
        from aisetl.cli.ais import build_parser
    else:
        from aisetl.cli.daemon import build_parser
    cmds = _commands(build_parser(), [])
    assert len(cmds) > 3
    for cmd in cmds:
        module = "aisetl.cli.ais" if prog == "ais" else "aisetl.cli.daemon"
        r = subprocess.run([sys.executable, "-m", module, *cmd, "--help"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (cmd, r.stderr)
        assert "usage:" in r.stdout and len(r.stdout) > 60, cmd


def test_cluster_map_through_cli(ais_env: dict[str, str], cluster: LocalCluster) -> None:
    r = sh("ais show cluster", ais_env)
    assert r.returncode == 0
    for t in cluster.smap():
        assert t["id"] in r.stdout and t["url"] in r.stdout
