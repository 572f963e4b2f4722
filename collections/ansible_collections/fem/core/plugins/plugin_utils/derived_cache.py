# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""What Ansible and Mitogen derive from installed files, kept on disk between playbook runs.

Why: every task is a new ``ansible-playbook`` process, and some of its work is a pure function
of files that do not change between tasks: the routing metadata of ansible.builtin (a 9000-line
YAML file parsed on every start) and the imports Mitogen's module server scans for in every
module it sends.  Each run redoing it cost a task about a fifth of its controller CPU
(bench/RESULTS.md).  The callers are fem-ansible's ``ansible-playbook``
(:mod:`fem_ansible.playbook_cli`, which loads this file by its path under its collection
name, so a process has one copy) and fem.core's ``mitogen_linear`` strategy plugin.

An entry is a marshalled value named by a hash of everything it was derived from (the caller
builds the name with :func:`entry_name`), so a changed input is a new entry, never a stale
one.  Entries are loaded by ``marshal``, so they must be as trusted as the listener's own
files: the directory (``FEM_IMPORT_SCAN_CACHE``, the listener's
``<work_dir>/import-scan-cache``) is opened once per process without following a symbolic
link and used only if it is this user's and nobody else may read, write or enter it, and an
entry only if it is such a regular file.  Otherwise nothing is kept: slower, not different.

This module is imported into Ansible's processes, and by path before Ansible's collection
loader exists: it must stay free of anything but the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import marshal
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

CACHE_ENV = "FEM_IMPORT_SCAN_CACHE"

_lock = threading.Lock()
_UNOPENED = -2
_dir_fd = _UNOPENED  # the directory, opened once per process; -1: none


def entry_name(kind: bytes, *parts: bytes) -> str:
    """The name of the entry derived from ``parts`` by ``kind``: a hash that also holds the
    interpreter's bytecode magic and optimisation level, which marshalled values and code
    objects depend on."""
    digest = hashlib.sha256()
    for part in (kind, importlib.util.MAGIC_NUMBER, b"%d" % sys.flags.optimize, *parts):
        digest.update(b"%d:" % len(part))
        digest.update(part)
    return digest.hexdigest()


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _open_dir(path: str) -> int:
    if not path:
        return -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return -1
    if _private(os.fstat(fd)):
        return fd
    os.close(fd)
    return -1


def _cache_dir() -> int:
    global _dir_fd
    if _dir_fd != _UNOPENED:  # no lock once open: a worker forked while it is held
        return _dir_fd
    with _lock:
        if _dir_fd == _UNOPENED:
            _dir_fd = _open_dir(os.environ.get(CACHE_ENV, ""))
        return _dir_fd


def _load(dir_fd: int, name: str) -> Any:
    """The value of entry ``name``, if it is a private regular file; else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) and _private(st)):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            return marshal.loads(f.read())
        except (OSError, EOFError, ValueError, TypeError):
            return None


def _store(dir_fd: int, name: str, value: Any) -> None:
    """Write entry ``name`` (mode 0600) whole or not at all: other threads and runs may read
    it at any moment.  A temp file a killed run leaves is removed by the next listener start
    (fem_ansible.runner.scan_cache_dir)."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as f:
            f.write(marshal.dumps(value))
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except (OSError, ValueError):  # full disk, read-only, not marshallable: not kept
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)


def cached(name: str, derive: Callable[[], Any], valid: Callable[[Any], bool],
           keep: Callable[[Any], bool] | None = None) -> Any:
    """The value of entry ``name`` if it is kept and ``valid``; else ``derive()``, kept
    unless ``keep`` says not to.

    A new object every call: callers may change what they get.
    """
    dir_fd = _cache_dir()
    if dir_fd < 0:
        return derive()
    value = _load(dir_fd, name)
    if value is None or not valid(value):
        value = derive()
        if keep is None or keep(value):
            _store(dir_fd, name, value)
    return value
