"""An upload endpoint that misbehaves after reading the body, for the tests of bounded and
cancellable uploads (issue 26): on 127.0.0.1, its own ephemeral port, in a thread of the test.

Modes (what it answers once it has read a request's head and its ``Content-Length`` body):

* ``trickle`` — a well-formed 200, one byte every ``interval_s``: every socket read of the
  client gets a byte in time, so only an overall deadline or a cancel ends the upload.
* ``cut`` — ``answer`` (by default the first line of a 200, ``HTTP/1.1 200 OK\\r\\n``), then
  the connection closes: the response ends inside its head (or its body).

``tls`` (a server context) makes it an https endpoint.

Use::

    with SlowServer("trickle") as srv:
        url = srv.url + "/outputs.tar.gz"
        ...
        srv.bodies      # bodies read whole, one per request
        srv.open        # connections being answered right now
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from typing import Any, Literal

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class SlowServer:
    def __init__(self, mode: Literal["trickle", "cut"], interval_s: float = 5.0,
                 answer: bytes = b"HTTP/1.1 200 OK\r\n", tls: ssl.SSLContext | None = None):
        self.mode, self.interval_s, self.answer, self.tls = mode, interval_s, answer, tls
        self._sock = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._sock.getsockname()[1]}"
        self.bodies = 0
        self.open = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self) -> SlowServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, self._counted():
            try:
                if self.tls:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                if not self._read_request(conn):
                    return
                if self.mode == "cut":
                    conn.sendall(self.answer)
                    return
                for i in range(len(RESPONSE)):
                    if self._stop.wait(self.interval_s):
                        return
                    conn.sendall(RESPONSE[i:i + 1])
            except OSError:
                return

    @contextlib.contextmanager
    def _counted(self) -> Any:
        with self._lock:
            self.open += 1
        try:
            yield
        finally:
            with self._lock:
                self.open -= 1

    def _read_request(self, conn: socket.socket) -> bool:
        """The head and the ``Content-Length`` body; False when the client went first."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        left = length - len(body)
        while left > 0:
            chunk = conn.recv(min(left, 1 << 20))
            if not chunk:
                return False
            left -= len(chunk)
        with self._lock:
            self.bodies += 1
        return True

    def wait_open(self, count: int, timeout: float = 120) -> None:
        """Until ``count`` connections are being answered (their bodies read)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.open >= count and self.bodies >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.open} connection(s) open, {self.bodies} bodies read; "
                             f"waited for {count}")
