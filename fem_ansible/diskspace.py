"""The work dir's file system as one of the node's own resources (issue 28): what is free on
it, against the floor ``execution.min_free_bytes``, said with the file system and the
figures, the same way in the node status, a task's ``disk_full`` error and ``doctor``."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .sizes import format_bytes

# The errors of a write the file system had no room for (a full disk, a quota).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for want of space."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the file system ``path`` (or its nearest existing parent) is on."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def describe(path: str | os.PathLike[str]) -> str:
    """``path``'s file system and its figures: ``/var/lib/fem (on /var): 12.0 MiB free of
    40.0 MiB``; without figures when it cannot be examined."""
    mount = mount_point(path)
    where = str(path) if mount == Path(path).absolute() else f"{path} (on {mount})"
    try:
        st = os.statvfs(path)
    except OSError as e:
        return f"{where}: cannot be examined ({e.strerror})"
    return (f"{where}: {format_bytes(st.f_bavail * st.f_frsize)} free of "
            f"{format_bytes(st.f_blocks * st.f_frsize)}")


def below_floor(path: str | os.PathLike[str], floor: int) -> str | None:
    """Why ``path``'s file system has too little free space for another task, if it has:
    less than ``floor`` bytes free (``execution.min_free_bytes``), or it cannot be examined."""
    try:
        if free_bytes(path) >= floor:
            return None
    except OSError:
        pass
    return f"the work dir {describe(path)}, below execution.min_free_bytes ({format_bytes(floor)})"
