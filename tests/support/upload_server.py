"""A small real HTTP upload endpoint for the tests and the demo.

PUT and POST store the request body at ``<dir>/<url path>``, streamed to disk in chunks
(never whole in memory), with either ``Content-Length`` or ``Transfer-Encoding: chunked``.
The answer is 201 when the file is new, 200 when it replaced one, with a JSON body
``{"path", "size", "sha256"}``. GET and HEAD serve stored files.

Every request (uploads, downloads, failures; not the control endpoint) is recorded as one JSON
line in ``<dir>/requests.jsonl``::

    {"ts", "started", "method", "path", "query", "headers", "authorization_sha256", "size",
     "sha256", "status", "stored", "injected"}

``started`` is when the request's headers were read, ``ts`` when it was recorded: for an
upload, once its body is stored, so ``ts - started`` is its transfer time, the same for every
client (bench/run.py's stage-out measure); for a download, before its body is sent. A record
is written before the answer is, so a client that has its answer finds the record.

``headers`` never holds ``Authorization`` or ``Proxy-Authorization``: ``authorization_sha256``
is the sha256 of the Authorization value (or null), so a test can check which credential
was sent without the credential being written anywhere.

Failure injection, for retry tests:

* ``POST /_control/fail?count=N&status=503`` — the next N requests fail with that status.
  Optional: ``methods=PUT,POST`` (default: PUT and POST), ``path_prefix=/a/b`` (only
  requests under it), ``status=drop`` (close the connection without an answer),
  ``after_bytes=K`` (read K bytes of the body before failing; default: the whole body),
  ``delay_s=S`` (sleep before answering). Rules are used in the order they were added.
* ``POST /_control/reset`` — forget every rule.
* ``GET /_control/health`` — ``{"service": "fem-upload-server", "dir": ...}``.
* ``GET /_control/requests`` — the recorded requests as one JSON list.
* ``--fail-path-prefix P [--fail-status S]`` on the command line: every upload under P fails.
* ``/_redirect/<rest>`` answers 302 to ``/<rest>`` (for "redirects are not followed" tests).

Use it in-process::

    with UploadServer(tmp_path) as srv:   # ephemeral loopback port
        requests.put(srv.url + "/a/b.tar.gz", data=...)
        srv.fail_next(2, status=503)
        srv.requests()

or as a process: ``python tests/support/upload_server.py --port 8089 --dir DIR``
(``--port 0`` picks a free port; ``--port-file F`` writes the port chosen).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 * 1024
SERVICE = "fem-upload-server"
LOG_NAME = "requests.jsonl"
SECRET_HEADERS = {"authorization", "proxy-authorization"}


class _Drop(Exception):
    """Close the connection without an answer."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FailRule:
    count: int
    status: int | None  # None = drop the connection
    methods: frozenset[str] = frozenset({"PUT", "POST"})
    path_prefix: str = "/"
    after_bytes: int | None = None
    delay_s: float = 0.0
    used: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        if self.path_prefix in ("", "/"):
            return True
        prefix = self.path_prefix.rstrip("/")
        return path == prefix or path.startswith(prefix + "/")

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "status": self.status if self.status is not None else "drop",
            "methods": sorted(self.methods),
            "path_prefix": self.path_prefix,
            "after_bytes": self.after_bytes,
            "delay_s": self.delay_s,
            "used": self.used,
        }


class _State:
    def __init__(self, root: Path, fail_path_prefix: str | None, fail_status: int) -> None:
        self.root = root
        self.log_path = root / LOG_NAME
        self.lock = threading.Lock()
        self.rules: list[FailRule] = []
        self.permanent: FailRule | None = None
        if fail_path_prefix:
            self.permanent = FailRule(count=-1, status=fail_status, path_prefix=fail_path_prefix)

    def take_rule(self, method: str, path: str) -> FailRule | None:
        with self.lock:
            if self.permanent is not None and self.permanent.matches(method, path):
                self.permanent.used += 1
                return self.permanent
            for rule in self.rules:
                if rule.used < rule.count and rule.matches(method, path):
                    rule.used += 1
                    if rule.used >= rule.count:
                        self.rules.remove(rule)
                    return rule
        return None

    def record(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self.lock, open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


def read_requests(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The requests recorded in ``<directory>/requests.jsonl`` (empty list when none)."""
    path = Path(directory) / LOG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fem-upload-server/1"
    server: _Server

    # -- plumbing -------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _split(self) -> tuple[str, str]:
        parts = urlsplit(self.path)
        return unquote(parts.path) or "/", parts.query

    def _send(
        self,
        status: int,
        body: bytes = b"",
        ctype: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, (json.dumps(obj, sort_keys=True) + "\n").encode())

    def _target(self, path: str) -> Path:
        norm = posixpath.normpath("/" + path.lstrip("/"))
        rel = norm.lstrip("/")
        if not rel or rel == "." or rel.split("/")[0] == ".." or "\x00" in rel:
            raise _BadRequest(400, f"bad path {path!r}")
        if rel == LOG_NAME or rel.startswith("_control") or rel.startswith("."):
            raise _BadRequest(403, f"reserved path {path!r}")
        return self.server.state.root / rel

    def _headers_for_log(self) -> tuple[dict[str, str], str | None]:
        headers: dict[str, str] = {}
        auth = None
        for key, value in self.headers.items():
            if key.lower() in SECRET_HEADERS:
                if key.lower() == "authorization":
                    auth = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
                continue
            headers[key] = value
        return headers, auth

    def _record(
        self,
        path: str,
        query: str,
        status: int | str,
        size: int | None,
        sha256: str | None,
        stored: bool,
        injected: bool,
    ) -> None:
        headers, auth = self._headers_for_log()
        self.server.state.record(
            {
                "ts": time.time(),
                "started": self._started,
                "method": self.command,
                "path": path,
                "query": query,
                "headers": headers,
                "authorization_sha256": auth,
                "size": size,
                "sha256": sha256,
                "status": status,
                "stored": stored,
                "injected": injected,
            }
        )

    # -- body reading ---------------------------------------------------------------------

    def _body_chunks(self, limit: int | None = None):
        """Yield the request body in pieces of at most CHUNK bytes.

        Stops after ``limit`` bytes when given (the rest of the body is then unread).
        """
        remaining_limit = limit
        for size in self._body_spans():
            left = size
            while left:
                want = min(CHUNK, left)
                if remaining_limit is not None:
                    if remaining_limit <= 0:
                        return
                    want = min(want, remaining_limit)
                data = self.rfile.read(want)
                if not data:
                    raise _Drop()
                left -= len(data)
                if remaining_limit is not None:
                    remaining_limit -= len(data)
                yield data

    def _body_spans(self):
        """Yield the sizes of the body's spans, each once the previous one was read: the
        chunks of a chunked body (their framing consumed here), or the Content-Length."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _Drop()
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError as exc:
                    raise _BadRequest(400, "bad chunk size") from exc
                if size == 0:
                    # trailers until an empty line
                    while True:
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    return
                yield size
                self.rfile.readline(3)  # CRLF after the chunk data
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return  # RFC 9112: a request with neither header has no body
        try:
            left = int(length_text)
        except ValueError as exc:
            raise _BadRequest(400, "bad Content-Length") from exc
        if left < 0:
            raise _BadRequest(400, "bad Content-Length")
        yield left

    # -- methods --------------------------------------------------------------------------

    def parse_request(self) -> bool:
        self._started = time.time()
        return super().parse_request()

    def do_PUT(self) -> None:
        self._upload()

    def do_POST(self) -> None:
        path, _ = self._split()
        if path.startswith("/_control/"):
            self._control(path)
            return
        self._upload()

    def do_GET(self) -> None:
        path, query = self._split()
        if path.startswith("/_control/"):
            self._control(path)
            return
        self._download(path, query)

    def do_HEAD(self) -> None:
        path, query = self._split()
        self._download(path, query)

    def _redirect(self, path: str, query: str) -> bool:
        if not path.startswith("/_redirect/"):
            return False
        # Drain a body if there is one, so the connection stays usable.
        with contextlib.suppress(_BadRequest):
            for _ in self._body_chunks():
                pass
        location = "/" + path[len("/_redirect/") :] + (f"?{query}" if query else "")
        self._record(path, query, 302, None, None, False, False)
        self._send(302, b"", extra={"Location": location})
        return True

    def _upload(self) -> None:
        path, query = self._split()
        if self._redirect(path, query):
            return
        rule = self.server.state.take_rule(self.command, path)
        if rule is not None:
            self._fail(rule, path, query)
            return
        try:
            target = self._target(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            existed = target.exists()
            digest = hashlib.sha256()
            size = 0
            fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    for data in self._body_chunks():
                        fh.write(data)
                        digest.update(data)
                        size += len(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except _BadRequest as exc:
            self._record(path, query, exc.status, None, None, False, False)
            self.close_connection = True
            self._send_json(exc.status, {"error": str(exc)})
            return
        except _Drop:
            self._record(path, query, "client_closed", None, None, False, False)
            self.close_connection = True
            return
        status = HTTPStatus.OK if existed else HTTPStatus.CREATED
        sha = digest.hexdigest()
        self._record(path, query, int(status), size, sha, True, False)
        self._send_json(int(status), {"path": path, "size": size, "sha256": sha})

    def _fail(self, rule: FailRule, path: str, query: str) -> None:
        digest = hashlib.sha256()
        size = 0
        try:
            for data in self._body_chunks(limit=rule.after_bytes):
                digest.update(data)
                size += len(data)
        except _BadRequest:
            pass
        if rule.delay_s:
            time.sleep(rule.delay_s)
        drained = rule.after_bytes is None
        self._record(
            path,
            query,
            rule.status if rule.status is not None else "drop",
            size,
            digest.hexdigest() if drained else None,
            False,
            True,
        )
        if rule.status is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            raise _Drop()
        if not drained:
            self.close_connection = True
        self._send_json(rule.status, {"error": "injected failure", "status": rule.status})

    def _download(self, path: str, query: str) -> None:
        if self._redirect(path, query):
            return
        rule = self.server.state.take_rule(self.command, path)
        if rule is not None:
            self._fail(rule, path, query)
            return
        try:
            target = self._target(path)
        except _BadRequest as exc:
            self._record(path, query, exc.status, None, None, False, False)
            self._send_json(exc.status, {"error": str(exc)})
            return
        if not target.is_file():
            self._record(path, query, 404, None, None, False, False)
            self._send_json(404, {"error": "not found"})
            return
        # Recorded before the body goes out: a client that has read the whole answer must
        # find the record (it was written after the last byte, a race the tests lost).
        size = target.stat().st_size
        sha = None
        if self.command == "GET":
            with open(target, "rb") as fh:
                sha = hashlib.file_digest(fh, "sha256").hexdigest()
        self._record(path, query, 200, size, sha, False, False)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "GET":
            with open(target, "rb") as fh:
                shutil.copyfileobj(fh, self.wfile, CHUNK)

    def _control(self, path: str) -> None:
        _, query = self._split()
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        state = self.server.state
        # Control requests may carry a body; drain it.
        with contextlib.suppress(_BadRequest):
            for _ in self._body_chunks():
                pass
        if path == "/_control/health":
            self._send_json(200, {"service": SERVICE, "dir": str(state.root), "pid": os.getpid()})
        elif path == "/_control/requests":
            self._send_json(200, read_requests(state.root))
        elif path == "/_control/rules":
            with state.lock:
                rules = [r.as_dict() for r in state.rules]
            self._send_json(200, rules)
        elif path == "/_control/reset" and self.command == "POST":
            with state.lock:
                state.rules.clear()
            self._send_json(200, {"rules": 0})
        elif path == "/_control/fail" and self.command == "POST":
            try:
                rule = _rule_from_params(params)
            except ValueError as exc:
                self._send_json(400, {"error": str(exc)})
                return
            with state.lock:
                state.rules.append(rule)
            self._send_json(200, rule.as_dict())
        else:
            self._send_json(404, {"error": f"unknown control {self.command} {path}"})

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Drop:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True


def _rule_from_params(params: dict[str, str]) -> FailRule:
    count = int(params.get("count", "1"))
    if count < 1:
        raise ValueError("count must be >= 1")
    status_text = params.get("status", "503")
    status = None if status_text == "drop" else int(status_text)
    if status is not None and not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status or 'drop'")
    methods = frozenset(
        m.strip().upper() for m in params.get("methods", "PUT,POST").split(",") if m.strip()
    )
    after = params.get("after_bytes")
    return FailRule(
        count=count,
        status=status,
        methods=methods,
        path_prefix=params.get("path_prefix", "/") or "/",
        after_bytes=int(after) if after is not None else None,
        delay_s=float(params.get("delay_s", "0")),
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: _State
    verbose: bool


class UploadServer:
    """The upload endpoint, run in a background thread of this process.

    ``UploadServer(directory, host="127.0.0.1", port=0)``; ``start()``/``stop()`` or use it as
    a context manager. ``url`` is ``http://host:port``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        fail_path_prefix: str | None = None,
        fail_status: int = 503,
        verbose: bool = False,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._httpd = _Server((host, port), _Handler)
        self._httpd.state = _State(self.directory, fail_path_prefix, fail_status)
        self._httpd.verbose = verbose
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> UploadServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="upload-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> UploadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers for tests
    def requests(self) -> list[dict[str, Any]]:
        return read_requests(self.directory)

    def fail_next(self, count: int = 1, status: int | str = 503, **kw: Any) -> None:
        params = {"count": str(count), "status": str(status)}
        params.update({k: str(v) for k, v in kw.items()})
        with self._httpd.state.lock:
            self._httpd.state.rules.append(_rule_from_params(params))

    def reset(self) -> None:
        with self._httpd.state.lock:
            self._httpd.state.rules.clear()

    def clear(self) -> None:
        """Remove every stored file and the request log."""
        self.reset()
        for child in self.directory.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fem-ansible test upload endpoint")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    ap.add_argument("--dir", required=True, help="where bodies and requests.jsonl go")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--fail-path-prefix", help="every upload under this path fails")
    ap.add_argument("--fail-status", type=int, default=503)
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = ap.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        ap.error("this test server only listens on loopback")
    srv = UploadServer(
        args.dir,
        args.host,
        args.port,
        fail_path_prefix=args.fail_path_prefix,
        fail_status=args.fail_status,
        verbose=args.verbose,
    )
    if args.port_file:
        tmp = args.port_file + ".tmp"
        Path(tmp).write_text(f"{srv.port}\n")
        os.replace(tmp, args.port_file)

    def _stop(signum: int, frame: object) -> None:
        threading.Thread(target=srv._httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    srv.serve_forever()
    srv._httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
