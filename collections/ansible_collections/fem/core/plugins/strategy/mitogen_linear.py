# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Mitogen's linear strategy, without the per-run work of Mitogen's module server that gives
the same answer every run.

Why: every playbook run starts a new Mitogen multiplexer, and before it sends a module to a
host it compiles that module's source to find what it imports (``find_related_imports``,
``ansible_mitogen.module_finder``) and minifies Mitogen's own modules; a fresh process has
no cache, so each run paid ~1 CPU-s for it, on the critical path of the first module call
(bench/RESULTS.md).

- Import scans: the code objects compiled only to read their imports are kept on disk in
  ``FEM_IMPORT_SCAN_CACHE`` (the listener's ``<work_dir>/import-scan-cache``, mode 0700),
  named by a hash of the interpreter's bytecode magic and optimisation level, the file name
  and the source.  They are never executed: what a host runs is still the source Mitogen
  sends, so an entry cannot change what runs, only which related modules Mitogen offers
  ahead of time.  The directory (never through a symbolic link) and each entry are used
  only if they are this user's and nobody else may read, write or enter them; otherwise
  scans are cached for the run only.
- Minifying: off.  Mitogen then sends its own modules as they are installed, comments and
  all (about 65 kB more per run and host, compressed: 120 kB instead of 55); caching
  minified source instead would keep code that hosts execute in a cache.

If a Mitogen release stops calling what is replaced here, the replacements are never called
and runs are as with Mitogen's own ``mitogen_linear``: slower, not different.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import importlib.util
import marshal
import os
import stat
import sys
import threading
from types import CodeType

import ansible_mitogen.loaders
import ansible_mitogen.module_finder
import ansible_mitogen.strategy
import mitogen.master
import mitogen.minify

DOCUMENTATION = r"""
name: mitogen_linear
short_description: Mitogen's linear strategy, with its import scans cached between runs
description:
  - C(mitogen_linear) of the installed Mitogen; the code objects its module server compiles
    to find a module's imports are kept in E(FEM_IMPORT_SCAN_CACHE) between runs, and
    Mitogen's own modules are sent unminified.
author: fem-ansible developers
"""

CACHE_ENV = "FEM_IMPORT_SCAN_CACHE"

_compile = builtins.compile
_scans: dict[str, CodeType] = {}
_dir_lock = threading.Lock()
_UNOPENED = -2
_dir_fd = _UNOPENED  # the cache directory, opened once per process; -1: none


def _private(st: os.stat_result) -> bool:
    """Whether a file is this user's and nobody else may read, write or enter it: entries
    are unmarshalled, so they must be as trusted as the listener's own files."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _open_dir(path: str) -> int:
    """``path`` opened as a directory (never through a symbolic link) if it is private,
    else -1: the scans are then kept for the run only."""
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
    with _dir_lock:
        if _dir_fd == _UNOPENED:
            _dir_fd = _open_dir(os.environ.get(CACHE_ENV, ""))
        return _dir_fd


def _load(dir_fd: int, name: str) -> CodeType | None:
    """The entry ``name``, if it is a private regular file holding a code object."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not (stat.S_ISREG(st.st_mode) and _private(st)):
            return None
        try:
            code = marshal.loads(f.read())
        except (OSError, EOFError, ValueError, TypeError):
            return None
    return code if isinstance(code, CodeType) else None


def _store(dir_fd: int, name: str, code: CodeType) -> None:
    """Write the entry ``name`` (mode 0600) whole or not at all: the multiplexer's threads
    and other runs may read it at any moment.  A temp file a killed run leaves is removed
    by the next listener start (fem_ansible.runner.scan_cache_dir)."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as f:
            f.write(marshal.dumps(code))
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:  # full disk, read-only: the scan is still right, just not kept
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)


def cached_compile(source, filename, mode, *args, **kwargs):
    """``compile`` for the callers below, which compile a module's whole source only to read
    its imports; anything else goes to the built-in ``compile`` unchanged."""
    if args or kwargs or mode != "exec" or not isinstance(source, (bytes, str)):
        return _compile(source, filename, mode, *args, **kwargs)
    data = source.encode("utf-8") if isinstance(source, str) else source
    key = hashlib.sha256(b"".join((
        importlib.util.MAGIC_NUMBER, b"%d" % sys.flags.optimize,
        b"s" if isinstance(source, str) else b"b", os.fsencode(str(filename)), b"\0", data,
    ))).hexdigest()
    code = _scans.get(key)
    if code is None:
        dir_fd = _cache_dir()
        code = _load(dir_fd, key) if dir_fd >= 0 else None
        if code is None:
            # dont_inherit: as the callers' own compile(), not under this file's __future__
            code = _compile(source, filename, mode, 0, True)
            if dir_fd >= 0:
                _store(dir_fd, key, code)
        code = _scans.setdefault(key, code)
    return code


def _unminified(source):
    """Mitogen's ``minimize_source`` (source in, text out), without the minifying."""
    return source.decode("utf-8") if isinstance(source, bytes) else source


# Module attributes shadow the built-in ``compile`` for these two modules only.
mitogen.master.compile = cached_compile
ansible_mitogen.module_finder.compile = cached_compile
mitogen.minify.minimize_source = _unminified

_Base = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Base):
    """Mitogen's ``mitogen_linear``."""
