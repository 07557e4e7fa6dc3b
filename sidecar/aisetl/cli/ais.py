"""``ais``: the command-line client, shaped after AIStore's CLI.

Reads the gateway address from ``AIS_ENDPOINT`` (default http://localhost:8080).
Every failure prints one line ``ais: <what went wrong>`` to stderr and exits 1
(2 for a command-line mistake). Buckets may be written ``NAME`` or ``ais://NAME``.

    ais create bucket NAME...          ais ls [BUCKET] [--prefix P]
    ais put FILE BUCKET[/OBJ]          ais put - BUCKET/OBJ   (stdin)
    ais get BUCKET/OBJ FILE|-          ais object rm BUCKET/OBJ...
    ais bucket rm NAME...              ais show cluster
    ais etl ...                        ais wait xaction ID
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from aisetl.cli.client import BLOCK, ApiError, Client
from aisetl.model.errors import AisError
from aisetl.model.names import split_bucket_object, validate_object

Handler = Callable[[Client, argparse.Namespace], int]


def _bucket_only(arg: str) -> str:
    bucket, obj = split_bucket_object(arg)
    if obj:
        raise AisError(f"{arg!r} names an object: give a bucket name only")
    return bucket


def _bucket_obj(arg: str, what: str = "BUCKET/OBJECT") -> tuple[str, str]:
    bucket, obj = split_bucket_object(arg)
    if not obj:
        raise AisError(f"{arg!r}: expected {what}, e.g. transform/shard.in")
    return bucket, validate_object(obj, bucket)


# --- buckets ---------------------------------------------------------------------------
def cmd_create_bucket(c: Client, a: argparse.Namespace) -> int:
    for name in a.names:
        b = _bucket_only(name)
        c.json("POST", f"/v1/buckets/{b}", {"action": "create-bck"})
        print(f'"ais://{b}" bucket created')
    return 0


def cmd_rm_bucket(c: Client, a: argparse.Namespace) -> int:
    for name in a.names:
        b = _bucket_only(name)
        c.request("DELETE", f"/v1/buckets/{b}").read()
        print(f'"ais://{b}" bucket destroyed')
    return 0


def cmd_ls(c: Client, a: argparse.Namespace) -> int:
    if not a.bucket:
        buckets = c.json("GET", "/v1/buckets")
        for b in buckets:
            print(f"{b['provider']}://{b['name']}")
        return 0
    bucket, prefix = split_bucket_object(a.bucket)
    prefix = a.prefix or prefix
    token = ""
    rows: list[tuple[str, str]] = []
    while True:
        params = {"prefix": prefix, "page_size": str(a.page_size)}
        if token:
            params["continuation_token"] = token
        page = c.json("GET", f"/v1/buckets/{bucket}", params=params)
        rows.extend((e["name"], _size(e["size"])) for e in page["entries"])
        token = page.get("continuation_token", "")
        if not token or (a.limit and len(rows) >= a.limit):
            break
    if a.limit:
        rows = rows[: a.limit]
    width = max([4, *(len(n) for n, _ in rows)])
    print(f"{'NAME':<{width}}  SIZE")
    for name, size in rows:
        print(f"{name:<{width}}  {size}")
    return 0


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)}{unit}" if unit == "B" else f"{size:.2f}{unit}"
        size /= 1024
    return f"{n}B"


# --- objects ---------------------------------------------------------------------------
def _stdin_chunks() -> Iterator[bytes]:
    while chunk := sys.stdin.buffer.read(BLOCK):
        yield chunk


def cmd_put(c: Client, a: argparse.Namespace) -> int:
    bucket, obj = split_bucket_object(a.dest)
    if a.file == "-":
        if not obj:
            raise AisError("reading stdin needs an object name: ais put - BUCKET/OBJECT")
        validate_object(obj, bucket)
        c.request("PUT", f"/v1/objects/{bucket}/{obj}", body=_stdin_chunks()).read()
        return 0
    path = Path(a.file)
    if not path.is_file():
        raise AisError(f"{a.file}: no such file")
    obj = validate_object(obj or path.name, bucket)
    with open(path, "rb") as f:
        c.request("PUT", f"/v1/objects/{bucket}/{obj}", body=f,
                  length=os.fstat(f.fileno()).st_size).read()
    print(f'PUT "{obj}" into bucket "{bucket}"')
    return 0


def stream_out(chunks: Iterator[bytes], dest: str) -> int:
    """Write chunks to a file (atomically, via a temp name) or to stdout for '-'."""
    if dest == "-":
        out = sys.stdout.buffer
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        return 0
    tmp = Path(f"{dest}.ais-part")
    total = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                total += len(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return total


def cmd_get(c: Client, a: argparse.Namespace) -> int:
    bucket, obj = _bucket_obj(a.src)
    dest = a.dest or obj.rsplit("/", 1)[-1]
    resp = c.request("GET", f"/v1/objects/{bucket}/{obj}")
    n = stream_out(resp.iter_chunks(), dest)
    if dest != "-":
        print(f'GET "{obj}" from bucket "{bucket}" as "{dest}" [{_size(n)}]')
    return 0


def cmd_rm_object(c: Client, a: argparse.Namespace) -> int:
    for arg in a.objects:
        bucket, obj = _bucket_obj(arg)
        c.request("DELETE", f"/v1/objects/{bucket}/{obj}").read()
        print(f'deleted "{obj}" from bucket "{bucket}"')
    return 0


def cmd_rm(c: Client, a: argparse.Namespace) -> int:
    return cmd_rm_bucket(c, a) if a.kind == "bucket" else cmd_rm_object(
        c, argparse.Namespace(objects=a.names))


def cmd_show_cluster(c: Client, a: argparse.Namespace) -> int:
    smap = c.json("GET", "/v1/cluster/map")
    print(f"{'TARGET':<12} {'URL':<28} NODE")
    for t in smap["targets"]:
        print(f"{t['id']:<12} {t['url']:<28} {t.get('node', '')}")
    return 0


# --- parser ----------------------------------------------------------------------------
# Modules that add commands: each has register(subparsers).
EXTENSION_MODULES = ["aisetl.cli.ais_etl", "aisetl.cli.ais_jobs"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ais", description="Client of an aisetl cluster (AIS_ENDPOINT, default "
        "http://localhost:8080): buckets, objects and ETLs.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    create = sub.add_parser("create", help="create buckets", description="Create resources.")
    csub = create.add_subparsers(dest="what", required=True, metavar="WHAT")
    cb = csub.add_parser("bucket", help="create buckets: ais create bucket NAME...",
                         description="Create one or more buckets (NAME or ais://NAME).")
    cb.add_argument("names", nargs="+", metavar="NAME")
    cb.set_defaults(fn=cmd_create_bucket)

    bucket = sub.add_parser("bucket", help="bucket commands (rm)",
                            description="Bucket commands.")
    bsub = bucket.add_subparsers(dest="what", required=True, metavar="COMMAND")
    br = bsub.add_parser("rm", help="destroy buckets and all their objects",
                         description="Destroy buckets and every object in them.")
    br.add_argument("names", nargs="+", metavar="NAME")
    br.set_defaults(fn=cmd_rm_bucket)

    objp = sub.add_parser("object", help="object commands (rm)", description="Object commands.")
    osub = objp.add_subparsers(dest="what", required=True, metavar="COMMAND")
    orm = osub.add_parser("rm", help="delete objects: ais object rm BUCKET/OBJ...",
                          description="Delete objects.")
    orm.add_argument("objects", nargs="+", metavar="BUCKET/OBJ")
    orm.set_defaults(fn=cmd_rm_object)

    rm = sub.add_parser("rm", help="delete: ais rm bucket NAME... | ais rm object B/O...",
                        description="Delete buckets or objects.")
    rm.add_argument("kind", choices=["bucket", "object"])
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(fn=cmd_rm)

    ls = sub.add_parser("ls", help="list buckets, or the objects of a bucket",
                        description="Without BUCKET: list buckets. With BUCKET[/PREFIX]: "
                        "list its objects in name order.")
    ls.add_argument("bucket", nargs="?", metavar="BUCKET")
    ls.add_argument("--prefix", default="", help="only objects whose names start with this")
    ls.add_argument("--page-size", type=int, default=1000, help="entries per request")
    ls.add_argument("--limit", type=int, default=0, help="stop after this many (0: all)")
    ls.set_defaults(fn=cmd_ls)

    put = sub.add_parser("put", help="store a file (or stdin) as an object",
                         description="ais put FILE BUCKET (object named after the file), "
                         "ais put FILE BUCKET/OBJ, or ais put - BUCKET/OBJ (stdin).")
    put.add_argument("file", metavar="FILE|-")
    put.add_argument("dest", metavar="BUCKET[/OBJ]")
    put.set_defaults(fn=cmd_put)

    get = sub.add_parser("get", help="read an object into a file or stdout",
                         description="ais get BUCKET/OBJ [FILE|-]: FILE defaults to the "
                         "object's base name; '-' writes to stdout.")
    get.add_argument("src", metavar="BUCKET/OBJ")
    get.add_argument("dest", nargs="?", metavar="FILE|-")
    get.set_defaults(fn=cmd_get)

    show = sub.add_parser("show", help="show cluster state", description="Show things.")
    ssub = show.add_subparsers(dest="what", required=True, metavar="WHAT")
    sc = ssub.add_parser("cluster", help="live targets", description="List live targets.")
    sc.set_defaults(fn=cmd_show_cluster)

    import importlib

    for name in EXTENSION_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    endpoint = os.environ.get("AIS_ENDPOINT", "http://localhost:8080")
    client = Client(endpoint)
    try:
        fn: Handler = args.fn
        return fn(client, args)
    except ApiError as e:
        print(f"ais: {e.message}", file=sys.stderr)
    except AisError as e:
        print(f"ais: {e.message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("ais: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except (OSError, http.client.HTTPException) as e:
        print(f"ais: {type(e).__name__}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
