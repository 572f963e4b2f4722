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
  named by a hash of the interpreter's bytecode magic, the file name and the source.  They
  are never executed: what a host runs is still the source Mitogen sends, so a stale entry
  cannot change what runs, only which related modules Mitogen offers ahead of time.  The
  directory is used only if it is this user's and nobody else can write to it; otherwise
  scans are cached for the run only.
- Minifying: off.  Mitogen then sends its own modules as they are installed, comments and
  all (a few kB more per run, compressed); caching minified source instead would keep code
  that hosts execute in a cache.

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


def _private_dir(path: str) -> bool:
    """Whether ``path`` is a directory of this user's that nobody else can write to: an
    entry in it is unmarshalled, so it must be as trusted as the listener's own files."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _store(path: str, code: CodeType) -> None:
    """Write ``code`` to ``path`` whole or not at all: the multiplexer's threads and other
    runs may read it at any moment."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(marshal.dumps(code))
        os.replace(tmp, path)
    except OSError:  # full disk, read-only: the scan is still right, just not kept
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def cached_compile(source, filename, mode, *args, **kwargs):
    """``compile`` for the callers below, which compile a module's whole source only to read
    its imports; anything else goes to the built-in ``compile`` unchanged."""
    if args or kwargs or mode != "exec" or not isinstance(source, (bytes, str)):
        return _compile(source, filename, mode, *args, **kwargs)
    data = source.encode("utf-8") if isinstance(source, str) else source
    key = hashlib.sha256(importlib.util.MAGIC_NUMBER + os.fsencode(str(filename)) + b"\0"
                         + data).hexdigest()
    code = _scans.get(key)
    if code is not None:
        return code
    cache = os.environ.get(CACHE_ENV, "")
    path = os.path.join(cache, key) if cache and _private_dir(cache) else None
    if path:
        try:
            with open(path, "rb") as f:
                code = marshal.loads(f.read())
        except (OSError, EOFError, ValueError, TypeError):
            code = None
    if not isinstance(code, CodeType):
        code = _compile(source, filename, mode)
        if path:
            _store(path, code)
    return _scans.setdefault(key, code)


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
