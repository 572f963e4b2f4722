"""Role files parsed once, in the resident Ansible, and handed to each run it forks (fast
path group ``parsed_roles``; docs/decisions.md, "Role files are parsed once").

Why: every run parses the YAML of every role it uses (tasks, defaults, vars, meta with the
argument specs, handlers), the same files in every task, and Ansible's loader then copies
each result whole before handing it out: 0.2-0.3 CPU-s of a trivial task's run process
(bench/RESULTS.md).  The resident Ansible (fem_ansible.resident_server) forks each run from
its own memory, so what it parsed ahead is each run's own private copy, free.

What the server parses: only what its runs parsed themselves, cheaply.  A run tells the
server, as it ends, which role files it parsed (:func:`report`): each file's path, the
SHA-256 of its bytes and the CPU its parse took.  The server parses those very bytes, when
it has nothing else to do, a file at a time, giving up between files for a waiting run
(:func:`work`); a file whose parse took a run more than :data:`MAX_COST_S`, or beyond
:data:`MAX_TOTAL_S` for all, or that changed since the run read it, is left to the runs.
So the server reads no file a run did not read, spends no more on a file than a run did,
and holds no more than that much parsing.

Exact, by construction:

- An entry is Ansible's parse of the file's bytes (``DataLoader.load`` of the text trusted
  as template, under the file's path: what ``load_from_file`` makes of those bytes with the
  flags roles load with), and a second copy made ahead.
- A run uses an entry only for a load with those flags, the first time its loader asks for
  that path, and only if the file's bytes now hash to the entry's: a changed file, however
  its timestamps read, is parsed by the run.  The loader's cache then holds the first copy
  and the caller gets the second, as Ansible's own load leaves them; later loads are
  Ansible's.
- A file whose parse said anything (a warning, a deprecation) or failed, that is not
  UTF-8, or that holds vault data, is not kept: the run parses it and says it, or reads its
  secret, itself.
- A run takes an entry out as it uses it, in its own copy of the memory: no two runs, no
  two loads share an object.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

from ansible.parsing.dataloader import DataLoader
from ansible.template import trust_as_template
from ansible.utils.display import Display

#: A file whose parse took a run more CPU than this is left to the runs (a run waiting for
#: the server waits at most about this long for it to finish a file).
MAX_COST_S = 0.1
#: The parse CPU, as the runs measured it, of all files kept: a bound on the server's time
#: and memory for them (the built-in roles: about 0.25).
MAX_TOTAL_S = 1.0
#: Files larger than this are parsed per run; no more files than this are kept.
MAX_FILE = 256 * 1024
MAX_FILES = 2000
#: What marks vault data (a whole file's or an inline ``!vault`` value's header).
_VAULT = b"$ANSIBLE_VAULT"

#: path -> (SHA-256 of its bytes, the loader cache's copy, the caller's copy, parse CPU)
_entries: dict[str, tuple[bytes, Any, Any, float]] = {}
#: In the server: what runs reported, to parse (path -> SHA-256, parse CPU).
_wanted: dict[str, tuple[bytes, float]] = {}
#: In a run: the role files it parsed itself (path -> SHA-256, parse CPU).
_used: dict[str, tuple[bytes, float]] = {}
#: In the server: files whose bytes it would not keep (path -> SHA-256): not parsed again.
_refused: dict[str, bytes] = {}
_state = {"on": False}
_display = Display()


def in_a_role(path: str) -> bool:
    """Whether ``path`` is a file of a role on the roles path, spelled as role lookup spells
    it (``<roles path entry>/<role>``, resolved, then the file's path in the role): the
    task's own files (its extra vars, the run's private data) and playbooks are not."""
    from ansible import constants

    entries = constants.DEFAULT_ROLES_PATH or []
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        name = os.path.basename(parent)
        if any(os.path.realpath(os.path.join(entry, name)) == parent for entry in entries):
            return True
        parent = os.path.dirname(parent)
    return False


def _read(path: str) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most :data:`MAX_FILE` bytes,
    read without blocking (a FIFO or device in its place is not read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
            return None
        data = f.read(MAX_FILE + 1)
    return data if len(data) <= MAX_FILE else None


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


def _parse(path: str, digest: bytes) -> tuple[Any, Any] | None:
    """Ansible's parse of ``path``'s bytes and a copy, if they still hash to ``digest``;
    None where the run should parse the file."""
    try:
        data = _read(path)
        if data is None or hashlib.sha256(data).digest() != digest or _VAULT in data:
            return None
        with _noticing() as said:
            value = DataLoader().load(data=trust_as_template(data.decode("utf-8")),
                                      file_name=path)
        return None if said else (value, copy.deepcopy(value))
    except Exception:  # not UTF-8, not YAML, too deep to copy: the run parses it
        return None


def load_from_file(stock: Any) -> Any:
    """Ansible's ``DataLoader.load_from_file`` (``stock``): a role file's first load
    answered from its entry where its bytes are the entry's, else parsed as always and
    noted for :func:`report`."""

    def load(self: DataLoader, file_name: str, cache: str = "all", unsafe: bool = False,
             json_only: bool = False, trusted_as_template: bool = False) -> Any:
        def parse() -> Any:
            return stock(self, file_name, cache=cache, unsafe=unsafe, json_only=json_only,
                         trusted_as_template=trusted_as_template)

        if not (cache == "all" and not unsafe and not json_only and trusted_as_template):
            return parse()
        path = self.path_dwim(file_name)
        if path in self._FILE_CACHE:
            return parse()
        try:
            data = _read(path) if stat.S_ISREG(os.stat(path).st_mode) else None
        except OSError:
            data = None
        if data is None:
            return parse()
        digest = hashlib.sha256(data).digest()
        entry = _entries.pop(path, None)
        if entry is not None and entry[0] == digest:
            _display.debug(f"Loading data from {path}")
            self._FILE_CACHE[path] = entry[1]
            return entry[2]
        started = time.process_time()
        value = parse()
        if in_a_role(path):
            _used[path] = (digest, time.process_time() - started)
        return value

    return load


def install() -> None:
    """In the server, once: runs forked from it answer role loads from its entries and note
    what they parse themselves."""
    if not _state["on"]:
        _state["on"] = True
        DataLoader.load_from_file = load_from_file(DataLoader.load_from_file)  # type: ignore[method-assign]


def report(path: str) -> None:
    """In a run, as it ends: write what it parsed itself, cheaply, for its server (whole or
    not at all; within what :func:`learn` reads)."""
    if not (_state["on"] and _used):
        return
    lines, size = [], 2
    for p, (d, c) in _used.items():
        if c > MAX_COST_S:
            continue
        line = [p, d.hex(), round(c, 6)]
        size += len(json.dumps(line)) + 2
        if size > MAX_FILE or len(lines) >= MAX_FILES:
            break
        lines.append(line)
    tmp = f"{path}.tmp"
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(lines, f)
        os.replace(tmp, path)


def learn(path: str) -> None:
    """In the server, as a run ends: take in what it reported (``path``; it and a killed
    run's temp file are removed)."""
    try:
        data = _read(path)
    except OSError:
        data = None
    for leftover in (path, f"{path}.tmp"):
        with contextlib.suppress(OSError):
            os.unlink(leftover)
    if not (_state["on"] and data):
        return
    try:
        lines = json.loads(data)
        for line in lines if isinstance(lines, list) else []:
            if len(_wanted) >= MAX_FILES:
                break
            if (isinstance(line, list) and len(line) == 3 and isinstance(line[0], str)
                    and isinstance(line[1], str) and len(line[1]) == 64
                    and isinstance(line[2], (int, float)) and 0 <= line[2] <= MAX_COST_S
                    and in_a_role(line[0])):
                digest = bytes.fromhex(line[1])
                if _refused.get(line[0]) != digest:
                    _wanted[line[0]] = (digest, float(line[2]))
    except Exception:  # not a report (not JSON, nested too deep, not hex): nothing learnt
        return


def _room(cost: float, replacing: bool) -> bool:
    return (sum(e[3] for e in _entries.values()) + cost <= MAX_TOTAL_S
            and (replacing or len(_entries) < MAX_FILES))


def _evict_stale() -> None:
    """Forget the entries whose files are gone or changed (a role removed or edited since)."""
    for path, entry in list(_entries.items()):
        try:
            data = _read(path)
        except OSError:
            data = None
        if data is None or hashlib.sha256(data).digest() != entry[0]:
            del _entries[path]


def kept() -> tuple[int, float]:
    """How many files the server keeps parsed, and the runs' parse CPU they stand for."""
    return len(_entries), sum(e[3] for e in _entries.values())


def pending() -> bool:
    """Whether the server has parsing to do."""
    return bool(_wanted)


def work(seconds: float, stop: Callable[[], bool]) -> str | None:
    """Parse what runs reported for about ``seconds`` (a file may take up to
    :data:`MAX_COST_S` more), or until ``stop()`` says a run is waiting, between files.
    What went wrong, if anything did: parsing then stops for good (entries stay valid)."""
    deadline = time.monotonic() + seconds
    try:
        while _wanted:
            path, (digest, cost) = _wanted.popitem()
            entry = _entries.get(path)
            if entry is not None and entry[0] == digest:
                continue
            more = cost - (entry[3] if entry else 0.0)
            if not _room(more, entry is not None):
                _evict_stale()  # may drop this path's own old entry: counted again
                entry = _entries.get(path)
                more = cost - (entry[3] if entry else 0.0)
            if _room(more, entry is not None):
                parsed = _parse(path, digest)
                if parsed is None:
                    _refused[path] = digest
                    if len(_refused) > MAX_FILES:
                        _refused.pop(next(iter(_refused)))
                else:
                    _entries[path] = (digest, *parsed, cost)
            if time.monotonic() >= deadline or stop():
                break
    except Exception as e:  # never the server's end; runs parse what is not kept
        _wanted.clear()
        _state["on"] = False
        return f"role files no longer parsed ahead: {e!r}"
    return None
