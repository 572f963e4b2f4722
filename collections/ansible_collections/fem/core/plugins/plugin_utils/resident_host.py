# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""The resident host: a Python process that has imported what modules import on the
listener's own host, and forks one Mitogen host interpreter for each run that asks
(docs/decisions.md, "A host interpreter per run, forked ready").

Why: every run's Mitogen multiplexer starts a new Python for the listener's own host
(``localhost``, the local method), and that interpreter spent most of its CPU importing the
same libraries every run: ``requests``, ``urllib3``, the Docker SDK,
``ansible.module_utils.basic`` (bench/RESULTS.md).  A fork of a process that imported them
once starts with them.

What keeps runs apart, by construction:

- This process never runs a module, a Mitogen context or anything of a run.  It holds
  :data:`PRELOAD` and what that imports, nothing else: not Mitogen, not Ansible's
  controller.  Each host is a fresh fork, used by the one multiplexer that asked for it,
  and ends with it.
- The fork joins the cgroup of the process that asked (read here from
  ``/proc/<peer>/cgroup``; only a group directly under the resident Ansible's
  ``fem-runs/``) before anything else, so cancel, timeout and the end of the run kill it
  with the run's other processes; joined, it ends if the asker has (the run's kill may
  have come first).
- It then takes what a host the multiplexer starts itself would have after the exec: the
  multiplexer's stdio ends (its stderr only where an exec keeps it), working dir,
  environment, umask, resource limits, nice value, ``oom_score_adj``, CPU affinity, ignored
  signals and blocked mask; a session of its own; Python's start-up state (``sys.argv``,
  ``sys.path`` with the working dir first, SIGPIPE and SIGXFSZ ignored, SIGINT handled
  unless ignored).  It says it could before the multiplexer is answered, then runs
  Mitogen's first stage as Mitogen's ``-c`` program does, and the core source the
  multiplexer sends as ``__main__``, as the interpreter Mitogen would have started reads
  it from its stdin.
- A request is refused (the multiplexer then starts its host as Mitogen does) when what was
  imported here could differ from what that interpreter would import: an environment other
  than this process's outside the per-run variables; a working dir holding a module or
  package of a name imported here (a fresh interpreter would import that one); a file
  imported here changed, or a module imported here would now be found elsewhere on the
  path (this process then exits with :data:`CHANGED_RC` once its hosts have ended, and
  fem_ansible.resident_server is replaced).  Also when it is malformed, slow, one too many,
  or the fork cannot take the state: whatever a request holds, this process goes on.

Standard library only: fem_ansible.resident_server starts it as
``python <this file> <socket> <server pid> <cgroup mount> <runs' cgroup base> <per-run
variables as JSON>``, without ``-P``, ``-I`` or ``-S``: the flags of its forks are those of
the interpreter Mitogen starts.  fem.core's ``mitogen_linear`` is its client
(``ask_resident_host``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.machinery
import json
import os
import resource
import select
import selectors
import signal
import socket
import sys
import time
import types
import zlib

#: What a multiplexer and this process agree on.
PROTOCOL = "fem-resident-host/1"
#: The variable through which a forked run (and so its multiplexer) finds this process's
#: socket; set by fem_ansible.resident_server in the run only.
ENV = "FEMCORE_RESIDENT_HOST"
#: Exit code: a file imported here changed (fem_ansible.resident_server retires with it).
CHANGED_RC = 3
#: What the built-in roles' modules import on the listener's own host.
PRELOAD = ("ansible.module_utils.basic", "requests", "docker")
#: The resource limits a host takes from its multiplexer (Mitogen raises the open files').
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_AS",
           "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_MEMLOCK", "RLIMIT_CPU", "RLIMIT_NICE",
           "RLIMIT_RTPRIO", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_LOCKS",
           "RLIMIT_RSS")
#: How long a multiplexer waits for this process's answer before it starts its own host
#: (and asks it no more).
ANSWER_S = 2.0
#: How long this process waits for a fork to take its run's state.
READY_S = 0.5
#: How long a request may take to come whole, and how many may be coming at once (a
#: sender that drips its bytes holds nobody else up).
REQUEST_S = 2.0
MAX_REQUESTS = 16
#: How many forks may be running at once (each holds two descriptors here).
MAX_HOSTS = 128
_MAX_REQUEST = 1 << 20


def fingerprint() -> dict[str, tuple[int, ...]]:
    """Every file this process imported code from, with what changes when it is written
    or replaced (its inode and change time too: an edit of the same size whose mtime was
    put back still changes those)."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            with contextlib.suppress(OSError):
                files[path] = stamp(os.stat(path))
    return files


def stamp(st: os.stat_result) -> tuple[int, ...]:
    """What :func:`fingerprint` keeps of a file's status."""
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def changed(files: dict[str, tuple[int, ...]]) -> str | None:
    """The first of ``files`` (:func:`fingerprint`) that is gone or differs."""
    for path, seen in files.items():
        try:
            st = os.stat(path)
        except OSError:
            return path
        if stamp(st) != seen:
            return path
    return None


def send(conn: socket.socket, message: dict, fds: list[int]) -> None:
    """``message`` and ``fds`` as :func:`receive` reads them."""
    body = json.dumps(message).encode()
    data = len(body).to_bytes(4, "big") + body
    sent = socket.send_fds(conn, [data], fds) if fds else conn.send(data)
    conn.sendall(data[sent:])


class Incoming:
    """A message (what :func:`send` sent) as far as it has come on ``conn``."""

    def __init__(self, conn: socket.socket, max_fds: int) -> None:
        self.conn, self.max_fds = conn, max_fds
        self.data = b""
        self.size = 0
        self.fds: list[int] = []

    def read(self) -> dict | None:
        """Read what has come, never past the message: the message once it is whole, else
        None.  ValueError if it is not one (or the sender stopped short); BlockingIOError
        and other OSErrors propagate."""
        have = len(self.data)
        want = 4 - have if have < 4 else 4 + self.size - have
        data, fds, _flags, _addr = socket.recv_fds(self.conn, want, self.max_fds)
        for fd in fds:  # the fds come with the first bytes; never more than max_fds
            if len(self.fds) < self.max_fds:
                self.fds.append(fd)
            else:
                os.close(fd)
        if not data:
            raise ValueError("message cut short")
        self.data += data
        if len(self.data) < 4:
            return None
        self.size = int.from_bytes(self.data[:4], "big")
        if self.size > _MAX_REQUEST:
            raise ValueError("message too long")
        if len(self.data) < 4 + self.size:
            return None
        try:
            message = json.loads(self.data[4:])
        except RecursionError:
            raise ValueError("message nested too deep") from None
        if not isinstance(message, dict):
            raise ValueError("not a message")
        return message

    def close(self) -> None:
        """Close the fds received (those not taken)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def receive(conn: socket.socket, max_fds: int, deadline_s: float) -> tuple[dict, list[int]]:
    """A message and the fds that came with it, whole within ``deadline_s`` (TimeoutError
    if not; ValueError if it is not one)."""
    incoming = Incoming(conn, max_fds)
    end = time.monotonic() + deadline_s
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole message in time")
            conn.settimeout(left)
            message = incoming.read()
            if message is not None:
                conn.settimeout(None)
                return message, incoming.fds
    except BaseException:
        incoming.close()
        raise


def peer(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of ``conn``."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return (int.from_bytes(creds[0:4], sys.byteorder),
            int.from_bytes(creds[4:8], sys.byteorder))


class Listening:
    """A Unix socket listening at ``path``.  Bound under a temporary name and renamed: a
    client connects to a process that listens or to none.  Closed, its path is removed only
    if it is still this socket's (a successor may have taken it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        self.sock.bind(tmp)
        self.sock.listen(64)
        os.rename(tmp, path)
        self.inode = os.stat(path).st_ino

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        self.sock.close()


def stop_flag(signums: tuple[signal.Signals, ...]) -> dict[str, str]:
    """A flag (``"why"``) that a signal of ``signums`` sets to its name: a loop checking it
    stops between two steps, never inside one."""
    flag = {"why": ""}
    for signum in signums:
        signal.signal(signum, lambda s, _f: flag.update(why=signal.Signals(s).name))
    return flag


def _say(line: str) -> None:
    """A line for the listener's log (through the resident Ansible's stderr)."""
    with contextlib.suppress(OSError):
        os.write(2, f"resident host: {line}\n".encode(errors="replace"))


class _Host:
    def __init__(self, pidfd: int, conn: socket.socket) -> None:
        self.pidfd, self.conn = pidfd, conn


class _Request:
    """A request coming in: read as its bytes come, given up at its deadline."""

    def __init__(self, conn: socket.socket, group: str, pid: int = 0) -> None:
        self.conn, self.group, self.pid = conn, group, pid
        self.incoming = Incoming(conn, 3)
        self.deadline = time.monotonic() + REQUEST_S

    def drop(self, why: str | None) -> None:
        self.incoming.close()
        if why:
            why = why if len(why) <= 300 else why[:300] + "..."
            _say(f"a request refused (its run starts its own host): {why}")
            with contextlib.suppress(OSError):
                self.conn.setblocking(True)
                self.conn.settimeout(1.0)
                send(self.conn, {"cold": why}, [])
        self.conn.close()


class Forks:
    """The resident host's loop: takes requests, forks hosts, reaps them."""

    def __init__(self, path: str, server: int, mount: str, base: str,
                 per_run: set[str]) -> None:
        self.server, self.mount, self.base = server, mount, base
        self.env = {k: v for k, v in os.environ.items() if k not in per_run}
        self.per_run = per_run | {ENV}
        self.files = fingerprint()
        self.hosts: dict[int, _Host] = {}
        self.requests: dict[int, _Request] = {}
        self.rc = 0
        self.stopping = ""
        self.selector = selectors.DefaultSelector()
        self.listening = Listening(path)
        self.sock = self.listening.sock
        self.selector.register(self.sock, selectors.EVENT_READ, "accept")

    def stop(self, why: str, rc: int = 0) -> None:
        """Take no more requests; the loop ends once the hosts forked have ended."""
        if self.stopping:
            return
        self.stopping, self.rc = why, rc
        self.selector.unregister(self.sock)
        self.listening.close()
        for fd in list(self.requests):
            self._forget(fd).drop(f"the resident host is stopping ({why})")
        _say(f"stopping: {why}")

    def serve(self) -> dict | None:
        """Serve until stopped and idle (None), or, in a forked host that has taken its
        run's state (:func:`_prepare`), return its request."""
        stop = stop_flag((signal.SIGTERM, signal.SIGHUP))
        while not (self.stopping and not self.hosts):
            if stop["why"]:
                self.stop(stop["why"])
            if os.getppid() != self.server:
                self.stop("the resident Ansible is gone")
            wait = min([1.0] + [r.deadline - time.monotonic() for r in self.requests.values()])
            for key, _mask in self.selector.select(timeout=max(wait, 0)):
                if key.data == "accept":
                    self._accept()
                elif key.data[0] == "request" and key.data[1] in self.requests:
                    forked = self._read(key.data[1])
                    if forked is not None:
                        return forked
                elif key.data[0] == "host":
                    self._ended(key.data[1])
            now = time.monotonic()
            for fd, request in list(self.requests.items()):
                if request.deadline <= now:  # what has come is read once more, then no more
                    forked = self._read(fd, last=True)
                    if forked is not None:
                        return forked
        return None

    def _accept(self) -> None:
        """A connection: its peer checked at once (this user, a run's cgroup), its request
        then read as it comes."""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        try:
            pid, uid = peer(conn)
            if uid != os.getuid():
                raise ValueError("another user")
            group = self._group(pid)
        except (OSError, ValueError) as e:
            _Request(conn, "").drop(str(e))
            return
        if len(self.requests) >= MAX_REQUESTS:
            _Request(conn, "").drop(f"{MAX_REQUESTS} requests are being read")
            return
        conn.setblocking(False)
        self.requests[conn.fileno()] = _Request(conn, group, pid)
        self.selector.register(conn, selectors.EVENT_READ, ("request", conn.fileno()))

    def _forget(self, fd: int) -> _Request:
        request = self.requests.pop(fd)
        self.selector.unregister(request.conn)
        return request

    def _read(self, fd: int, last: bool = False) -> dict | None:
        """Read request ``fd`` as far as it has come; answer it once whole (None, or the
        request in a fork).  ``last``: its deadline has passed, it is given up unless
        whole now."""
        request = self.requests[fd]
        try:
            message = request.incoming.read()
        except BlockingIOError:
            message = None
        except (OSError, ValueError) as e:
            self._forget(fd).drop(f"{type(e).__name__}: {e}")
            return None
        if message is None:
            if last:
                self._forget(fd).drop(f"no whole request within {REQUEST_S:.0f}s")
            return None
        self._forget(fd)
        request.conn.setblocking(True)
        return self._answer(request, message)

    def _answer(self, request: _Request, message: dict) -> dict | None:
        """Fork a host for a whole request (returned in the fork), or refuse it."""
        fds = request.incoming.fds
        why = self._refusal(message, fds)
        if why:
            request.drop(why)
            return None
        if len(self.hosts) >= MAX_HOSTS:
            request.drop(f"{MAX_HOSTS} hosts forked are still running")
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        opened: list[int] = []
        try:
            opened.append(os.pidfd_open(request.pid))
            opened.extend(os.pipe())
            child = os.fork()
        except OSError as e:
            for fd in opened:
                os.close(fd)
            request.drop(f"cannot fork now: {e}")
            return None
        asker, ready_r, ready_w = opened
        if child == 0:
            self._become_child(request.conn)
            os.close(ready_r)
            _prepare(message, fds, request.group, ready_w, asker)
            return message
        for fd in (asker, ready_w):
            os.close(fd)
        request.incoming.close()
        try:
            pidfd = os.pidfd_open(child)
        except OSError as e:  # the fork must not go on unseen: it is ended by its pid
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            os.close(ready_r)
            request.drop(f"cannot fork now: {e}")
            return None
        why = _ready(ready_r)
        if why:  # the fork could not take the run's state: the run starts its own host
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(child, 0)
            os.close(pidfd)
            request.drop(why)
            return None
        # (the multiplexer gone: so is its host, with the run's cgroup)
        with contextlib.suppress(OSError):
            send(request.conn, {"pid": child}, [pidfd])
        self.hosts[child] = _Host(pidfd, request.conn)
        self.selector.register(pidfd, selectors.EVENT_READ, ("host", child))
        return None

    def _group(self, pid: int) -> str:
        """The cgroup of process ``pid`` if it is a run's (directly under the base)."""
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            own = next((line[3:].rstrip("\n") for line in f if line.startswith("0::")), "")
        group = os.path.join(self.mount, own.lstrip("/"))
        name = os.path.basename(group)
        if (os.path.normpath(group) != group or os.path.dirname(group) != self.base
                or not name or name.startswith(".")):
            raise ValueError(f"the asking process is not in a run's cgroup ({own})")
        return group

    def _refusal(self, message: dict, fds: list[int]) -> str | None:
        if self.stopping:
            return f"the resident host is stopping ({self.stopping})"
        if message.get("protocol") != PROTOCOL:
            return f"its multiplexer speaks {message.get('protocol')!r}, this {PROTOCOL!r}"
        if len(fds) not in (2, 3):
            return "no stdio received"
        stale = changed(self.files)
        stale = f"{stale} changed" if stale else _moved()
        if stale:
            self.stop(stale, CHANGED_RC)
            return "code imported by the resident host changed"
        env, cwd = message.get("env"), message.get("cwd")
        if not isinstance(env, dict) or not isinstance(cwd, str) or not os.path.isabs(cwd):
            return "no environment or working dir"
        if not (all(type(message.get(k)) is int for k in ("size", "umask", "sigign", "sigblk",
                                                            "nice", "oom"))
                and isinstance(message.get("rlimits"), dict)
                and set(message["rlimits"]) <= set(RLIMITS)
                and isinstance(message.get("cpus"), list) and message["cpus"]
                and all(type(cpu) is int for cpu in message["cpus"])):
            return "a malformed request"
        differ = sorted(k for k in {*env, *self.env} - self.per_run
                        if env.get(k) != self.env.get(k))
        if differ:
            return f"its environment differs in {', '.join(differ)}"
        return _shadowed(cwd)

    def _become_child(self, conn: socket.socket) -> None:
        """In the fork: nothing of this process stays open or in charge."""
        self.selector.close()
        self.sock.close()
        conn.close()
        for host in self.hosts.values():
            os.close(host.pidfd)
            host.conn.close()
        for request in self.requests.values():
            request.incoming.close()
            request.conn.close()

    def _ended(self, pid: int) -> None:
        host = self.hosts.pop(pid)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            send(host.conn, {"rc": os.waitstatus_to_exitcode(status)}, [])
        self.selector.unregister(host.pidfd)
        os.close(host.pidfd)
        host.conn.close()


def _top_level() -> list[str]:
    """The top-level modules imported here that a path lookup finds (not built in)."""
    return sorted({name.partition(".")[0] for name in sys.modules}
                  - set(sys.builtin_module_names) - {"__main__"})


def _shadowed(cwd: str) -> str | None:
    """A name imported here that ``cwd``, first on a new interpreter's path, would give
    instead (a module or a package there; a plain directory is a namespace portion, which
    the installed package still wins over).  A finder of its own: nothing of one run's
    working dir is kept here for the next run's fork to see."""
    finder = importlib.machinery.FileFinder(
        cwd, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
        (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES))
    for name in _top_level():
        try:
            spec = finder.find_spec(name)
        except (ImportError, ValueError):
            continue
        except OSError as e:  # a working dir this process cannot read is one it refuses
            return f"its working dir cannot be read ({e.strerror})"
        if spec is not None and spec.loader is not None:
            return f"its working dir holds {name}, which a new interpreter would import"
    return None


#: Where each top-level module imported here was found, as :func:`_moved` checks it.
_ORIGINS: dict[str, str | None] = {}


def _origins() -> dict[str, str | None]:
    """Where a new interpreter would find each top-level module imported here, on this
    process's path (a file added ahead of it on the path, since, would be found first)."""
    found = {}
    for name in _top_level():
        try:
            spec = importlib.machinery.PathFinder.find_spec(name)
        except (ImportError, ValueError, OSError):
            spec = None
        found[name] = spec.origin if spec is not None else None
    return found


def _moved() -> str | None:
    """Why what is imported here is no longer what a new interpreter would import."""
    now = _origins()
    moved = sorted(name for name, origin in _ORIGINS.items() if now.get(name) != origin)
    return f"{', '.join(moved)} would now be found elsewhere" if moved else None


def _ready(ready: int) -> str | None:
    """Whether the fork took its run's state (None), or why not."""
    answer = b""
    deadline = time.monotonic() + READY_S
    try:
        while not answer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready], [], [], left)[0]:
                return "the fork did not get ready in time"
            chunk = os.read(ready, 4096)
            if not chunk:
                return "the fork ended before it was ready"
            answer += chunk
    finally:
        os.close(ready)
    text = answer.decode(errors="replace").strip()
    return None if text == "ready" else f"the fork could not take its run's state: {text}"


def _prepare(message: dict, fds: list[int], group: str, ready: int, asker: int) -> None:
    """In the fork: join ``group`` first, then take the multiplexer's process state and
    Python's start-up state; say on ``ready`` whether it could (if not, end).  If the
    asker (pidfd ``asker``) has ended by the time this process is in its group, the run's
    kill may have come before: this process ends rather than outlive it."""
    try:
        with open(os.path.join(group, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write("0\n")
        if select.select([asker], [], [], 0)[0]:
            raise ProcessLookupError("the asking process has ended")
        os.close(asker)
        os.setsid()
        os.setpriority(os.PRIO_PROCESS, 0, message["nice"])
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as f:
            f.write(f"{message['oom']}\n")
        os.sched_setaffinity(0, message["cpus"])
        os.chdir(message["cwd"])
        os.umask(message["umask"])
        for name, limits in message["rlimits"].items():
            resource.setrlimit(getattr(resource, name), tuple(limits))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        _signals(message["sigign"], message["sigblk"])
    except Exception as e:  # whatever it is, this fork ends here
        os.write(ready, f"{type(e).__name__}: {e}\n".encode(errors="replace"))
        os._exit(1)
    if len(fds) == 2:
        # The multiplexer's stderr does not survive an exec (close-on-exec): the
        # interpreter it starts has none, and Python then has no sys.stderr.
        os.close(2)
        sys.stderr = sys.__stderr__ = None
    os.environ.clear()
    os.environ.update(message["env"])
    sys.argv[:] = [""]
    sys.path.insert(0, "")
    importlib.invalidate_caches()
    os.write(ready, b"ready\n")
    os.close(ready)


def _signals(ignored: int, blocked: int) -> None:
    """The signal dispositions and mask of an interpreter the multiplexer would start:
    what it ignores stays ignored across the exec, the rest is default; Python's start
    then ignores SIGPIPE and SIGXFSZ and handles SIGINT unless it was ignored.  The
    blocked mask is the asking thread's."""
    ignored |= _bit(signal.SIGPIPE) | _bit(signal.SIGXFSZ)
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):  # those the C library keeps
            signal.signal(signum, signal.SIG_IGN if ignored & _bit(signum) else signal.SIG_DFL)
    if not ignored & _bit(signal.SIGINT):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK,
                           {s for s in signal.valid_signals() if blocked & _bit(s)})


def _bit(signum: int) -> int:
    """A signal's bit in the masks of ``/proc/<pid>/status``."""
    return 1 << (signum - 1)


def become_host(message: dict) -> None:
    """In the fork, prepared: what Mitogen's boot command runs in the interpreter it
    starts."""
    core = _first_stage(message["size"])
    # As that interpreter runs its stdin: the core source as __main__.
    os.environ["ARGV0"] = sys.executable
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    exec(compile(core, "<stdin>", "exec"), main.__dict__)


def _first_stage(size: int) -> bytes:
    """Mitogen's first stage (``mitogen.parent.Connection._first_stage``), in this process:
    the compressed preamble read from stdin, the original stdin kept as fd 100, the core
    source readable on fd 101; then the program it would exec, returned."""
    os.write(1, b"MITO000\n")
    compressed = b""
    while len(compressed) < size:
        select.select([0], [], [])
        chunk = os.read(0, size - len(compressed))
        if not chunk:
            break
        compressed += chunk
    core = zlib.decompress(compressed)
    os.dup2(0, 100)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    source = os.memfd_create("mitogen-core")
    view = memoryview(core)
    while view:
        view = view[os.write(source, view):]
    os.lseek(source, 0, os.SEEK_SET)
    os.dup2(source, 101)
    os.close(source)
    os.write(1, b"MITO001\n")
    return core


def main(argv: list[str]) -> int:
    del sys.path[0]  # this file's dir: a host's path starts with its working dir instead
    path, server, mount, base, per_run = argv[1], int(argv[2]), argv[3], argv[4], argv[5]
    skipped = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # a module that fails here is imported by the host itself
            skipped.append(name)
    _ORIGINS.update(_origins())
    gc.collect()
    gc.freeze()  # the forks' copy of the heap stays shared: their collections skip it
    forks = Forks(path, server, mount, base, set(json.loads(per_run)))
    _say(f"ready: {len(forks.files)} files imported"
         + (f", not {', '.join(skipped)}" if skipped else ""))
    forked = forks.serve()
    if forked is None:
        return forks.rc
    become_host(forked)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
