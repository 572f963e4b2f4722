"""Role files parsed once, in the resident Ansible, and handed to each run it forks (fast
path group ``parsed_roles``; docs/decisions.md, "Role files are parsed once").

Why: every run parses the YAML of every role it uses (tasks, defaults, vars, meta with the
argument specs, handlers), the same files in every task, and Ansible's loader then copies
each result whole before handing it out: 0.2-0.4 CPU-s of a trivial task's run process
(bench/RESULTS.md).  The resident Ansible (fem_ansible.resident_server) forks each run from
its own memory, so what it parsed ahead is each run's own private copy, free.

Exact, by construction:

- An entry is the parse Ansible's own loader makes of the file (``load_from_file`` with the
  flags roles load with), under the path Ansible will ask for, with a second copy made
  ahead; it is used only for a load with those same flags, the first time this loader
  asks for that path, and only while the file is the one parsed (device, inode, size,
  mtime and ctime).  The loader's cache then holds the first copy and the caller gets the
  second, as Ansible's own load leaves them; later loads are Ansible's.
- A file whose parse said anything (a warning, a deprecation) or failed, or that holds
  vault data, is not kept: the run parses it and says it, or reads its secret, itself.
- A run takes an entry out as it uses it, in its own copy of the memory: no two runs, no
  two loads share an object.

The server parses the files on its roles path at start, and again after each fork what
has changed since, for the next run; a miss (a path Ansible spells otherwise, a file
changed since) only costs the parse the run would have made anyway.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator
from typing import Any

from ansible.parsing.dataloader import DataLoader
from ansible.utils.display import Display
from ansible.utils.path import unfrackpath

#: What a role is read from (ansible.playbook.role: ``_load_role_yaml``'s subdirs).
SUBDIRS = ("tasks", "handlers", "vars", "defaults", "meta")
#: The extensions Ansible tries for a role's files.
EXTENSIONS = (".yml", ".yaml", ".json")
#: Bounds on what a server keeps: files larger than this are parsed per run, and no more
#: files or bytes than this are kept (a roles path holding far more than roles).
MAX_FILE = 1024 * 1024
MAX_FILES = 2000
MAX_BYTES = 32 * 1024 * 1024
#: What marks vault data (a whole file's or an inline ``!vault`` value's header).
_VAULT = b"$ANSIBLE_VAULT"

#: path -> (identity, the loader cache's copy, the caller's copy)
_entries: dict[str, tuple[tuple[int, ...], Any, Any]] = {}
_roles_path: list[str] = []
_display = Display()


def _identity(path: str) -> tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _files(roles_path: Iterable[str]) -> Iterator[str]:
    """Every role file on ``roles_path``, spelled as Ansible's loader asks for it: the
    role's dir resolved as role lookup resolves it, the rest joined and normalised."""
    for entry in roles_path:
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(entry)):
                role = unfrackpath(os.path.join(entry, name))
                for sub in SUBDIRS:
                    for top, dirs, files in os.walk(os.path.join(role, sub)):
                        dirs.sort()
                        for file in sorted(files):
                            if file.endswith(EXTENSIONS):
                                yield unfrackpath(os.path.join(top, file), follow=False)


@contextlib.contextmanager
def _noticing() -> Iterator[list[str]]:
    """What Ansible's display is asked to say while this runs, said nowhere."""
    said: list[str] = []
    names = ("warning", "deprecated", "error_as_warning")
    saved = {name: getattr(Display, name) for name in names}

    def note(_self: Display, *args: Any, **kwargs: Any) -> None:
        said.append(repr((args, kwargs)))

    for name in names:
        setattr(Display, name, note)
    try:
        yield said
    finally:
        for name, method in saved.items():
            setattr(Display, name, method)


def _parse(path: str) -> tuple[tuple[int, ...], Any, Any] | None:
    try:
        before = _identity(path)
        if before[2] > MAX_FILE:
            return None
        with open(path, "rb") as f:
            if _VAULT in f.read():
                return None
        with _noticing() as said:
            data = DataLoader().load_from_file(path, cache="none", unsafe=True,
                                               trusted_as_template=True)
        if said or _identity(path) != before:
            return None
    except Exception:  # the run parses it and fails as Ansible fails
        return None
    return before, data, copy.deepcopy(data)


def refresh() -> None:
    """Parse what is new or changed on the roles path since the last call; forget what is
    gone.  In the server, between runs."""
    seen: dict[str, tuple[tuple[int, ...], Any, Any]] = {}
    size = 0
    for path in _files(_roles_path):
        if len(seen) >= MAX_FILES:
            break
        entry = _entries.get(path)
        with contextlib.suppress(OSError):
            if entry is None or entry[0] != _identity(path):
                entry = _parse(path)
        if entry is not None and size + entry[0][2] <= MAX_BYTES:
            seen[path] = entry
            size += entry[0][2]
    _entries.clear()
    _entries.update(seen)


def load_from_file(stock: Any) -> Any:
    """Ansible's ``DataLoader.load_from_file`` (``stock``), answering a role file's first
    load from its entry."""

    def load(self: DataLoader, file_name: str, cache: str = "all", unsafe: bool = False,
             json_only: bool = False, trusted_as_template: bool = False) -> Any:
        if _entries and cache == "all" and not unsafe and not json_only and trusted_as_template:
            path = self.path_dwim(file_name)
            entry = _entries.pop(path, None)
            if entry is not None and path not in self._FILE_CACHE:
                with contextlib.suppress(OSError):
                    if _identity(path) == entry[0]:
                        _display.debug(f"Loading data from {path}")
                        self._FILE_CACHE[path] = entry[1]
                        return entry[2]
        return stock(self, file_name, cache=cache, unsafe=unsafe, json_only=json_only,
                     trusted_as_template=trusted_as_template)

    return load


def install(roles_path: Iterable[str]) -> int:
    """In the server: parse ``roles_path``'s role files and answer the runs' loads from
    them; how many files are kept."""
    _roles_path[:] = list(roles_path)
    DataLoader.load_from_file = load_from_file(DataLoader.load_from_file)  # type: ignore[method-assign]
    refresh()
    return len(_entries)
