"""Files on the listener's host: the per-run sandboxes ``<sandbox_path>/<user>/<execution>/``.

Nothing here follows a link the task or a message could have planted, and no path comes
from a message unchecked (:func:`safe_relative`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import RejectedError
from ..fastpath import plugin_utils

# fem.core's walk over trees of any shape, no recursion, no link followed: a sandbox holds
# what a task wrote (issue 26).
tree = plugin_utils("tree", "module_utils")

log = logging.getLogger(__name__)


def run_root(config: Config, user_id: str, execution_id: str) -> Path:
    """The sandbox of one run (what ``send_files`` reads, ``receive_files`` writes, the
    run's outputs are unpacked into, and its tasks see as ``legacy-input``)."""
    return Path(config.legacy.sandbox_path) / user_id / execution_id


def safe_relative(path: Any, where: str) -> str:
    """A normalised relative path with no ``..``, no empty or dot-leading... components."""
    if not isinstance(path, str) or not path or len(path) > 1024 or "\x00" in path:
        raise RejectedError(f"{where}: a relative path is required")
    norm = posixpath.normpath(path)
    if norm != path.removeprefix("./") or path.startswith("/") or norm in (".", "..") or \
            norm.startswith("../") or "\\" in path:
        raise RejectedError(f"{where}: {path[:200]!r} is not a normalised relative path")
    return norm


def extract_outputs(archive: Path, dest: Path) -> list[str]:
    """Unpack the outputs archive into ``dest``: regular files and directories only, names
    relative without ``..``; links and devices are skipped.  Each top-level entry of the
    archive replaces the entry of that name in ``dest`` (so a sandbox's received files stay
    beside the outputs).  Returns the files."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = Path(tempfile.mkdtemp(prefix=".output-", dir=dest.parent))
    files = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in ("", "."):
                    continue
                try:
                    rel = safe_relative(name.rstrip("/"), "archive member")
                except RejectedError:
                    log.warning("outputs archive: skipped member %r", member.name[:200])
                    continue
                target = tmp / rel
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True, mode=0o755)
                elif member.isreg():
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                    src = tar.extractfile(member)
                    assert src is not None
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o644)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out)
                    files.append(rel)
                else:
                    log.warning("outputs archive: skipped %s (not a file or directory)", rel)
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            tree.remove(target)
            entry.rename(target)
    finally:
        tree.remove(tmp)
    return sorted(files)


def read_member(archive: Path, name: str, limit: int) -> bytes | None:
    """One file of a (logs) archive, at most ``limit`` bytes; None when absent."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isreg() and member.name.removeprefix("./") == name:
                    src = tar.extractfile(member)
                    return src.read(limit) if src else None
    except (OSError, tarfile.TarError):
        return None
    return None


def list_files(root: Path) -> list[str]:
    """Regular files under ``root`` (never following links), relative, sorted."""
    return sorted("/".join([*names, name]) for names, name, st, _fd, leaving in tree.walk(root)
                  if not leaving and stat.S_ISREG(st.st_mode))


def open_file(root: Path, rel: str) -> tuple[int, int]:
    """``(fd, size)`` of the regular file ``root/rel``, opened without following a link at
    its end and checked to be inside ``root`` (no link on the way either)."""
    path = root / rel
    if Path(os.path.realpath(path)) != Path(os.path.realpath(root)) / rel:
        raise RejectedError(f"files: {rel!r} is not a file of the run")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise RejectedError(f"files: {rel!r} is not a file of the run") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RejectedError(f"files: {rel!r} is not a file of the run")
    return fd, st.st_size


def files_json(head: dict[str, Any], root: Path, names: list[str], block: int = 3 << 16
               ) -> Iterator[bytes]:
    """The JSON text of ``{**head, files: [{path, size, data (base64), sha256}]}``, in
    pieces: each file is read, encoded and hashed ``block`` bytes at a time."""
    yield json.dumps(head)[:-1].encode() + (b", " if head else b"") + b'"files": ['
    for i, name in enumerate(names):
        fd, size = open_file(root, name)
        with os.fdopen(fd, "rb") as src:
            yield (b", " if i else b"") + json.dumps({"path": name, "size": size}
                                                    )[:-1].encode() + b', "data": "'
            digest, left = hashlib.sha256(), size
            while left > 0:
                data = src.read(min(block, left))
                if not data:
                    raise RejectedError(f"files: {name!r} shrank while it was sent")
                digest.update(data)
                left -= len(data)
                yield base64.b64encode(data).decode("ascii").encode()
        yield f'", "sha256": "{digest.hexdigest()}"}}'.encode()
    yield b"]}"


def write_b64_under(root: Path, rel: str, text: str, max_bytes: int) -> tuple[int, str]:
    """Decode the base64 ``text`` into ``root/rel`` a block at a time (see
    :func:`write_under`); returns ``(size, sha256)``."""
    try:
        base64.b64decode(text[:8], validate=True)
    except (binascii.Error, ValueError):
        raise RejectedError(f"files: {rel!r}: data is not base64") from None
    digest, size = hashlib.sha256(), 0

    def blocks() -> Iterator[bytes]:
        nonlocal size
        step = 4 << 16
        for i in range(0, len(text), step):
            try:
                data = base64.b64decode(text[i:i + step], validate=True)
            except (binascii.Error, ValueError):
                raise RejectedError(f"files: {rel!r}: data is not base64") from None
            size += len(data)
            if size > max_bytes:
                raise RejectedError(f"files: {rel!r} is over the {max_bytes}-byte limit")
            digest.update(data)
            yield data

    write_under(root, rel, blocks())
    return size, digest.hexdigest()


def write_under(root: Path, rel: str, data: bytes | Iterable[bytes]) -> None:
    """Write ``root/rel`` (bytes, or an iterable of blocks) without following a link
    anywhere below ``root``; the file appears whole or not at all."""
    target = root
    for part in Path(rel).parts[:-1]:
        target = target / part
        if target.is_symlink():
            raise RejectedError(f"files: {rel!r} goes through a link")
        target.mkdir(exist_ok=True, mode=0o755)
    target = target / Path(rel).name
    if target.is_symlink() or target.is_dir():
        raise RejectedError(f"files: {rel!r} is not a plain file path")
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            for block in [data] if isinstance(data, bytes) else data:
                out.write(block)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
