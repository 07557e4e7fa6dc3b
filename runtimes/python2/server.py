"""The python2 build runtime: serve a user's transform over HTTP (stdlib only).

A storage target starts one of these per ``build`` ETL:

    python server.py --code PATH/code.py --listen 127.0.0.1 --port PORT [--workers N]

This file is written in the common subset of Python 2.7 and Python 3: it runs
in ``python:2.7.18`` and the tests run it under python3 and parse it with a
Python 2 grammar. So: no f-strings, no type hints, no async, no keyword-only
arguments, no ``print`` with more than one argument, no ``raise ... from``;
modules that moved are imported with try/except.

User code contract: the module at ``--code`` defines
``transform(input_bytes) -> bytes`` (the seed's contract). The whole object
arrives as bytes (``str`` on Python 2).

HTTP API:

- ``PUT /`` or ``POST /`` (hpush): body = the object (by Content-Length, or
  chunked transfer-encoding); 200 with the result.
- ``GET /<bucket>/<object...>`` (hrev, hpull): the object is read from
  ``$AIS_TARGET_URL/<bucket>/<object>``; a non-200 from there is passed on
  with its status and body text; an unreachable target is a 502.
- ``GET /health``: 200 ``ok``.
- A transform that raises: 500 with body ``<ExceptionType>: <message>``; the
  traceback goes to stderr and the server keeps serving.

Processes: the parent imports the user module (exit 1 with the reason on
stderr if it cannot, before anything listens), binds the socket, and forks
``--workers`` (default env ``AISETL_WORKERS``, else ``min(4, cpu_count)``)
workers. Each serves the shared socket with a threading HTTP server. The
parent replaces workers that die and, on SIGTERM/SIGINT, stops them and exits
0. Workers ask for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``).
"""

import argparse
import ctypes
import errno
import os
import signal
import socket
import sys
import time
import traceback

try:
    from BaseHTTPServer import BaseHTTPRequestHandler, HTTPServer
except ImportError:
    from http.server import BaseHTTPRequestHandler, HTTPServer

try:
    from SocketServer import ThreadingMixIn
except ImportError:
    from socketserver import ThreadingMixIn

try:
    from urllib2 import HTTPError, ProxyHandler, URLError, build_opener
except ImportError:
    from urllib.error import HTTPError, URLError
    from urllib.request import ProxyHandler, build_opener

try:
    from urllib import quote, unquote
except ImportError:
    from urllib.parse import quote, unquote

READ_CHUNK = 1 << 16
STOP_GRACE_SECONDS = 1.5
USER_MODULE_NAME = "aisetl_user_code"
USER = {"transform": None, "target_url": ""}  # set once in main(), before the fork
# AIS_TARGET_URL is the local target: never go through an http_proxy from the environment.
OPENER = build_opener(ProxyHandler({}))


def log(message):
    sys.stderr.write("aisetl-python2[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def to_bytes(text):
    if isinstance(text, bytes):
        return text
    return text.encode("utf-8", "replace")


def error_text(exc):
    try:
        message = str(exc)
    except UnicodeError:
        message = repr(exc)
    return "%s: %s" % (type(exc).__name__, message)


# --------------------------------------------------------------------------- user code


class UserCodeError(Exception):
    """The user module cannot be used; the message is the one-line reason."""


def _import_file(path):
    try:
        import importlib.util
    except ImportError:
        import imp

        return imp.load_source(USER_MODULE_NAME, path)
    spec = importlib.util.spec_from_file_location(USER_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[USER_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def load_user_module(path):
    if not os.path.isfile(path):
        raise UserCodeError("code file %r does not exist" % path)
    failure = None
    try:
        module = _import_file(path)
    except BaseException:  # SystemExit too: a module that exits is unusable
        traceback.print_exc()
        failure = error_text(sys.exc_info()[1])
    if failure is not None:  # raised outside the except: Python 2 has no "raise ... from"
        raise UserCodeError("importing %s failed: %s" % (path, failure))
    transform = getattr(module, "transform", None)
    if transform is None:
        raise UserCodeError("%s does not define transform(input_bytes) -> bytes" % path)
    if not callable(transform):
        raise UserCodeError("%s: transform is not callable" % path)
    return module


# --------------------------------------------------------------------------- HTTP


def read_exact(rfile, size):
    parts = []
    left = size
    while left > 0:
        part = rfile.read(min(left, READ_CHUNK))
        if not part:
            raise IOError("request body ended after %d of %d bytes" % (size - left, size))
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_chunked(rfile):
    parts = []
    while True:
        line = rfile.readline(1024)
        if not line:
            raise IOError("chunked request body ended early")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                line = rfile.readline(1024)
                if not line or line in (b"\r\n", b"\n"):
                    return b"".join(parts)
        parts.append(read_exact(rfile, size))
        rfile.readline(1024)  # CRLF after the chunk


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aisetl-python2"

    def setup(self):
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle
        # plus delayed ACKs add ~40 ms to every keep-alive request.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        BaseHTTPRequestHandler.setup(self)  # old-style class on Python 2: no super()

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def reply(self, status, body, content_type):
        body = to_bytes(body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_text(self, status, text):
        self.reply(status, text, "text/plain; charset=utf-8")

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is not None:
            return read_exact(self.rfile, int(length))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return read_chunked(self.rfile)
        return b""

    def run_transform(self, data):
        try:
            out = USER["transform"](data)
            if isinstance(out, (bytearray, memoryview)):
                out = bytes(out)
            if not isinstance(out, bytes):
                raise TypeError("transform must return bytes, not %s" % type(out).__name__)
        except Exception:
            exc = sys.exc_info()[1]
            log("transform failed:\n" + traceback.format_exc().rstrip())
            self.reply_text(500, error_text(exc))
            return
        self.reply(200, out, "application/octet-stream")

    def do_PUT(self):
        if self.path.split("?", 1)[0] != "/":
            self.reply_text(404, "not found: %s" % self.path)
            return
        try:
            data = self.read_body()
        except (IOError, ValueError):
            self.close_connection = True
            self.reply_text(400, "bad request body: %s" % error_text(sys.exc_info()[1]))
            return
        self.run_transform(data)

    do_POST = do_PUT

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.reply_text(200, "ok")
            return
        parts = path.lstrip("/").split("/", 1)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            self.reply_text(404, "not found: %s (want /<bucket>/<object>)" % path)
            return
        url = "%s/%s/%s" % (
            USER["target_url"],
            quote(unquote(parts[0]), safe=""),
            quote(unquote(parts[1]), safe="/"),
        )
        try:
            upstream = OPENER.open(url)
            try:
                chunks = []
                while True:
                    chunk = upstream.read(READ_CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
            finally:
                upstream.close()
        except HTTPError:
            exc = sys.exc_info()[1]
            try:
                body = exc.read()
            finally:
                exc.close()
            self.reply_text(exc.code, body)
            return
        except (URLError, IOError, socket.error):
            exc = sys.exc_info()[1]
            # name the object, not the URL: AIS_TARGET_URL carries the target's secret
            log("reading %s/%s from AIS_TARGET_URL failed: %s"
                % (unquote(parts[0]), unquote(parts[1]), error_text(exc)))
            self.reply_text(502, error_text(exc))
            return
        self.run_transform(b"".join(chunks))


class ThreadingHTTPServer(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


# --------------------------------------------------------------------------- processes


def die_with_parent(parent_pid):
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def worker(server, parent_pid):
    die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(0))
    try:
        server.serve_forever()
    except Exception:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


class Stop(Exception):
    pass


def raise_stop(signum, frame):
    raise Stop()


def fork_worker(server, parent_pid):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        worker(server, parent_pid)
    return pid


def supervise(server, count):
    parent_pid = os.getpid()
    workers = {}  # pid -> start time
    failures = [0]
    signal.signal(signal.SIGTERM, raise_stop)
    signal.signal(signal.SIGINT, raise_stop)
    try:
        for _ in range(count):
            workers[fork_worker(server, parent_pid)] = time.time()
        log("serving on %s:%d with %d workers" % (server.server_address[0],
                                                  server.server_address[1], count))
        while True:
            try:
                pid, status = os.wait()
            except OSError:
                if sys.exc_info()[1].errno == errno.EINTR:
                    continue
                raise
            started = workers.pop(pid, None)
            if started is None:
                continue
            failures[0] = 0 if time.time() - started > 10 else failures[0] + 1
            delay = min(0.1 * (2 ** failures[0]), 10.0) if failures[0] else 0.0
            log("worker %d exited with status %d; restarting in %.1fs" % (pid, status, delay))
            time.sleep(delay)  # a Stop during the backoff ends the loop
            workers[fork_worker(server, parent_pid)] = time.time()
    except Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_workers(list(workers))
    return 0


def stop_workers(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + STOP_GRACE_SECONDS
    left = set(pids)
    while left and time.time() < deadline:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except OSError:
                done = pid
            if done:
                left.discard(pid)
        if left:
            time.sleep(0.02)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


def default_workers():
    env = os.environ.get("AISETL_WORKERS")
    if env:
        return int(env)
    try:
        import multiprocessing

        cpus = multiprocessing.cpu_count()
    except (ImportError, NotImplementedError):
        cpus = 1
    return min(4, cpus)


def main(argv=None):
    parser = argparse.ArgumentParser(description="aisetl python2 build runtime")
    parser.add_argument("--code", required=True, help="path of the user's module")
    parser.add_argument("--listen", default="0.0.0.0", help="address to bind")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: $AISETL_WORKERS or min(4, cpus))")
    args = parser.parse_args(argv)
    count = args.workers
    if count is None:
        count = default_workers()
    if count < 1:
        log("--workers must be at least 1, got %d" % count)
        return 2
    try:
        module = load_user_module(args.code)
    except UserCodeError:
        log("cannot load user code: %s" % sys.exc_info()[1])
        return 1
    USER["transform"] = module.transform
    USER["target_url"] = os.environ.get("AIS_TARGET_URL", "").rstrip("/")
    if ":" in args.listen:
        ThreadingHTTPServer.address_family = socket.AF_INET6
    try:
        server = ThreadingHTTPServer((args.listen, args.port), Handler)
    except socket.error:
        log("cannot listen on %s:%d: %s" % (args.listen, args.port, sys.exc_info()[1]))
        return 1
    return supervise(server, count)


if __name__ == "__main__":
    sys.exit(main())
