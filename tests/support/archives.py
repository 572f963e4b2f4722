"""What a test reads back from a run: archives uploaded or kept on the node."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def uploaded_file(env: dict[str, str], url: str) -> bytes:
    """The bytes the shared upload endpoint stored for ``url`` (its path, unquoted)."""
    path = url.split("://", 1)[1].split("/", 1)[1]
    return (Path(env["FEM_TEST_UPLOAD_DIR"]) / path).read_bytes()


def tar_members(data: bytes) -> dict[str, bytes]:
    """The regular files of a ``.tar.gz``, by name without ``./``."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile()}


def tar_entries(data: bytes) -> dict[str, tarfile.TarInfo]:
    """Every member of a ``.tar.gz`` (links and directories too), by name without ``./``."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name.lstrip("./"): m for m in tar.getmembers()}
