"""The resident Ansible end to end (issue 30): runs are forked from it, and still isolated
from each other: concurrent, each in its own cgroup, no module state carried from one task
to the next, a changed module file run anew, a cancel that leaves no process behind, and a
server killed mid-run that costs its task nothing but a new attempt.

Through a real listener, broker, engine, registry, git daemon and upload endpoint; the site
adds a probe role to a copy of the built-in task playbook, as a sysadmin would (its own
module in the role's library).
"""

from __future__ import annotations

import json
import marshal
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from fem_ansible import cgroups
from fem_ansible.resident import client_command, servers_dir
from tests.support.harness import NOTHING_LEFT, leftovers, task_name

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent

MODULE = '''\
#!/usr/bin/python
"""The site's probe: what process and cgroup a module call of this run is in, how many
calls this interpreter has seen (kept where module code can keep anything: on a module
that is never reloaded), and which version of this file ran."""
import os
import subprocess
import sys

from ansible.module_utils.basic import AnsibleModule

VERSION = "{version}"


def ancestors():
    out, pid = [], os.getpid()
    while pid > 1:
        with open(f"/proc/{{pid}}/cmdline", "rb") as f:
            out.append(f.read().replace(b"\\0", b" ").decode(errors="replace"))
        with open(f"/proc/{{pid}}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return out


def main():
    module = AnsibleModule(argument_spec={{"sleep": {{"type": "str", "default": "0"}},
                                          "started": {{"type": "path"}}}})
    sys.site_probe_calls = getattr(sys, "site_probe_calls", 0) + 1
    if module.params["started"]:
        open(module.params["started"], "w").close()
    if module.params["sleep"] != "0":
        subprocess.run(["sleep", module.params["sleep"]], check=True)
    with open("/proc/self/cgroup") as f:
        group = [line[3:].strip() for line in f if line.startswith("0::")][0]
    module.exit_json(changed=False, calls=sys.site_probe_calls, version=VERSION, cgroup=group,
                     ancestors=ancestors())


main()
'''

TASKS = '''\
---
- name: Probe this run
  site_probe:
    sleep: "{{ site_probe_sleep[fem_task.task_id] | default('0') }}"
    started: "{{ site_probe_dir }}/{{ fem_task.task_id }}.started"
  register: site_probe_first

- name: Probe it again
  site_probe: {}
  register: site_probe_second

- name: Keep what the probes saw
  ansible.builtin.copy:
    content: "{{ {'first': site_probe_first, 'second': site_probe_second,
                  'role': site_probe_role_version} | to_json }}"
    dest: "{{ site_probe_dir }}/{{ fem_task.task_id }}.json"
    mode: "0644"
'''


def write_probe_role(roles: Path, probes: Path, sleeps: dict[str, str],
                     version: str = "v1") -> None:
    role = roles / "site_probe"
    for sub in ("tasks", "defaults", "library"):
        (role / sub).mkdir(parents=True, exist_ok=True)
    (role / "tasks" / "main.yml").write_text(TASKS)
    write_defaults(role, probes, sleeps, version)
    write_module(role, version)


def write_defaults(role: Path, probes: Path, sleeps: dict[str, str], version: str) -> None:
    """The role's defaults, naming the role's ``version``: a new version has the same size
    and, within the file system's granularity, may have the same mtime (the resident
    Ansible parsed the old one ahead, fem_ansible.parsed_roles)."""
    (role / "defaults" / "main.yml").write_text(yaml.safe_dump(
        {"site_probe_dir": str(probes), "site_probe_sleep": sleeps,
         "site_probe_role_version": version}))


def write_module(role: Path, version: str) -> None:
    path = role / "library" / "site_probe.py"
    path.write_text(MODULE.format(version=version))
    stamp = time.time() + 2  # a new mtime even within the file system's granularity
    os.utime(path, (stamp, stamp))


def probe_playbook(tmp_path: Path, role: str = "site_probe") -> Path:
    """The built-in task playbook with the site's ``role`` first in stage-in."""
    plays = yaml.safe_load((REPO / "playbooks" / "task.yml").read_text())
    block = plays[0]["tasks"][0]["block"]
    block.insert(1, {"name": "Probe the run (site)", "ansible.builtin.include_role":
                     {"name": role}, "tags": ["stage_in"]})
    path = tmp_path / "site-playbooks" / "task.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(plays, sort_keys=False))
    return path


@pytest.fixture
def probed(site, tmp_path):
    """A site whose task playbook runs the probe role; returns a function starting its
    listener with more execution settings and the sleeps of task ids."""
    roles, probes = tmp_path / "site-roles", tmp_path / "probes"
    probes.mkdir()
    playbook = probe_playbook(tmp_path)

    def start(sleeps: dict[str, str] | None = None, resident: bool = True, **execution):
        write_probe_role(roles, probes, sleeps or {})
        config = site.config(execution={"work_dir": str(site.work_dir),
                                        "playbook": str(playbook),
                                        "roles_path": [str(roles)], **execution})
        # Whatever the suite runs with (FEMDEV_RESIDENT_ANSIBLE): these are its tests.
        return site.listener(config, env={
            "FEM_ANSIBLE_EXECUTION__RESIDENT_ANSIBLE": str(resident).lower()})

    start.roles, start.probes = roles, probes
    return start


def probe(probes: Path, tid: str) -> dict:
    return json.loads((probes / f"{tid}.json").read_text())


def forked(result: dict) -> bool:
    """Whether the module call's run was forked from a resident Ansible (or its host
    interpreter from the resident host the resident Ansible started)."""
    return any("fem_ansible.resident_server" in cmd for cmd in result["ancestors"])


def host_forked(result: dict) -> bool:
    """Whether the module call's host interpreter was forked by the resident host
    (fem.core's plugin_utils/resident_host.py), not started by its run's multiplexer."""
    return "resident_host.py" in result["ancestors"][0]  # not Mitogen's "python(mitogen:"


def in_the_probe(site, probed, tid: str, seconds: str):
    """A listener that ran a first task (its servers started and used), now running task
    ``tid``, which is in its probe's ``seconds`` of sleep."""
    listener = probed(sleeps={tid: seconds})
    site.orchestrator.publish(site.task("warm"))
    assert site.orchestrator.wait_terminal("warm")["state"] == "COMPLETED", listener.tail()
    site.orchestrator.publish(site.task(tid))
    wait_for(probed.probes / f"{tid}.started", listener)
    return listener


def wait_for(path: Path, listener, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared:\n{listener.tail()}"
        assert listener.alive, listener.tail()
        time.sleep(0.1)


def test_runs_forked_from_the_resident_ansible_keep_nothing_of_each_other(site, probed):
    """Task after task on one listener: the second run is forked; module state starts
    afresh in each (a count kept in the interpreter is 1, 2 in every run, never 3); a module
    file and a role file changed between tasks run their new code and values; each call is
    in its run's own cgroup."""
    listener = probed()
    orch = site.orchestrator
    results = {}
    for tid, version in (("first", "v1"), ("second", "v2"), ("third", "v2")):
        write_module(probed.roles / "site_probe", version)
        write_defaults(probed.roles / "site_probe", probed.probes, {}, version)
        orch.publish(site.task(tid))
        done = orch.wait_terminal(tid)
        assert done["state"] == "COMPLETED", (done, listener.tail())
        results[tid] = probe(probed.probes, tid)
    for tid, version in (("first", "v1"), ("second", "v2"), ("third", "v2")):
        first, second = results[tid]["first"], results[tid]["second"]
        assert (first["calls"], second["calls"]) == (1, 2), (tid, results[tid])
        assert first["version"] == version, (tid, first)
        assert results[tid]["role"] == version, (tid, results[tid])
        group = Path(first["cgroup"])
        assert group.parent.name == "fem-runs", first["cgroup"]
        assert group.name.startswith(task_name(site.node, tid) + "."), first["cgroup"]
        assert not (cgroups.mount() / group.relative_to("/")).exists()
    # The first run started cold while the server started; later ones were forked, and
    # their host interpreters by the resident host.
    for tid in ("second", "third"):
        assert forked(results[tid]["first"]), listener.tail()
        assert host_forked(results[tid]["first"]), (results[tid]["first"], listener.tail())
    assert "starting a resident Ansible" in listener.log.read_text()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_concurrent_runs_do_not_wait_for_each_other(site, probed):
    """Two tasks at once, each sleeping 2 s in its container: their sleeps overlap (a
    shared interpreter would run one after the other)."""
    listener = probed(max_parallel=2)
    orch = site.orchestrator
    warm = site.task("warm")
    orch.publish(warm)
    assert orch.wait_terminal("warm")["state"] == "COMPLETED", listener.tail()
    stamp = ("cut -d' ' -f1 /proc/uptime > /fem/output/start && sleep 2"
             " && cut -d' ' -f1 /proc/uptime > /fem/output/end")
    for tid in ("left", "right"):
        orch.publish(site.task(tid, command=["sh", "-c", stamp]))
    spans = {}
    for tid in ("left", "right"):
        done = orch.wait_terminal(tid)
        assert done["state"] == "COMPLETED", (done, listener.tail())
        assert forked(probe(probed.probes, tid)["first"]), listener.tail()
        from tests.support.archives import tar_members, uploaded_file

        files = tar_members(uploaded_file(site.env, done["outputs"]["url"]))
        spans[tid] = (float(files["start"]), float(files["end"]))
    (a0, a1), (b0, b1) = spans["left"], spans["right"]
    assert a0 < b1 and b0 < a1, spans


def test_a_cancel_during_a_module_call_leaves_no_process(site, probed):
    """A cancel while a module of a forked run waits on a child process: the run's cgroup
    is killed, nothing of the run is left on the host."""
    in_the_probe(site, probed, "slow", "61.7")
    orch = site.orchestrator
    time.sleep(0.5)  # the module is in its child's wait
    assert sleeping("61.7"), "the probe's sleep is not running"
    orch.cancel("slow")
    done = orch.wait_terminal("slow")
    assert done["state"] == "CANCELLED", done
    assert not sleeping("61.7")
    name = task_name(site.node, "slow")
    assert not [g for g in cgroups.base().iterdir() if g.name.startswith(name + ".")]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_a_server_killed_mid_run_costs_its_task_one_attempt(site, probed):
    """``kill -9`` of the resident Ansible while it serves a run: the run is killed with its
    cgroup and the task recovered, as after a ``kill -9`` of the listener: one terminal
    event."""
    listener = in_the_probe(site, probed, "victim", "4")
    orch = site.orchestrator
    servers = resident_servers(listener.proc.pid)
    assert servers, listener.tail()
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    (probed.probes / "victim.started").unlink()
    done = orch.wait_terminal("victim")
    assert done["state"] == "COMPLETED", (done, listener.tail())
    terminal = [e for e in orch.events("victim")
                if e["state"] in {"COMPLETED", "FAILED", "CANCELLED"}]
    assert len(terminal) == 1, terminal
    log = listener.log.read_text()
    assert "died during it; the task is recovered" in log, listener.tail()
    assert probe(probed.probes, "victim")["first"]["calls"] == 1
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_a_resident_host_killed_mid_run_costs_nothing(site, probed):
    """``kill -9`` of the resident host while a run's module call is in a host it forked:
    that host is the run's and goes on; the task completes, with one terminal event; the
    next task completes with a host its multiplexer started, or one forked by a resident
    host started again, as the log says."""
    listener = in_the_probe(site, probed, "victim", "3")
    orch = site.orchestrator
    hosts = resident_servers(listener.proc.pid, b"resident_host.py")
    assert len(hosts) == 1, listener.tail()
    assert _forks_of(hosts[0]), listener.tail()  # the victim's host, in its probe's sleep
    os.kill(hosts[0], signal.SIGKILL)
    done = orch.wait_terminal("victim")
    assert done["state"] == "COMPLETED", (done, listener.tail())
    terminal = [e for e in orch.events("victim")
                if e["state"] in {"COMPLETED", "FAILED", "CANCELLED"}]
    assert len(terminal) == 1, terminal
    assert host_forked(probe(probed.probes, "victim")["first"])
    listener.wait_for_log("the resident host ended (exit -9)")
    orch.publish(site.task("next"))
    assert orch.wait_terminal("next")["state"] == "COMPLETED", listener.tail()
    restarted = "a new one starts" in listener.log.read_text()
    assert host_forked(probe(probed.probes, "next")["first"]) == restarted, listener.tail()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def _forks_of(pid: int) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
            and _parent(entry) == pid]


def _parent(entry: Path) -> int:
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def test_sighup_replaces_the_servers_and_runs_go_on(site, probed):
    """SIGHUP (an Ansible upgraded in place): the servers retire, the next task is forked
    from new ones."""
    listener = probed()
    orch = site.orchestrator
    orch.publish(site.task("before"))
    assert orch.wait_terminal("before")["state"] == "COMPLETED", listener.tail()
    old = set(resident_servers(listener.proc.pid))
    assert old, listener.tail()
    listener.proc.send_signal(signal.SIGHUP)
    listener.wait_for_log("retiring: SIGTERM")
    orch.publish(site.task("after"))
    assert orch.wait_terminal("after")["state"] == "COMPLETED", listener.tail()
    assert forked(probe(probed.probes, "after")["first"]), listener.tail()
    new = set(resident_servers(listener.proc.pid))
    assert new and not new & old, (old, new)
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_with_the_resident_ansible_off_runs_start_cold(site, probed):
    """``execution.resident_ansible: false``: no server, every run its own Ansible, still
    in its own cgroup."""
    listener = probed(resident=False)
    orch = site.orchestrator
    for tid in ("one", "two"):
        orch.publish(site.task(tid))
        assert orch.wait_terminal(tid)["state"] == "COMPLETED", listener.tail()
        result = probe(probed.probes, tid)["first"]
        assert not forked(result)
        assert Path(result["cgroup"]).parent.name == "fem-runs"
    assert not resident_servers(listener.proc.pid)
    assert "resident Ansible" not in listener.log.read_text()


def sleeping(seconds: str) -> bool:
    done = subprocess.run(["pgrep", "-f", f"^sleep {seconds}$"], capture_output=True,
                          check=False)
    return done.returncode == 0


def resident_servers(listener: int, what: bytes = b"fem_ansible.resident_server"
                     ) -> list[int]:
    """The resident Ansible servers of the listener ``listener`` (its children: the runs
    they fork have the same command line), or their children whose command line holds
    ``what``."""
    found = []
    parents = {listener} if what == b"fem_ansible.resident_server" else set(
        resident_servers(listener))
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if what in cmd and parent in parents:
                found.append(int(entry.name))
    return found


def test_the_client_runs_cold_where_no_server_listens(tmp_path):
    """The client alone (no server socket): it joins no group it is not given and becomes the
    cold command, with its exit code."""
    script = textwrap.dedent("""\
        import os, sys
        print(os.environ.get("FEM_RUN_CGROUP", "none"), sys.argv[1:])
        sys.exit(7)
    """)
    done = subprocess.run(
        [*client_command(tmp_path / "none.sock", 0.2), sys.executable, "-c", script, "a"],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, check=False)
    assert done.returncode == 7, done
    assert "none ['a']" in done.stdout


# From the outside review of this work: each failed before its fix.

NOBODY = 65534


def test_the_client_hands_its_terminal_only_to_a_server_of_its_own_user():
    """Another local user listening where the client connects (the temp-dir fallback for
    the sockets, through a link swapped after the listener's check): the client sends it
    neither the run's pty (the vault password is answered on it) nor argv and environment,
    takes no exit code from it, and runs cold."""
    assert os.getuid() == 0, "CI runs as root: this test is another user's server"
    group = cgroups.create(f"review-{os.getpid()}")
    assert group is not None
    directory = Path(tempfile.mkdtemp(prefix="fem-review-"))
    directory.chmod(0o777)  # the other user's
    path, got = directory / "s.sock", directory / "got"
    fake = (
        "import os, socket, json, sys\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "open(sys.argv[1] + '.ready', 'w').close()\n"
        "c, _ = s.accept()\n"
        "data, fds, _, _ = socket.recv_fds(c, 1 << 20, 3)\n"
        "open(sys.argv[2], 'w').write(json.dumps(len(fds)))\n"
        "c.sendall(b'{\"rc\": 0}\\n')\n")
    server = subprocess.Popen([sys.executable, "-c", fake, str(path), str(got)])
    try:
        deadline = time.monotonic() + 20
        while not Path(f"{path}.ready").exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        done = subprocess.run([*client_command(path), "/bin/sh", "-c", "exit 7"],
                              env={"PATH": os.environ["PATH"], cgroups.ENV: str(group)},
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        server.kill()
        server.wait()
        cgroups.remove(group)
        handed = json.loads(got.read_text()) if got.exists() else 0
        shutil.rmtree(directory, ignore_errors=True)
    assert handed == 0, f"the client sent its {handed} stdio fds to a server of uid {NOBODY}"
    assert done.returncode == 7, "the exit code came from a server of another user"
    assert "is another user's: not used" in done.stderr


def test_a_server_that_cannot_start_fails_no_task(site, probed):
    """The resident Ansible cannot be started again (its working dir is in the way): runs
    start cold, the task ends, nothing is left behind."""
    listener = probed()
    orch = site.orchestrator
    orch.publish(site.task("warm"))
    assert orch.wait_terminal("warm")["state"] == "COMPLETED", listener.tail()
    servers = resident_servers(listener.proc.pid)
    assert servers, listener.tail()
    cwd = servers_dir(site.work_dir) / "cwd"
    cwd.rmdir()
    cwd.write_text("in the way\n")
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    orch.publish(site.task("nocwd"))
    done = orch.wait_terminal("nocwd", timeout=120)
    assert done["state"] == "COMPLETED", (done, listener.tail())
    assert not forked(probe(probed.probes, "nocwd")["first"])
    assert "could not start" in listener.log.read_text()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


MARK_FILTERS = {
    "plain": 'def site_mark(value):\n    return f"{value}-plain"\n',
    "context": ("from jinja2 import pass_context\n\n\n@pass_context\n"
                'def site_mark(context, value):\n    return f"{value}-context"\n'),
}
MARK_MODULE = """\
{body}

class FilterModule:
    def filters(self):
        return {{"site_mark": site_mark}}
"""
MARK_TASKS = """\
---
- name: Mark the run with the site's filter
  ansible.builtin.copy:
    content: "{{ 'x' | site_mark }}"
    dest: "{{ site_mark_dir }}/{{ fem_task.task_id }}.txt"
    mode: "0644"
"""


def write_mark_role(roles: Path, marks: Path, kind: str) -> None:
    """A site role whose filter plugin (in the role, as a sysadmin keeps it) is ``kind``:
    ``plain``, or ``context`` (Jinja passes it the context: compiled code differs)."""
    role = roles / "site_mark"
    for sub in ("tasks", "defaults", "filter_plugins"):
        (role / sub).mkdir(parents=True, exist_ok=True)
    (role / "tasks" / "main.yml").write_text(MARK_TASKS)
    (role / "defaults" / "main.yml").write_text(yaml.safe_dump({"site_mark_dir": str(marks)}))
    path = role / "filter_plugins" / "site_mark.py"
    path.write_text(MARK_MODULE.format(body=MARK_FILTERS[kind]))
    stamp = time.time() + 2
    os.utime(path, (stamp, stamp))


def compiled_with(cache: Path) -> set[str]:
    """How the site filter was passed its arguments in the templates the runs kept
    compiled (fem_ansible.compiled_templates: an entry is the dependencies it was compiled
    with, and the code)."""
    seen = set()
    for entry in cache.iterdir():
        try:
            value = marshal.loads(entry.read_bytes())
        except (ValueError, EOFError, TypeError):
            continue
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], list):
            seen |= {dep[2] for dep in value[0] if dep[:2] == ["filter", "site_mark"]}
    return seen


def test_templates_compiled_once_are_reused_and_compiled_again_when_a_filter_changes(
        site, tmp_path):
    """Through a listener and its resident Ansible: a template naming a site role's filter
    is compiled by the first task and kept; the second task compiles nothing (no entry of
    the derived cache written again); once the sysadmin changes the filter to take Jinja's
    context, the third task compiles the template again and gets the new filter's result."""
    roles, marks = tmp_path / "site-roles", tmp_path / "marks"
    marks.mkdir()
    write_mark_role(roles, marks, "plain")
    config = site.config(execution={"work_dir": str(site.work_dir),
                                    "playbook": str(probe_playbook(tmp_path, "site_mark")),
                                    "roles_path": [str(roles)]})
    listener = site.listener(config, env={"FEM_ANSIBLE_EXECUTION__RESIDENT_ANSIBLE": "true"})
    orch, cache = site.orchestrator, site.work_dir / "import-scan-cache"

    def run(tid: str) -> str:
        orch.publish(site.task(tid))
        done = orch.wait_terminal(tid)
        assert done["state"] == "COMPLETED", (done, listener.tail())
        return (marks / f"{tid}.txt").read_text()

    def entries() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    assert run("one") == "x-plain"
    assert compiled_with(cache) == {"plain"}
    kept = entries()
    assert run("two") == "x-plain"
    assert entries() == kept
    write_mark_role(roles, marks, "context")
    assert run("three") == "x-context"
    assert compiled_with(cache) == {"context"}
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_hostile_files_on_the_roles_path_cost_the_runs_nothing(site, probed):
    """A role no run uses holds what a resident Ansible parsing role files ahead must not
    choke on (fem_ansible.parsed_roles, which parses only what runs parsed): a FIFO and a
    device where vars would be, YAML nested too deep to copy.  Tasks complete, forked from
    the same server all along, nothing went wrong in it, and it took in every run's report
    of what it parsed."""
    odd = probed.roles / "odd"
    for sub in ("vars", "defaults", "meta"):
        (odd / sub).mkdir(parents=True)
    os.mkfifo(odd / "vars" / "main.yml")
    (odd / "meta" / "main.yml").symlink_to("/dev/zero")
    (odd / "defaults" / "main.yml").write_text("x: " + "[" * 600 + "1" + "]" * 600 + "\n")
    listener = probed()
    orch = site.orchestrator
    servers = []
    for tid in ("one", "two", "three"):
        orch.publish(site.task(tid))
        done = orch.wait_terminal(tid)
        assert done["state"] == "COMPLETED", (done, listener.tail())
        servers.append(set(resident_servers(listener.proc.pid)))
    assert forked(probe(probed.probes, "two")["first"]), listener.tail()
    assert forked(probe(probed.probes, "three")["first"]), listener.tail()
    assert servers[0] and servers[0] == servers[2], servers
    log = listener.log.read_text()
    assert "Traceback" not in log and "no longer parsed" not in log, listener.tail()
    assert not list(servers_dir(site.work_dir).rglob("*.parsed*"))
    # The runs' reports were parsed: the built-in roles' files are kept ahead.
    counts = [int(n) for n in re.findall(r"role files parsed ahead: (\d+)", log)]
    assert counts and max(counts) >= 20, listener.tail()
