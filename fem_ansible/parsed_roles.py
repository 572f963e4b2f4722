"""Role files parsed once, in the resident Ansible, and handed to each run it forks (fast
path group ``parsed_roles``; docs/decisions.md, "Role files are parsed once").

Why: every run parses the YAML of every role it uses (tasks, defaults, vars, meta with the
argument specs, handlers), the same files in every task, and Ansible's loader then copies
each result whole before handing it out: 0.2-0.3 CPU-s of a trivial task's run process
(bench/RESULTS.md).  The resident Ansible (fem_ansible.resident_server) forks each run from
its own memory, so what it parsed ahead is each run's own private copy, free.

Exact, by construction:

- An entry is the parse Ansible's own loader makes of the file (``load_from_file`` with the
  flags roles load with), under the path Ansible will ask for, with a second copy made
  ahead; it is used only for a load with those same flags, the first time this loader
  asks for that path, and only while the file is the one parsed (device, inode, size,
  mtime and ctime).  The loader's cache then holds the first copy and the caller gets the
  second, as Ansible's own load leaves them; later loads are Ansible's.
- A file changed less than :data:`SETTLE_S` before it would be parsed is left for later: a
  same-size change within the file system's timestamp granularity would otherwise look
  unchanged.
- A file whose parse said anything (a warning, a deprecation) or failed, or that holds
  vault data, is not kept: the run parses it and says it, or reads its secret, itself.
- A run takes an entry out as it uses it, in its own copy of the memory: no two runs, no
  two loads share an object.

The server parses when it has nothing else to do, a file at a time, and stops as soon as a
run asks for it (:func:`work`): a run never waits for a parse.  It looks again every
:data:`PASS_S` for what changed.  Only regular files are opened, never blocking, within
bounds of depth, count, size and bytes kept.  A miss (a path Ansible spells otherwise, a
file not parsed yet or changed since) only costs the parse the run would have made anyway.
"""

from __future__ import annotations

import contextlib
import copy
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ansible.parsing.dataloader import DataLoader
from ansible.utils.display import Display
from ansible.utils.path import unfrackpath

#: What a role is read from (ansible.playbook.role: ``_load_role_yaml``'s subdirs).
SUBDIRS = ("tasks", "handlers", "vars", "defaults", "meta")
#: The extensions Ansible tries for a role's files.
EXTENSIONS = (".yml", ".yaml", ".json")
#: Bounds: a file larger than this is parsed per run; no more bytes than this are kept in
#: all (their parse takes about 55 times their size in memory, two copies); no more than
#: this many names are looked at a pass, no deeper than this below a role's subdir.
MAX_FILE = 256 * 1024
MAX_BYTES = 2 * 1024 * 1024
MAX_NAMES = 5000
MAX_DEPTH = 8
#: A file changed this recently is parsed later (coarse timestamps; a clock a little off).
SETTLE_S = 3.0
#: How often the server looks again for changed, new and removed files.
PASS_S = 60.0
#: What marks vault data (a whole file's or an inline ``!vault`` value's header).
_VAULT = b"$ANSIBLE_VAULT"

Identity = tuple[int, int, int, int, int]
#: path -> (identity, the loader cache's copy, the caller's copy)
_entries: dict[str, tuple[Identity, Any, Any]] = {}
_display = Display()


def _identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _names(roles_path: Iterable[str]) -> Iterator[str]:
    """Every role file name on ``roles_path``, spelled as Ansible's loader asks for it (the
    role's dir resolved as role lookup resolves it, the rest joined and normalised); at
    most :data:`MAX_NAMES`, no deeper than :data:`MAX_DEPTH`, symbolic links to dirs not
    followed below a role's subdir (os.walk's default, as a loop, not a recursion)."""
    count = 0
    for entry in roles_path:
        with contextlib.suppress(OSError):
            roles = sorted(os.listdir(entry))
            for name in roles:
                role = unfrackpath(os.path.join(entry, name))
                dirs = [(os.path.join(role, sub), 0) for sub in reversed(SUBDIRS)]
                while dirs:
                    top, depth = dirs.pop()
                    with contextlib.suppress(OSError), os.scandir(top) as found:
                        for item in sorted(found, key=lambda e: e.name, reverse=True):
                            count += 1
                            if count > MAX_NAMES:
                                return
                            if item.is_dir(follow_symlinks=False):
                                if depth < MAX_DEPTH:
                                    dirs.append((item.path, depth + 1))
                            elif item.name.endswith(EXTENSIONS):
                                yield unfrackpath(item.path, follow=False)


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


def _regular(path: str) -> Identity | None:
    """The identity of ``path`` if it is a regular file whose bytes hold no vault data,
    read without blocking (a FIFO or device in its place is not opened for reading)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE
                or _VAULT in f.read(MAX_FILE + 1)):
            return None
    return _identity(st)


def _parse(path: str) -> tuple[Identity, Any, Any] | None:
    """Ansible's parse of ``path`` and a copy, or None where the run should parse it."""
    try:
        before = _regular(path)
        if before is None:
            return None
        with _noticing() as said:
            data = DataLoader().load_from_file(path, cache="none", unsafe=True,
                                               trusted_as_template=True)
        if said or _identity(os.stat(path)) != before:
            return None
        return before, data, copy.deepcopy(data)
    except Exception:  # the run parses it and fails, or not, as Ansible does
        return None


class _Parser:
    """The server's parsing, done in slices (one pass at a time over the roles path)."""

    def __init__(self, roles_path: list[str]) -> None:
        self.roles_path = roles_path
        self.todo: Iterator[str] | None = None
        self.seen: set[str] = set()
        self.refused: dict[str, Identity] = {}  # not kept as it is: not parsed again
        self.unsettled = False
        self.next_pass = 0.0
        self.kept = 0  # bytes of the files kept

    def pending(self) -> bool:
        return self.todo is not None or time.monotonic() >= self.next_pass

    def work(self, deadline: float, stop: Callable[[], bool]) -> None:
        if self.todo is None:
            self.todo, self.seen, self.unsettled = _names(self.roles_path), set(), False
        for path in self.todo:
            self.seen.add(path)
            self._look(path)
            if time.monotonic() >= deadline or stop():
                return
        for gone in set(_entries) - self.seen:
            self.kept -= _entries.pop(gone)[0][2]
        for gone in set(self.refused) - self.seen:
            del self.refused[gone]
        self.todo = None
        self.next_pass = time.monotonic() + (SETTLE_S if self.unsettled else PASS_S)

    def _look(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        now = _identity(st)
        entry = _entries.get(path)
        if (entry is not None and entry[0] == now) or self.refused.get(path) == now:
            return
        if entry is not None:
            self.kept -= _entries.pop(path)[0][2]
        if max(st.st_mtime_ns, st.st_ctime_ns) > time.time_ns() - SETTLE_S * 1e9:
            self.unsettled = True
            return
        parsed = _parse(path) if self.kept + st.st_size <= MAX_BYTES else None
        if parsed is None or parsed[0] != now:
            self.refused[path] = now
        else:
            _entries[path] = parsed
            self.kept += st.st_size


_parser: _Parser | None = None


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
                    if _identity(os.stat(path)) == entry[0]:
                        _display.debug(f"Loading data from {path}")
                        self._FILE_CACHE[path] = entry[1]
                        return entry[2]
        return stock(self, file_name, cache=cache, unsafe=unsafe, json_only=json_only,
                     trusted_as_template=trusted_as_template)

    return load


def install(roles_path: Iterable[str]) -> None:
    """In the server: answer the runs' loads of role files on ``roles_path`` from what
    :func:`work` will have parsed by then."""
    global _parser
    _parser = _Parser(list(roles_path))
    DataLoader.load_from_file = load_from_file(DataLoader.load_from_file)  # type: ignore[method-assign]


def pending() -> bool:
    """Whether the server has parsing to do now."""
    return _parser is not None and _parser.pending()


def work(seconds: float, stop: Callable[[], bool]) -> str | None:
    """Parse for about ``seconds`` (one file may take longer), or until ``stop()`` says a
    run is waiting, between files; a file left is taken up by the next call.  What went
    wrong, if anything did: parsing then stops for good (entries kept stay valid)."""
    global _parser
    if _parser is None:
        return None
    try:
        _parser.work(time.monotonic() + seconds, stop)
    except Exception as e:  # never the server's end; runs parse what is not kept
        _parser = None
        return f"role files no longer parsed ahead: {e!r}"
    return None
