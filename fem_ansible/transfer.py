"""Uploads of a task's archives from the listener's host (DESIGN.md §4, §6).

Archives are streamed from disk (never read whole into memory), redirects are never
followed (a redirect could send a presigned body anywhere), and a failed upload is retried
with capped exponential backoff before the task fails ``stage_out_failed``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from .config import HttpConfig
from .errors import TaskFailed
from .refs import redact_url

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
BACKOFF_MAX_S = 30.0
TIMEOUT_S = (10, 300)


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


def upload(archive: Archive, target: dict[str, Any], http: HttpConfig,
           progress: Callable[[int], None] | None = None) -> None:
    """PUT or POST ``archive`` to ``target`` (``{url, method, headers}``).

    :param progress: told the bytes sent so far of the current try, as they go.

    :raises TaskFailed: ``stage_out_failed`` after the last try; the message names the
        redacted URL and the last error, never the query string or a header.
    """
    session = requests.Session()
    session.trust_env = False
    if http.proxy:
        session.proxies = {"http": http.proxy, "https": http.proxy}
    verify: bool | str = http.ca_file or True
    headers = {**target.get("headers", {}), "Content-Length": str(archive.size)}
    headers.setdefault("Content-Type", "application/gzip")
    shown = redact_url(target["url"])
    last = ""
    retries, backoff_s = max(1, http.upload_tries), http.retry_backoff_s
    for attempt in range(1, retries + 1):
        try:
            with archive.path.open("rb") as f:
                body = _Counted(f, archive.size, progress) if progress else f
                resp = session.request(
                    target.get("method", "PUT"), target["url"], data=body, headers=headers,
                    allow_redirects=False, timeout=TIMEOUT_S, verify=verify,
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
        except requests.RequestException as e:
            last = type(e).__name__
        if attempt < retries:
            delay = min(backoff_s * 2 ** (attempt - 1), BACKOFF_MAX_S)
            log.warning("upload to %s failed (%s), try %d of %d in %.1fs",
                        shown, last, attempt, retries, delay)
            time.sleep(delay)
    raise TaskFailed(f"upload of {archive.path.name} to {shown} failed: {last}",
                     code="stage_out_failed", stage="stage_out")
