"""``ais etl ...`` and ``ais wait xaction``: the ETL half of the CLI.

    ais etl build --from-file=code.py --runtime=python3 [--deps-file=deps.txt]
                  [--name ID] [--wait-timeout 2m] [--comm-type hpush://]
    ais etl init spec.yaml [--name ID]
    ais etl ls | ais etl show ID | ais etl logs ID [--target T]
    ais etl object ID BUCKET/OBJ OUT|-
    ais etl stop ID
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

from aisetl.cli import ais, ais_jobs
from aisetl.cli.client import ApiError, Client
from aisetl.model.errors import AisError


def _read(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise AisError(f"{what}: {path}: no such file")
    return p.read_text()


def cmd_build(c: Client, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "code": base64.b64encode(_read(a.from_file, "--from-file").encode()).decode(),
        "runtime": a.runtime,
        "dependencies": base64.b64encode(
            (_read(a.deps_file, "--deps-file") if a.deps_file else "").encode()).decode(),
        "encoding": "base64",
    }
    if a.name:
        body["id"] = a.name
    if a.wait_timeout:
        body["wait_timeout"] = a.wait_timeout
    if a.comm_type:
        body["communication_type"] = a.comm_type
    out = c.request("POST", "/v1/etl/build", body=__import__("json").dumps(body).encode(),
                    headers={"Content-Type": "application/json"}).read()
    print(out.decode().strip())
    return 0


def cmd_init(c: Client, a: argparse.Namespace) -> int:
    spec = _read(a.spec, "SPEC").encode()
    params = {"name": a.name} if a.name else None
    out = c.request("POST", "/v1/etl/init", body=spec, params=params,
                    headers={"Content-Type": "application/x-yaml"}).read()
    print(out.decode().strip())
    return 0


def cmd_ls(c: Client, a: argparse.Namespace) -> int:
    etls = c.json("GET", "/v1/etl/list")
    print(f"{'ID':<14} {'KIND':<6} {'RUNTIME':<8} {'COMM':<9} {'STATE':<13} NAME")
    for e in etls:
        print(f"{e.get('id', ''):<14} {e.get('kind', ''):<6} {e.get('runtime') or '-':<8} "
              f"{e.get('communication_type', ''):<9} {e.get('state', ''):<13} "
              f"{e.get('name', '')}")
    return 0


def cmd_show(c: Client, a: argparse.Namespace) -> int:
    st = c.json("GET", f"/v1/etl/{a.id}")
    print(f"ETL {st['id']} ({st['kind']}, {st['communication_type']}): {st['state']}")
    for tid, t in st["targets"].items():
        line = f"  {tid:<10} {t['state']:<13} restarts={t['restarts']}"
        print(line + (f"  {t['reason']}" if t.get("reason") else ""))
    return 0


def cmd_logs(c: Client, a: argparse.Namespace) -> int:
    params = {"tail": str(a.tail)}
    if a.target:
        params["target"] = a.target
    logs = c.json("GET", f"/v1/etl/logs/{a.id}", params=params)
    for tid, text in logs.items():
        print(f"== target {tid}")
        print(text.rstrip())
    return 0


def cmd_object(c: Client, a: argparse.Namespace) -> int:
    bucket, obj = ais._bucket_obj(a.src)
    resp = c.request("GET", f"/v1/objects/{bucket}/{obj}", params={"uuid": a.id})
    ais.stream_out(resp.iter_chunks(), a.dest)
    if a.dest == "-" and sys.stdout.isatty():
        print()
    return 0


def cmd_stop(c: Client, a: argparse.Namespace) -> int:
    for etl_id in a.ids:
        c.request("DELETE", f"/v1/etl/stop/{etl_id}").read()
    print("ETL containers stopped successfully.")
    return 0


def register(sub: Any) -> None:
    etl = sub.add_parser("etl", help="build, init, list, use and stop ETLs",
                         description="Extract-transform-load next to the data: transformers "
                         "run on every target and transform objects inline or per bucket.")
    esub = etl.add_subparsers(dest="what", required=True, metavar="COMMAND")

    b = esub.add_parser("build", help="start an ETL from a Python transform function",
                        description="Send code that defines transform(input_bytes) -> bytes; "
                        "every target runs it in the chosen runtime. Prints the ETL ID.")
    b.add_argument("--from-file", required=True, help="Python file that defines transform()")
    b.add_argument("--runtime", required=True, choices=["python3", "python2"],
                   help="runtime to run the code in")
    b.add_argument("--deps-file", help="requirements file (pip format) with dependencies")
    b.add_argument("--name", help="ETL ID to use instead of a generated one")
    b.add_argument("--wait-timeout", help="how long targets may take to get ready (e.g. 2m)")
    b.add_argument("--comm-type", choices=["hpush://", "hrev://", "hpull://"],
                   help="how targets talk to the transformer (default hpush://)")
    b.set_defaults(fn=cmd_build)

    i = esub.add_parser("init", help="start an ETL from a pod spec (any HTTP container)",
                        description="Send a pod spec YAML with one container and a "
                        "containerPort; annotations communication_type and wait_timeout "
                        "apply. Prints the ETL ID.")
    i.add_argument("spec", metavar="SPEC", help="pod spec YAML file")
    i.add_argument("--name", help="ETL ID to use instead of a generated one")
    i.set_defaults(fn=cmd_init)

    ls = esub.add_parser("ls", help="list ETLs", description="List ETLs and their states.")
    ls.set_defaults(fn=cmd_ls)

    sh = esub.add_parser("show", help="status of one ETL on every target",
                         description="Status of one ETL on every target (state, restarts, "
                         "reason).")
    sh.add_argument("id", metavar="ID")
    sh.set_defaults(fn=cmd_show)

    lg = esub.add_parser("logs", help="transformer logs", description="Print the last log "
                         "lines of the ETL's transformer on every target.")
    lg.add_argument("id", metavar="ID")
    lg.add_argument("--target", help="only this target")
    lg.add_argument("--tail", type=int, default=200, help="lines per target (default 200)")
    lg.set_defaults(fn=cmd_logs)

    ob = esub.add_parser("object", help="transform one object on the fly",
                         description="ais etl object ID BUCKET/OBJ OUT: write the transformed "
                         "object to OUT ('-' for stdout).")
    ob.add_argument("id", metavar="ID")
    ob.add_argument("src", metavar="BUCKET/OBJ")
    ob.add_argument("dest", metavar="OUT|-")
    ob.set_defaults(fn=cmd_object)

    st = esub.add_parser("stop", help="stop ETLs", description="Stop ETLs on every target.")
    st.add_argument("ids", nargs="+", metavar="ID")
    st.set_defaults(fn=cmd_stop)
    ais_jobs.register_etl(esub)


__all__ = ["ApiError", "register"]
