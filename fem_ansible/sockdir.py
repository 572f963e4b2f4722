"""Directories for Unix sockets, short enough for one (a socket path has at most 107 bytes).

SSH ControlPath sockets (fem_ansible.targets) and the resident Ansible's
(fem_ansible.resident) live under the work dir when its path is short, else in a private
dir of this user's under the system's temp dir.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from .errors import ConfigError


def temp_root(room: int, max_len: int) -> str:
    """The system's temp dir, or ``/tmp`` where a path of ``room`` more bytes in it would be
    longer than ``max_len`` (a long ``TMPDIR``)."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) + room <= max_len else "/tmp"


def socket_dir(work_dir: Path, kind: str, key: str, max_len: int) -> Path:
    """``<work_dir>/<kind>/<hash>``, or, when that is longer than ``max_len``,
    ``<tmp>/fem-<kind>-<uid>/<hash>`` (a dir of this user only, mode 0700; ``<tmp>`` is
    :func:`temp_root`'s); the hash is of the work dir and ``key``.  Not made here."""
    name = hashlib.sha256(f"{work_dir}/{key}".encode()).hexdigest()[:12]
    path = work_dir / kind / name
    if len(str(path)) <= max_len:
        return path
    parent = Path(temp_root(len(f"/fem-{kind}-{os.getuid()}/{name}"), max_len)) / \
        f"fem-{kind}-{os.getuid()}"
    parent.mkdir(mode=0o700, exist_ok=True)
    # lstat: a link another user made there, even to a dir of ours, is refused.  A dir of
    # ours in a sticky temp dir cannot be replaced by another user afterwards.
    st = parent.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"{parent} is not this user's private dir: {kind} sockets "
                          f"cannot go there; use a shorter execution.work_dir")
    return parent / name
