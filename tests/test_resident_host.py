"""fem.core's resident host (``plugin_utils/resident_host.py``) with real Mitogen: a
multiplexer of a run asks it for the listener's own host, and gets a fork of it that is
what Mitogen would have started (in the run's cgroup, with the multiplexer's working dir,
environment, umask and limits, its own session, Python's start-up state), already holding
what modules import; a fresh one each time.  Whatever could make the fork differ from a new
interpreter is refused, and the multiplexer then starts its host as Mitogen does.

The multiplexer here is a process of a run's cgroup that loads fem.core's strategy and
connects as ansible_mitogen's context service does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fem_ansible import cgroups
from fem_ansible.fastpath import plugin_utils
from fem_ansible.runner import data_dir
from fem_ansible.sockdir import socket_dir

resident_host = plugin_utils("resident_host")

COLLECTIONS = data_dir() / "collections"

# What each process of these tests that stands for one of a run's does first: join the
# run's cgroup.
JOIN = r"""
import os
with open(os.path.join(os.environ["FEM_RUN_CGROUP"], "cgroup.procs"), "w") as f:
    f.write("0\n")
"""

# A run's multiplexer: joins its cgroup, loads the strategy as Ansible does, connects the
# listener's own host twice as the context service does, and prints what each host saw.
MULTIPLEXER = JOIN + r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (777, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
os.umask(0o027)
# As ansible_mitogen's multiplexer has them: SIGINT and SIGQUIT ignored, its stdio
# close-on-exec (argument "cloexec"), or inheritable as a plain process's.
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGQUIT, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
os.setpriority(os.PRIO_PROCESS, 0, 3)
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("200\n")
if sys.argv[2] == "cloexec":
    for fd in (0, 1, 2):
        os.set_inheritable(fd, False)
from ansible.plugins.loader import init_plugin_loader
init_plugin_loader([sys.argv[1]])
import importlib
plugin = importlib.import_module("ansible_collections.fem.core.plugins.strategy.mitogen_linear")
import ansible_mitogen.process, ansible_mitogen.services, mitogen.master
broker = mitogen.master.Broker()
router = mitogen.master.Router(broker)
ansible_mitogen.process._setup_responder(router.responder)
service = ansible_mitogen.services.ContextService(router)
SEEN = '''dict(
    pid=__import__("os").getpid(), ppid=__import__("os").getppid(),
    sid=__import__("os").getsid(0), cwd=__import__("os").getcwd(),
    umask=int(open("/proc/self/status").read().split("Umask:")[1].split()[0], 8),
    nofile=__import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE),
    env=dict(__import__("os").environ), argv=__import__("sys").argv,
    path0=__import__("sys").path[0],
    preloaded=[n for n in ("requests", "docker") if n in __import__("sys").modules],
    cgroup=[l[3:].strip() for l in open("/proc/self/cgroup") if l.startswith("0::")][0],
    fds=[__import__("os").readlink(f"/proc/self/fd/{fd}")
         for fd in __import__("os").listdir("/proc/self/fd")
         if __import__("os").path.lexists(f"/proc/self/fd/{fd}")],
    mark=getattr(__import__("sys"), "fem_test_mark", None),
    signals={k: v for k, v in (l.split(":") for l in open("/proc/self/status"))
             if k in ("SigIgn", "SigBlk", "SigCgt")},
    sigint=repr(__import__("signal").getsignal(__import__("signal").SIGINT)),
    stderr=repr(type(__import__("sys").stderr)),
    nice=__import__("os").getpriority(__import__("os").PRIO_PROCESS, 0),
    oom=open("/proc/self/oom_score_adj").read().strip(),
    finders=sorted(k for k in __import__("sys").path_importer_cache if "project" in k),
    converters=__import__("ansible.module_utils.common.text.converters",
                          fromlist=["x"]).__file__,
)'''
seen = []
for _ in range(2):
    host = router.local(python_path=[sys.executable])
    service._send_module_forwards(host)
    seen.append(host.call(eval, SEEN))
    host.call(exec, "import sys; sys.fem_test_mark = 1")
    host.shutdown(wait=True)
own = dict(pid=os.getpid(), cwd=os.getcwd(), env=dict(os.environ),
           cgroup=[l[3:].strip() for l in open("/proc/self/cgroup") if l.startswith("0::")][0])
broker.shutdown()
broker.join()
print(json.dumps({"hosts": seen, "own": own}))
"""


class Resident:
    """A resident host started as fem_ansible.resident_server starts one, and the
    environment of the runs it serves."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        directory = socket_dir(tmp_path, "resident", "test", 60)
        directory.mkdir(parents=True, mode=0o700)
        self.path = directory / "server.sock.host"
        self.tmp = tmp_path
        # LC_ALL set: Python adds nothing to its environment (PEP 538).
        self.env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LC_ALL": "C.UTF-8",
                    **env}
        self.log = tmp_path / "resident-host.log"
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, resident_host.__file__, str(self.path), str(os.getpid()),
                 str(cgroups.mount()), str(cgroups.base()),
                 json.dumps(["FEM_RUN_CGROUP", "FEM_JOB_ID"])],
                env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log, cwd=self.tmp)
        deadline = time.monotonic() + 60
        while not self.path.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def run(self, cwd: Path, extra_env: dict[str, str] | None = None,
            group: Path | None = None, ask: bool = True, stdio: str = "cloexec") -> dict:
        """A multiplexer in a new run's cgroup (or ``group``) connecting two hosts, asking
        this resident host for them (or, not ``ask``, as where there is none)."""
        made = group is None
        group = group or cgroups.create(f"host-test.{time.monotonic_ns()}")
        assert group is not None
        env = {**self.env, "FEM_RUN_CGROUP": str(group), "FEM_JOB_ID": "job-1",
               **({resident_host.ENV: str(self.path)} if ask else {}), **(extra_env or {})}
        try:
            done = subprocess.run([sys.executable, "-c", MULTIPLEXER, str(COLLECTIONS), stdio],
                                  env=env, cwd=cwd, capture_output=True, text=True,
                                  timeout=120)
        finally:
            if made:
                cgroups.remove(group)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    def client(self, script: str, cwd: Path) -> tuple[Any, list[int]]:
        """``script``, a raw client of the resident host's protocol, run as a process of a
        new run's group and given the socket, the protocol module's dir and ``cwd``: what
        it printed, as JSON, and what was left in its group before the group's removal."""
        group = cgroups.create(f"host-test.{time.monotonic_ns()}")
        assert group is not None
        env = {**self.env, "FEM_RUN_CGROUP": str(group), resident_host.ENV: str(self.path)}
        try:
            done = subprocess.run(
                [sys.executable, "-c", script, str(self.path),
                 str(Path(resident_host.__file__).parent), str(cwd)],
                env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout), cgroups.pids(group)
        finally:
            cgroups.remove(group)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def resident(tmp_path):
    if cgroups.base() is None:
        pytest.fail("these tests need a writable cgroup v2 (CI runs as root)")
    started = Resident(tmp_path)
    yield started
    started.close()


def _kinds(seen: dict) -> set[str]:
    """What kinds of descriptors a host had open (a socket, a pipe, an epoll, a file)."""
    return {re.sub(r"\[\d+\]$", "", link) for link in seen["fds"]}


def _forked(seen: dict, resident: Resident) -> bool:
    return seen["ppid"] == resident.proc.pid


@pytest.mark.parametrize("stdio", ["cloexec", "inheritable"])
def test_the_listeners_own_host_is_forked_as_mitogen_would_have_started_it(resident,
                                                                           tmp_path, stdio):
    work = tmp_path / "project"
    work.mkdir()
    got = resident.run(work, stdio=stdio)
    own = got["own"]
    first, second = got["hosts"]
    for host in (first, second):
        assert _forked(host, resident), (host, resident.log.read_text())
        # Already imported: what modules import on this host.
        assert host["preloaded"] == ["requests", "docker"]
        # What a host started by the multiplexer would have had.
        assert host["cgroup"] == own["cgroup"]
        assert host["cwd"] == own["cwd"] == str(work)
        assert host["umask"] == 0o027
        assert host["nofile"][0] == 777
        assert host["sid"] == host["pid"]
        assert host["argv"] == [""] and host["path0"] == ""
        # Mitogen's ARGV0 was taken by its core; the resident host's variable is not passed.
        assert host["env"] == {k: v for k, v in own["env"].items() if k != resident_host.ENV}
        # Ansible from its installed files, as the check of fem.core's own_host lets it.
        assert host["converters"] == importlib.util.find_spec(
            "ansible.module_utils.common.text.converters").origin
    # A fresh fork each time: nothing of the first host in the second.
    assert first["pid"] != second["pid"]
    assert first["mark"] is None and second["mark"] is None
    # Nothing of the resident host's own is open in its forks: the same kinds of
    # descriptors as a host Mitogen starts (its stdio, the parent stream, its broker's
    # waker and loggers), no pidfd of another host, no socket of the resident host's.
    started = resident.run(work, ask=False, stdio=stdio)
    assert all(_started_by_mitogen(h, started["own"]) for h in started["hosts"])
    stock = started["hosts"][0]
    assert _kinds(first) == _kinds(second) == _kinds(stock), \
        (first["fds"], second["fds"], stock["fds"])
    # The multiplexer's ignored signals and blocked mask, Python's own start-up ones, and
    # its stderr only where an exec keeps it (ansible_mitogen's is close-on-exec).
    for what in ("signals", "sigint", "stderr", "nice", "oom"):
        assert first[what] == second[what] == stock[what], (what, first[what], stock[what])
    assert ("NoneType" in stock["stderr"]) == (stdio == "cloexec")
    assert (stock["nice"], stock["oom"]) == (3, "200")
    own_sockets = {os.readlink(f"/proc/{resident.proc.pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{resident.proc.pid}/fd")}
    assert not own_sockets & {*first["fds"], *second["fds"]} - {"/dev/null"}, own_sockets
    assert first["preloaded"] != started["hosts"][0]["preloaded"] == []


def _started_by_mitogen(seen: dict, own: dict) -> bool:
    return seen["ppid"] == own["pid"]


def test_a_working_dir_shadowing_what_it_imported_gets_mitogens_own_host(resident,
                                                                         tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    (work / "requests.py").write_text("raise ImportError('shadow')\n")
    got = resident.run(work)
    assert all(_started_by_mitogen(h, got["own"]) for h in got["hosts"]), got["hosts"]
    assert "its working dir holds requests" in resident.log.read_text()


def test_another_environment_gets_mitogens_own_host(resident, tmp_path):
    got = resident.run(tmp_path, {"SITE_SETTING": "1"})
    assert all(_started_by_mitogen(h, got["own"]) for h in got["hosts"]), got["hosts"]
    assert "its environment differs in SITE_SETTING" in resident.log.read_text()
    assert "1" not in resident.log.read_text().split("SITE_SETTING")[1][:3]  # names only


def test_a_process_outside_a_runs_cgroup_gets_no_fork(resident, tmp_path):
    outside = cgroups.base().parent / f"host-test-outside.{time.monotonic_ns()}"
    outside.mkdir()
    try:
        got = resident.run(tmp_path, group=outside)
    finally:
        cgroups.remove(outside)
    assert all(_started_by_mitogen(h, got["own"]) for h in got["hosts"]), got["hosts"]
    assert "not in a run's cgroup" in resident.log.read_text()


def test_a_changed_imported_file_ends_the_resident_host(tmp_path):
    """A file the resident host imported changed (an upgrade): the request is refused and
    the resident host exits with the code that replaces the resident Ansible."""
    def same_size_mtime_put_back(site: Path) -> None:
        stat = (site / "sitecustomize.py").stat()
        (site / "sitecustomize.py").write_text("\n")
        os.utime(site / "sitecustomize.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))

    _replaced_after(tmp_path, same_size_mtime_put_back, "sitecustomize.py changed")


def _replaced_after(tmp_path: Path, change, said: str) -> None:
    """A resident host with ``tmp_path/site`` on its path (holding a ``sitecustomize.py``,
    which every interpreter imports at start) that ``change`` changes: the next run's hosts
    are Mitogen's, and the resident host exits to be replaced, saying ``said``."""
    if cgroups.base() is None:
        pytest.fail("these tests need a writable cgroup v2 (CI runs as root)")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(" ")
    resident = Resident(tmp_path, PYTHONPATH=str(site))
    try:
        change(site)
        got = resident.run(tmp_path)
        assert all(_started_by_mitogen(h, got["own"]) for h in got["hosts"]), got["hosts"]
        assert resident.proc.wait(timeout=30) == resident_host.CHANGED_RC
        assert said in resident.log.read_text()
    finally:
        if resident.proc.poll() is None:
            resident.close()


def test_no_resident_host_at_the_socket_gets_mitogens_own_host(resident, tmp_path):
    got = resident.run(tmp_path, {resident_host.ENV: str(tmp_path / "gone.sock")})
    assert all(_started_by_mitogen(h, got["own"]) for h in got["hosts"]), got["hosts"]


# A request as the strategy sends it, but for a working dir the fork cannot enter.
RAW = JOIN + r"""
import json, os, socket, sys
sys.path.insert(0, sys.argv[2])
import resident_host
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
env = {k: v for k, v in os.environ.items() if k != resident_host.ENV}
resident_host.send(conn, {"protocol": resident_host.PROTOCOL, "env": env, "cwd": sys.argv[3],
                          "umask": 0o22, "size": 10, "rlimits": {}, "sigign": 0,
                          "sigblk": 0, "nice": 0, "oom": 0, "cpus": [0]}, [0, 1, 2])
print(json.dumps(resident_host.receive(conn, 1, 10)[0]))
"""


def test_a_fork_that_cannot_take_its_runs_state_is_refused(resident, tmp_path):
    """The fork reports whether it could join the run's cgroup and take its state before
    the multiplexer is answered: if not, the answer is a refusal (its host then starts as
    Mitogen starts it), and the fork is gone."""
    reply, left = resident.client(RAW, tmp_path / "not-a-dir")
    assert "FileNotFoundError" in reply["cold"], reply
    assert left == []


# A process of a run that connects and sends its request's first bytes, then one a second.
DRIP = JOIN + r"""
import os, socket, sys, time
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
conn.send((1000).to_bytes(4, "big") + b"{")
print("sent", flush=True)
for _ in range(int(sys.argv[2])):
    time.sleep(1)
    conn.send(b" ")
"""


def test_a_request_that_comes_slowly_holds_nobody_up(resident, tmp_path):
    """A process that drips its request: the hosts asked for meanwhile are forked, and the
    slow request is given up at its deadline."""
    group = cgroups.create(f"host-test.{time.monotonic_ns()}")
    env = {**resident.env, "FEM_RUN_CGROUP": str(group)}
    drip = subprocess.Popen([sys.executable, "-c", DRIP, str(resident.path), "20"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert drip.stdout.readline() == "sent\n"
        got = resident.run(tmp_path)
        assert all(_forked(h, resident) for h in got["hosts"]), resident.log.read_text()
        deadline = time.monotonic() + 30
        while "no whole request within" not in resident.log.read_text():
            assert time.monotonic() < deadline, resident.log.read_text()
            time.sleep(0.2)
    finally:
        drip.kill()
        drip.wait()
        cgroups.remove(group)


# Bytes a process of a run may send: each is refused, and the resident host goes on.
HOSTILE = JOIN + r"""
import json, os, socket, sys
sys.path.insert(0, sys.argv[2])
import resident_host
replies = []
for body in (b"[" * 100000, b"not json", json.dumps([1]).encode(),
             json.dumps({"protocol": resident_host.PROTOCOL, "cwd": sys.argv[3]}).encode()):
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(sys.argv[1])
    data = len(body).to_bytes(4, "big") + body
    sent = socket.send_fds(conn, [data], [0, 1, 2])  # the fds with the first bytes
    conn.sendall(data[sent:])
    try:
        replies.append(resident_host.receive(conn, 1, 10)[0])
    except (OSError, ValueError) as e:
        replies.append({"error": str(e)})
print(json.dumps(replies))
"""


def test_hostile_requests_are_refused_and_the_resident_host_goes_on(resident, tmp_path):
    """JSON nested too deep for the parser, not JSON, not an object, a request without
    its fields, and a working dir that is a symbolic link to itself: each is refused; the
    resident host is still there, and forks the next run's hosts."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    replies, _ = resident.client(HOSTILE, loop)
    assert len(replies) == 4 and all("pid" not in r for r in replies), replies
    looped, _ = resident.client(RAW, loop)
    assert "cold" in looped, looped
    assert resident.proc.poll() is None, resident.log.read_text()
    log = resident.log.read_text()
    assert "nested too deep" in log
    got = resident.run(tmp_path)
    assert all(_forked(h, resident) for h in got["hosts"]), resident.log.read_text()


def test_a_runs_working_dir_is_not_seen_by_the_next_runs_host(resident, tmp_path):
    """The check of a run's working dir keeps nothing of it in the resident host; a plain
    directory named like a preloaded package (a namespace portion: the installed package
    still wins) is no reason to refuse."""
    first, second = tmp_path / "first-project", tmp_path / "second-project"
    first.mkdir()
    second.mkdir()
    (first / "secret-name.txt").write_text("")
    (first / "docker").mkdir()
    resident.run(first)
    got = resident.run(second)
    assert all(_forked(h, resident) for h in got["hosts"]), resident.log.read_text()
    assert not [f for f in got["hosts"][0]["finders"] if "first-project" in f], got["hosts"]


def test_a_file_found_ahead_of_an_imported_one_ends_the_resident_host(tmp_path):
    """A package added, since the resident host started, ahead on its path of one it
    imported (certifi, which requests imports): a new interpreter would import the new
    one, so the resident host refuses and exits to be replaced."""
    def certifi_ahead(site: Path) -> None:
        (site / "certifi").mkdir()
        (site / "certifi" / "__init__.py").write_text("def where():\n    return 'x'\n")

    _replaced_after(tmp_path, certifi_ahead, "certifi would now be found elsewhere")


# The multiplexer's side of a forked host's end: ForkedHost as Mitogen's reaper polls it, the
# resident host's report played by a thread that waits for a real child, as
# resident_host.Forks._ended does.
HOST_END = r"""
import json, os, resource, socket, subprocess, sys, threading
from ansible.plugins.loader import init_plugin_loader
init_plugin_loader([sys.argv[1]])
import importlib
plugin = importlib.import_module("ansible_collections.fem.core.plugins.strategy.mitogen_linear")
send = plugin.resident_host.send


def host(wait_s, fd=None):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(3)"],
                             stdin=subprocess.PIPE)
    ours, theirs = socket.socketpair()
    pidfd = os.pidfd_open(child.pid)
    if fd is not None:  # the multiplexer's descriptors above select(2)'s 1023
        os.dup2(ours.detach(), fd)
        ours = socket.socket(fileno=fd)
        os.dup2(pidfd, fd + 1)
        pidfd = fd + 1
    plugin.END_WAIT_S = wait_s
    return child, theirs, plugin.ForkedHost(child.pid, pidfd, ours, None, None)


def ended(child, theirs):
    send(theirs, {"rc": child.wait()}, [])


seen = {}
# The report is there, whole, when the reaper first looks.
child, theirs, forked = host(30.0)
child.stdin.close()
ended(child, theirs)
seen["whole"] = forked.poll()
# The host ends as the reaper first looks (its stdio closed): the first look waits for it.
child, theirs, forked = host(30.0)
threading.Thread(target=ended, args=(child, theirs)).start()
child.stdin.close()
seen["first"] = forked.poll()
# A host that does not end in the wait: no status yet; later looks do not wait, and take
# the report as it comes, in parts.
child, theirs, forked = host(0.01)
seen["alive"] = forked.poll()
plugin.END_WAIT_S = 600.0  # were it waited for, the test's deadline would fail it
seen["still"] = forked.poll()
child.stdin.close()
body = json.dumps({"rc": child.wait()}).encode()
theirs.sendall(len(body).to_bytes(4, "big"))
seen["size only"] = forked.poll()
theirs.sendall(body)
seen["rest"] = forked.poll()
# Descriptors above 1023, as a multiplexer with many contexts has them.
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
child, theirs, forked = host(30.0, fd=2000)
threading.Thread(target=ended, args=(child, theirs)).start()
child.stdin.close()
seen["high fd"] = forked.poll()
# The resident host gone (its end of the connection closed): the host's end is taken from
# its pidfd, how it ended not known.
child, theirs, forked = host(0.01, fd=2000)
theirs.close()
seen["server gone, host alive"] = forked.poll()
child.stdin.close()
child.wait()
seen["server gone, host ended"] = forked.poll()
print(json.dumps(seen))
"""


def test_the_multiplexer_takes_a_forked_hosts_status_as_the_resident_host_reports_it(
        tmp_path):
    """Mitogen's reaper looks at a host's end as its stdio closes, then 50 ms later after
    a SIGTERM: a report that has come, or comes during the first look, is taken at once
    and whole; later looks do not wait for one; descriptors above select(2)'s range are
    waited on too; with the resident host gone, the host's end is its pidfd's."""
    done = subprocess.run([sys.executable, "-c", HOST_END, str(COLLECTIONS)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "whole": 3, "first": 3, "alive": None, "still": None, "size only": None, "rest": 3,
        "high fd": 3, "server gone, host alive": None, "server gone, host ended": -9}
