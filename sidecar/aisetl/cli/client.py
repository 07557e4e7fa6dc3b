"""A small, streaming HTTP client for the ``ais`` CLI (stdlib only: fast start-up).

It follows the gateway's 307 redirects itself. A PUT first sends only its
headers with ``Expect: 100-continue``; the gateway answers with the redirect,
and the body goes straight to the owner target, never through the gateway.
Bodies stream in 1 MiB blocks in both directions.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import IO, Any

BLOCK = 1 << 20
REDIRECTS = (301, 302, 303, 307, 308)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _message(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])
    except ValueError:
        pass
    text = body.decode(errors="replace").strip()
    return text[:500] or f"HTTP {status}"


class Response:
    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self.conn = conn
        self.resp = resp
        self.status = resp.status
        self.headers = resp.headers

    def read(self) -> bytes:
        try:
            return self.resp.read()
        finally:
            self.conn.close()

    def iter_chunks(self) -> Iterator[bytes]:
        n = 0
        try:
            while chunk := self.resp.read(BLOCK):
                n += len(chunk)
                yield chunk
        except (http.client.HTTPException, OSError) as e:
            raise ApiError(0, f"the response was cut off after {n} bytes ({type(e).__name__}): "
                           "the server or the transform failed mid-stream") from e
        finally:
            self.conn.close()

    def json(self) -> Any:
        return json.loads(self.read())


class Client:
    def __init__(self, endpoint: str, timeout: float = 600.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise ApiError(0, f"bad endpoint {url!r}: use http://HOST:PORT (AIS_ENDPOINT)")
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = cls(u.netloc, timeout=self.timeout, blocksize=BLOCK)
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        return conn, path

    def _locate(self, method: str, url: str, hdrs: dict[str, str], length: int | None) -> str:
        """Where a body should go: send headers only with ``Expect: 100-continue``.

        The gateway answers with a 307 (or an error) before any body byte; a
        server that answers ``100 Continue`` (a target addressed directly)
        takes the body itself, so the URL stays as it is.
        """
        for _ in range(5):
            conn, p = self._connect(url)
            try:
                conn.putrequest(method, p, skip_accept_encoding=True)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                if length is not None:
                    conn.putheader("Content-Length", str(length))
                else:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.putheader("Expect", "100-continue")
                conn.endheaders()
                raw = http.client.HTTPResponse(conn.sock, method=method)
                _v, status, _r = raw._read_status()  # type: ignore[attr-defined]
                if status == 100:
                    return url
                headers = http.client.parse_headers(raw.fp)
                if status in REDIRECTS and headers.get("Location"):
                    # the owner target takes the body: do not probe it too (it
                    # would answer 100 Continue and log the dropped connection)
                    return str(headers["Location"])
                n = int(headers.get("Content-Length") or 0)
                raise ApiError(status, _message(status, raw.fp.read(n) if n else b""))
            finally:
                conn.close()
        raise ApiError(0, f"too many redirects for {method} {url}")

    def request(self, method: str, path: str, *,
                body: bytes | IO[bytes] | Iterable[bytes] | None = None,
                headers: dict[str, str] | None = None, length: int | None = None,
                params: dict[str, str] | None = None, ok: tuple[int, ...] = (200,)
                ) -> Response:
        url = self.endpoint + urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~")
        if params:
            url += "?" + urllib.parse.urlencode(params)
        hdrs = dict(headers or {})
        try:
            if body is not None and not isinstance(body, bytes):
                url = self._locate(method, url, hdrs, length)
            for _ in range(5):  # bounded redirects
                conn, p = self._connect(url)
                send_hdrs = dict(hdrs)
                chunked = False
                if isinstance(body, bytes):
                    send_hdrs["Content-Length"] = str(len(body))
                elif body is not None and length is not None:
                    send_hdrs["Content-Length"] = str(length)
                elif body is not None:
                    chunked = True
                conn.request(method, p, body=body, headers=send_hdrs, encode_chunked=chunked)
                resp = Response(conn, conn.getresponse())
                if resp.status in REDIRECTS and "Location" in resp.headers:
                    resp.read()
                    url = resp.headers["Location"]
                    continue
                if resp.status not in ok:
                    raise ApiError(resp.status, _message(resp.status, resp.read()))
                return resp
        except OSError as e:
            raise ApiError(0, f"cannot reach {url}: {e} (is the cluster up? AIS_ENDPOINT "
                           "names it)") from e
        raise ApiError(0, f"too many redirects for {method} {path}")

    def json(self, method: str, path: str, doc: Any = None, **kw: Any) -> Any:
        body = json.dumps(doc).encode() if doc is not None else None
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        raw = self.request(method, path, body=body, headers=hdrs, **kw).read()
        return json.loads(raw) if raw.strip() else None
