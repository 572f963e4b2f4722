"""Uploads of a task's archives from the listener's host (DESIGN.md §4, §6).

Archives are streamed from disk (never read whole into memory), redirects are never
followed (a redirect could send a presigned body anywhere), and a failed upload is retried
with capped exponential backoff before the task fails ``stage_out_failed``.

Every wait of an upload is bounded as a whole, not per socket read: a watchdog thread shuts
the upload's sockets down once ``http.transfer_timeout_s`` has passed or the task is
cancelled, whatever the server does (one byte every few seconds keeps every read alive).
A response is believed only when its status line and headers arrive whole: ``http.client``
takes a connection closed in the middle of them for their end, and would report a 200.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import requests.adapters
from urllib3.connectionpool import HTTPConnectionPool

from .config import HttpConfig
from .errors import TaskFailed
from .refs import redact_url

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
BACKOFF_MAX_S = 30.0
TIMEOUT_S = (10, 300)
# How often the watchdog looks at the clock and the cancel.
WATCH_S = 0.5


@dataclass(frozen=True)
class Archive:
    """A file on the listener's host, with what events report of it."""

    path: Path
    size: int
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> Archive:
        """The size and hash of one reading, so they describe the same bytes."""
        path = Path(path)
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256")
            size = f.tell()
        return cls(path, size, digest.hexdigest())

    def report(self, url: str | None) -> dict[str, Any]:
        return {"url": redact_url(url) if url else None, "size": self.size,
                "sha256": self.sha256}


class _Counted:
    """A file read by ``requests`` in blocks, telling ``progress`` the bytes read so far;
    ``__len__`` lets ``requests`` send a Content-Length rather than chunks."""

    def __init__(self, f: Any, size: int, progress: Callable[[int], None]):
        self._f, self._size, self._progress, self._sent = f, size, progress, 0

    def __len__(self) -> int:
        return self._size - self._sent

    def __iter__(self) -> Any:  # a stream to ``requests``, as the file itself is
        while block := self.read(CHUNK):
            yield block

    def read(self, n: int = -1) -> bytes:
        block = self._f.read(n)
        self._sent += len(block)
        self._progress(self._sent)
        return block


class IncompleteHead(http.client.HTTPException):
    """The connection ended inside the status line or the headers."""


class _Lines:
    """The response's reader while its head is read: notes a line that did not end in a
    newline, which is how ``http.client`` sees the end of the data."""

    def __init__(self, fp: Any):
        self.fp, self.cut = fp, False

    def readline(self, limit: int = -1) -> bytes:
        line = self.fp.readline(limit)
        # A line at the length limit is http.client's own error to raise.
        self.cut = self.cut or (not line.endswith(b"\n") and len(line) != limit)
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fp, name)


class _WholeHeadResponse(http.client.HTTPResponse):
    """A response whose status line and headers must each end in a newline, the headers
    with an empty line: a server that closes in the middle of them gave no answer."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        lines = self.fp = _Lines(self.fp)
        try:
            super().begin()
        finally:
            if self.fp is lines:  # else http.client closed it (and set None)
                self.fp = lines.fp
        if lines.cut:
            raise IncompleteHead("the connection closed inside the response's head")


# The watchdog of the upload running in this context; connections register their sockets
# with it as they open.
_WATCH: contextvars.ContextVar[_Watch] = contextvars.ContextVar("fem_transfer_watch")


class _Watch:
    """Shuts every socket of one upload down once ``deadline`` (monotonic) passes or
    ``cancel`` is set; a blocked send or read then fails at once."""

    def __init__(self, cancel: threading.Event, deadline: float):
        self.cancel, self.deadline = cancel, deadline
        self.reason: str | None = None
        self._socks: list[Any] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    def add(self, sock: Any) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.reason:
                _shut(sock)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def fire(self) -> bool:
        """Stop the upload if it is due; whether it is stopped."""
        if self.reason is None and (self.cancel.is_set() or self.remaining() <= 0):
            with self._lock:
                self.reason = "cancelled" if self.cancel.is_set() else "deadline"
                for sock in self._socks:
                    _shut(sock)
        return self.reason is not None

    def _run(self) -> None:
        while not self.fire() and not self._done.wait(WATCH_S):
            pass

    @contextlib.contextmanager
    def watching(self) -> Iterator[_Watch]:
        token = _WATCH.set(self)
        thread = threading.Thread(target=self._run, name="fem-upload-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._done.set()
            _WATCH.reset(token)
            thread.join()


def _shut(sock: Any) -> None:
    """Wake whoever blocks on ``sock`` (a close alone does not); the base class's shutdown,
    so a TLS socket is shut too without touching its TLS state from this thread (TLS inside
    a proxy's TLS is urllib3's SSLTransport, around the real socket)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(getattr(sock, "socket", sock), socket.SHUT_RDWR)


class _Watched:
    """Connections whose sockets the current upload's watchdog can shut, and whose
    responses must arrive whole."""

    response_class = _WholeHeadResponse
    sock: Any

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        watch = _WATCH.get(None)
        if watch is not None and self.sock is not None:
            watch.add(self.sock)


@functools.cache
def _watched_pool(pool: type[HTTPConnectionPool]) -> type[HTTPConnectionPool]:
    """``pool`` (urllib3's, or a proxy's such as SOCKS) with watched connections."""
    if issubclass(pool.ConnectionCls, _Watched):
        return pool
    conn = type(f"Watched{pool.ConnectionCls.__name__}", (_Watched, pool.ConnectionCls), {})
    return type(f"Watched{pool.__name__}", (pool,), {"ConnectionCls": conn})


class _Adapter(requests.adapters.HTTPAdapter):
    """``requests``' adapter with watched connections, direct or through a proxy."""

    @staticmethod
    def _watched(manager: Any) -> Any:
        manager.pool_classes_by_scheme = {
            scheme: _watched_pool(pool) for scheme, pool in manager.pool_classes_by_scheme.items()}
        return manager

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._watched(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return self._watched(super().proxy_manager_for(proxy, **proxy_kwargs))


def _session(http: HttpConfig) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    for prefix in ("http://", "https://"):
        session.mount(prefix, _Adapter(max_retries=0))
    if http.proxy:
        session.proxies = {"http": http.proxy, "https": http.proxy}
    return session


def upload(archive: Archive, target: dict[str, Any], http: HttpConfig,
           progress: Callable[[int], None] | None = None,
           cancel: threading.Event | None = None, timeout_s: float | None = None) -> None:
    """PUT or POST ``archive`` to ``target`` (``{url, method, headers}``), all tries within
    ``timeout_s`` (default ``http.transfer_timeout_s``).

    :param progress: told the bytes sent so far of the current try, as they go.
    :param cancel: set, the upload stops within a second, the try in flight too.

    :raises TaskFailed: ``cancelled`` on the cancel; ``stage_out_failed`` after the last
        try or at the deadline.  The message names the redacted URL and the last error,
        never the query string or a header.
    """
    verify: bool | str = http.ca_file or True
    headers = {**target.get("headers", {}), "Content-Length": str(archive.size)}
    headers.setdefault("Content-Type", "application/gzip")
    shown = redact_url(target["url"])
    last = ""
    retries, backoff_s = max(1, http.upload_tries), http.retry_backoff_s
    limit_s = http.transfer_timeout_s if timeout_s is None else timeout_s
    watch = _Watch(cancel or threading.Event(), time.monotonic() + limit_s)
    with _session(http) as session, watch.watching():
        for attempt in range(1, retries + 1):
            try:
                with archive.path.open("rb") as f:
                    body = _Counted(f, archive.size, progress) if progress else f
                    resp = session.request(
                        target.get("method", "PUT"), target["url"], data=body,
                        headers=headers, allow_redirects=False, timeout=TIMEOUT_S,
                        verify=verify,
                    )
                resp.close()
                if 200 <= resp.status_code < 300:
                    return
                last = f"HTTP {resp.status_code}"
                if 300 <= resp.status_code < 400:
                    last += " (redirects are not followed)"
                    break
                if 400 <= resp.status_code < 500 and resp.status_code not in (408, 425, 429):
                    break
            except (requests.RequestException, UnicodeError) as e:
                # UnicodeError: a URL or header the HTTP client cannot encode (intake refuses
                # them; one journaled by an older version must still end the task)
                last = type(e).__name__
            if attempt == retries or watch.fire():
                break
            delay = min(backoff_s * 2 ** (attempt - 1), BACKOFF_MAX_S)
            log.warning("upload to %s failed (%s), try %d of %d in %.1fs",
                        shown, last, attempt, retries, delay)
            if watch.cancel.wait(min(delay, max(0.0, watch.remaining()))) or watch.fire():
                break
    code = "stage_out_failed"
    if watch.fire() and watch.reason == "cancelled":
        last = code = "cancelled"
    elif watch.reason:
        last = f"not done within {limit_s:g}s" + (
            " (http.transfer_timeout_s)" if timeout_s is None else "")
    raise TaskFailed(f"upload of {archive.path.name} to {shown} failed: {last}",
                     code=code, stage="stage_out")
