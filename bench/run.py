"""fem-ansible benchmarks: each figure measured side by side with its baseline in one run.

    .venv/bin/python bench/run.py            # full: 5+ runs per point, 50-task batches, 1 GiB
    .venv/bin/python bench/run.py --quick    # CI: fewer runs, small sizes (keeps it working)

Prints a table of ratios (fem-ansible / baseline, medians after a warm-up) and, with
``--write``, updates bench/RESULTS.md.  Uses the project's own services
(``scripts/services.sh start``): RabbitMQ, Docker engine, registry, git daemon, upload
endpoint.  A benchmark is not a test: nothing here fails on a slow number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fem_ansible import cgroups, runner, targets  # noqa: E402
from tests.support import ssh  # noqa: E402
from tests.support.harness import Listener, Orchestrator, site_config  # noqa: E402
from tests.support.services import ensure_services, upload_requests  # noqa: E402

BASELINE = textwrap.dedent("""\
    set -euo pipefail
    d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
    mkdir -p "$d/output"; chmod 777 "$d/output"
    docker pull -q "$IMAGE" >/dev/null
    git clone -q "$REPO_URL" "$d/src"
    docker run --rm --network none --read-only --user 65534:65534 \\
      -v "$d/src:/fem/src:ro" -v "$d/output:/fem/output" --name "b-$RANDOM$RANDOM" \\
      "$IMAGE" sh -c "$CMD" >/dev/null
    tar -C "$d/output" -czf "$d/outputs.tar.gz" .
    curl -sf -T "$d/outputs.tar.gz" "$UPLOAD/$NAME/outputs.tar.gz"
""")
TRIVIAL = "head -c 1024 /dev/urandom > /fem/output/out.bin"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class Bench:
    def __init__(self, quick: bool, tasks: int | None = None):
        self.quick = quick
        self.tasks = tasks
        self.env = ensure_services()
        self.tmp = Path(tempfile.mkdtemp(prefix="fem-bench-"))
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.groups: dict[str, Path] = {}

    # -- building blocks -------------------------------------------------------------------

    def task(self, node: str, tid: str, command: str = TRIVIAL) -> dict:
        up = self.env["FEM_TEST_UPLOAD_URL"]
        return {
            "schema": "fem.task/v1", "task_id": tid,
            "image": {"ref": self.env["FEM_TEST_IMAGE"]},
            "source": {"repo": self.env["FEM_TEST_GIT_URL"]},
            "command": ["sh", "-c", command],
            "outputs": {"upload": {"url": f"{up}/bench/{node}/{tid}/outputs.tar.gz"}},
            "resources": {"memory": "128Mi", "timeout_s": 600},
        }

    def listener(self, node: str, policy: dict | None = None,
                 env: dict[str, str] | None = None, **execution
                 ) -> tuple[Listener, Orchestrator]:
        """A listener for ``node``; ``policy`` keys replace those of the test policy; ``env``
        is added to its environment."""
        cfg = site_config(self.tmp / node, self.env, node,
                          execution={"work_dir": str(self.tmp / node / "work"),
                                     "keep_runs": 2, **execution}, policy=policy or {})
        self.groups[node] = lane_cgroup(node)
        with started_in(self.groups[node]):
            lst = Listener(cfg, self.tmp / node / "listener.log", env=env).start()
        return lst, Orchestrator(node)

    def cpu(self, node: str) -> float:
        """CPU seconds used so far by ``node``'s listener and everything it started (its
        runs, the resident Ansible, Mitogen's and Ansible's processes; not the engine's)."""
        return cgroup_cpu_s(self.groups[node])

    def close(self) -> None:
        """Remove what the benchmark made: its dirs and its listeners' cgroups (their
        listeners stopped)."""
        for group in self.groups.values():
            remove_cgroup(group)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def steps_env(self, name: str, command: str, uploads: str) -> dict[str, str]:
        """What the shell script and the plain playbook take: the same image, repository,
        command and upload place (``uploads``, under the upload endpoint's bench/)."""
        return {"IMAGE": self.env["FEM_TEST_IMAGE"], "REPO_URL": self.env["FEM_TEST_GIT_URL"],
                "CMD": command, "NAME": name,
                "UPLOAD": f"{self.env['FEM_TEST_UPLOAD_URL']}/bench/{uploads}"}

    def baseline(self, name: str, command: str = TRIVIAL) -> float:
        env = {**os.environ, **self.steps_env(name, command, "shell")}
        t = time.monotonic()
        subprocess.run(["bash", "-c", BASELINE], env=env, check=True)
        return time.monotonic() - t

    def plain(self, name: str, settings: str, playbook: Path = REPO / "bench/plain.yml",
              more_env: dict[str, str] | None = None) -> float:
        """The shell script's steps as a plain playbook (bench/plain.yml, or ``playbook``
        with ``more_env``) run by ``ansible-playbook`` on localhost: ``settings`` ``stock``
        is Ansible as installed, ``fem`` is the command, strategy and environment fem-ansible
        runs its playbooks with (fem_ansible.runner), without listener, roles, validation or
        reports."""
        work = Path(tempfile.mkdtemp(prefix="plain-", dir=self.tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "FEM_"))}
        env.update(self.steps_env(f"{settings}-{name}", TRIVIAL, "plain"), PLAIN_DIR=str(work))
        args = ["-i", "localhost,", "-c", "local", "-e",
                f"ansible_python_interpreter={sys.executable}", str(playbook)]
        if settings == "stock":
            cmd = [targets.ansible_bin("ansible-playbook"), *args]
        else:
            cache = self.tmp / "plain-cache"
            env.update(runner.ansible_env(f"plain-{name}", "mitogen",
                                          runner.collections_view(cache),
                                          runner.scan_cache_dir(cache)))
            cmd = runner.playbook_command(*args)
        env.update(more_env or {})
        t = time.monotonic()
        done = subprocess.run(cmd, env=env, cwd=self.tmp, capture_output=True, text=True)
        elapsed = time.monotonic() - t
        if done.returncode != 0 or work.exists():
            raise RuntimeError(f"plain playbook ({settings}) rc={done.returncode}:\n"
                               f"{done.stdout[-3000:]}{done.stderr[-2000:]}")
        return elapsed

    def fem_once(self, lst: Listener, orch: Orchestrator, node: str, tid: str,
                 command: str = TRIVIAL) -> float:
        t = time.monotonic()
        orch.publish(self.task(node, tid, command))
        final = orch.wait_terminal(tid, timeout=600)
        if final["state"] != "COMPLETED":
            raise RuntimeError(f"{tid}: {final['state']} {final.get('error')}\n{lst.tail()}")
        return time.monotonic() - t

    def row(self, name: str, fem: str, base: str, ratio: float | None, target: str) -> None:
        shown = f"{ratio:.2f}" if ratio is not None else "n/a"
        self.rows.append((name, fem, base, shown, target))
        print(f"{name:<34} {fem:>16} {base:>16} {shown:>7}  {target}", flush=True)

    # -- the five measures -----------------------------------------------------------------

    def overhead(self) -> None:
        """The default (execution.strategy mitogen, a resident Ansible), the same with every
        run started cold, and stock Ansible (linear), each against the shell script, with
        the controller CPU a task takes (everything the listener started: its runs, the
        resident Ansible, Mitogen's and Ansible's processes; not the engine's); and two
        controls: the script's steps as a plain playbook, under stock Ansible and under
        fem-ansible's settings, which is what any playbook run per task costs.  Interleaved
        so that all of them see the same machine."""
        runs = 1 if self.quick else 7
        variants = {"mitogen": {"strategy": "mitogen"},
                    "cold": {"strategy": "mitogen", "resident_ansible": False},
                    "linear": {"strategy": "linear"}}
        lanes = {}
        for name, execution in variants.items():
            node = f"bench{uuid.uuid4().hex[:6]}"
            lanes[name] = (node, *self.listener(node, **execution))
        fem: dict[str, list[float]] = {name: [] for name in lanes}
        cpu: dict[str, list[float]] = {name: [] for name in lanes}
        first = {name: 0.0 for name in lanes}
        plain: dict[str, list[float]] = {"stock": [], "fem": []}
        base = []
        try:
            for name, (node, lst, orch) in lanes.items():
                first[name] = self.fem_once(lst, orch, node, "warm")
            for settings in plain:
                self.plain("warm", settings)
            self.baseline("warm")
            for i in range(runs):
                for name, (node, lst, orch) in lanes.items():
                    used = self.cpu(node)
                    fem[name].append(self.fem_once(lst, orch, node, f"o{i}"))
                    cpu[name].append(self.cpu(node) - used)
                for settings, times in plain.items():
                    times.append(self.plain(f"o{i}", settings))
                base.append(self.baseline(f"o{i}"))
        finally:
            for _node, lst, orch in lanes.values():
                lst.stop()
                orch.close()
        for name, label in (("mitogen", ""), ("cold", ", resident Ansible off"),
                            ("linear", ", strategy linear")):
            self.row(f"overhead: trivial task{label} (s)", f"{median(fem[name]):.2f}",
                     f"{median(base):.2f}", median(fem[name]) / median(base), "≤ 2.0")
            self.row(f"controller CPU: trivial task{label} (CPU-s)", f"{median(cpu[name]):.2f}",
                     "-", None, "≤ 1.0")
            self.row(f"first task after start{label} (s)", f"{first[name]:.2f}",
                     f"{median(base):.2f}", first[name] / median(base), "(no slower)")
        for settings, label in (("stock", "stock Ansible"), ("fem", "fem's settings")):
            self.row(f"control: plain playbook, {label} (s)",
                     f"{median(plain[settings]):.2f}", f"{median(base):.2f}",
                     median(plain[settings]) / median(base), "(what a playbook per task costs)")

    def throughput(self) -> None:
        count = self.tasks or (2 if self.quick else 50)
        for parallel in (1, 4) if self.quick else (1, 2, 4):
            node = f"bench{uuid.uuid4().hex[:6]}"
            lst, orch = self.listener(node, max_parallel=parallel)
            try:
                self.fem_once(lst, orch, node, "warm")
                t = time.monotonic()
                for i in range(count):
                    orch.publish(self.task(node, f"t{i}"))
                for i in range(count):
                    orch.wait_terminal(f"t{i}", timeout=1800)
                fem_rate = count / (time.monotonic() - t) * 60
            finally:
                lst.stop()
                orch.close()
            t = time.monotonic()
            with ThreadPoolExecutor(parallel) as pool:
                names = [f"p{parallel}-{i}" for i in range(count)]
                list(pool.map(self.baseline, names))
            base_rate = count / (time.monotonic() - t) * 60
            self.row(f"throughput: {count} tasks, parallel {parallel} (/min)",
                     f"{fem_rate:.1f}", f"{base_rate:.1f}", base_rate / fem_rate, "≤ 2.0")

    def stage_out(self) -> None:
        size_mib = 32 if self.quick else 1024
        node = f"bench{uuid.uuid4().hex[:6]}"
        lst, orch = self.listener(node)
        # busybox's head takes no size suffix; dd counts blocks
        command = f"dd if=/dev/urandom of=/fem/output/big.bin bs=1048576 count={size_mib}"
        try:
            self.fem_once(lst, orch, node, "warm")
            pid = lst.proc.pid
            base_rss = _rss_kib(pid)
            peak = [base_rss]
            done = False

            def sample() -> None:
                while not done:
                    peak.append(_rss_kib(pid))
                    time.sleep(0.05)

            sampler = ThreadPoolExecutor(1)
            sampler.submit(sample)
            orch.publish(self.task(node, "big", command))
            started = None
            while True:
                orch.drain(0.05)
                states = {e["state"] for e in orch.events("big")}
                if "STAGING_OUT" in states and started is None:
                    started = time.monotonic()
                if states & {"COMPLETED", "FAILED"}:
                    break
            fem_s = time.monotonic() - (started or time.monotonic())
            done = True
            sampler.shutdown()
            final = next(e for e in orch.events("big") if e["state"] in ("COMPLETED", "FAILED"))
            if final["state"] != "COMPLETED":  # no upload to time: say why, not a KeyError
                raise RuntimeError(f"the stage-out task failed: {final['error']}; listener "
                                   f"log: {self.tmp / node}")
            archive = next(p for p in (self.tmp / node / "work" / "runs" / "big").rglob(
                "outputs.tar.gz"))
            curl_url = f"{self.env['FEM_TEST_UPLOAD_URL']}/bench/curl/{node}.tar.gz"
            subprocess.run(["curl", "-sf", "-T", str(archive), curl_url], check=True)
            mib = archive.stat().st_size / 2**20
        finally:
            lst.stop()
            orch.close()
        # The upload itself, timed by the endpoint for both clients (headers read to answer).
        records = {r["path"]: r for r in upload_requests(self.env)}
        fem_up = records[f"/bench/{node}/big/outputs.tar.gz"]
        curl_up = records[f"/bench/curl/{node}.tar.gz"]
        fem_mibs = mib / (fem_up["ts"] - fem_up["started"])
        curl_mibs = mib / (curl_up["ts"] - curl_up["started"])
        self.row(f"stage-out: upload of {mib:.0f} MiB archive (MiB/s)", f"{fem_mibs:.0f}",
                 f"{curl_mibs:.0f}", fem_mibs / curl_mibs, "≥ 0.8 (fem/curl)")
        # All of stage-out (size check, tar+gzip, hash, upload) against curl's upload alone.
        self.row(f"stage-out: all of it, {size_mib} MiB output (s)", f"{fem_s:.1f}",
                 f"{curl_up['ts'] - curl_up['started']:.1f}", None, "informative")
        growth = (max(peak) - base_rss) / 1024
        self.row("stage-out: listener RSS growth (MiB)", f"{growth:.1f}", "-", None, "≤ 64")

    def footprint(self) -> None:
        seconds = 10 if self.quick else 60
        node = f"bench{uuid.uuid4().hex[:6]}"
        lst, orch = self.listener(node)
        try:
            time.sleep(2)
            pid = lst.proc.pid
            cpu0, t0 = cpu_s(pid), time.monotonic()
            time.sleep(seconds)
            cpu = (cpu_s(pid) - cpu0) / (time.monotonic() - t0) * 100
            rss = _rss_kib(pid) / 1024
        finally:
            lst.stop()
            orch.close()
        self.row(f"footprint: idle RSS (MiB, {seconds}s)", f"{rss:.1f}", "-", None, "≤ 80")
        self.row("footprint: idle CPU (% of a core)", f"{cpu:.2f}", "-", None, "≤ 1")

    def scale(self) -> None:
        counts = (1, 2) if self.quick else (1, 20)
        results = {}
        for n in counts:
            node = f"bench{uuid.uuid4().hex[:6]}"
            listeners = []
            for k in range(n):
                cfg = site_config(self.tmp / node / f"l{k}", self.env, node, listener_id=f"l{k}",
                                  execution={"work_dir": str(self.tmp / node / f"w{k}"),
                                             "keep_runs": 2})
                listeners.append(Listener(cfg, self.tmp / node / f"l{k}.log").start())
            orch = Orchestrator(node)
            try:
                self.fem_once(listeners[0], orch, node, "warm")
                results[n] = median([self.fem_once(listeners[0], orch, node, f"s{i}")
                                     for i in range(1 if self.quick else 5)])
            finally:
                for lst in listeners:
                    lst.stop()
                orch.close()
        lo, hi = counts
        self.row(f"scale: {hi} vs {lo} listeners, overhead (s)", f"{results[hi]:.2f}",
                 f"{results[lo]:.2f}", results[hi] / results[lo], "grows little")

    def hosts(self) -> None:
        """Overhead of a task on an inventory of 1, 4 or 16 loopback SSH hosts (one sshd
        each, tests/support/ssh.py); tasks go to the group, so they spread over the hosts."""
        counts = (1, 2) if self.quick else (1, 4, 16)
        results = {}
        ssh.ensure_user()
        for n in counts:
            node = f"bench{uuid.uuid4().hex[:6]}"
            base = ssh.new_dir(node)
            keys = ssh.SshKeys(base / "client")
            made = {f"h{i}": ssh.SshHost(f"127.0.1.{i + 1}", base / f"h{i}", keys).start()
                    for i in range(n)}
            inv = ssh.inventory(base / "inventory.yml", made)
            lst, orch = self.listener(node, inventory=str(inv), target="compute",
                                      ssh={"private_key_file": str(keys.private_key),
                                           "known_hosts_file": str(keys.known_hosts)},
                                      policy={"targets": {"allow": ["compute"]}})
            try:
                runs = max(n, 1 if self.quick else 5)  # every host warm, then its tasks
                for i in range(0 if self.quick else n):  # quick: the harness, not figures
                    self.fem_once(lst, orch, node, f"warm{i}")
                results[n] = median([self.fem_once(lst, orch, node, f"h{i}")
                                     for i in range(runs)])
            finally:
                lst.stop()
                orch.close()
                for host in made.values():
                    host.stop()
                shutil.rmtree(base, ignore_errors=True)
        for n in counts[1:]:
            self.row(f"scale: {n} vs 1 SSH hosts, overhead (s)", f"{results[n]:.2f}",
                     f"{results[1]:.2f}", results[n] / results[1], "grows little")

    def kept_ssh(self) -> None:
        """A trivial task on one loopback SSH host, its connection kept between runs (the
        default) against a connection per run (``execution.ssh.keep_connections: false``):
        two listeners on the same sshd, tasks alternating between them, each side first in
        turn; time and the controller CPU of each (the sshd's is not counted)."""
        rounds = 1 if self.quick else 8
        ssh.ensure_user()
        node_base = f"bench{uuid.uuid4().hex[:6]}"
        base = ssh.new_dir(node_base)
        keys = ssh.SshKeys(base / "client")
        host = ssh.SshHost("127.0.1.1", base / "h0", keys).start()
        inv = ssh.inventory(base / "inventory.yml", {"h0": host})
        lanes = {}
        times: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        try:
            for keep in (True, False):
                node = f"{node_base}{'k' if keep else 'n'}"
                lanes[keep] = (node, *self.listener(
                    node, inventory=str(inv), target="h0",
                    ssh={"private_key_file": str(keys.private_key),
                         "known_hosts_file": str(keys.known_hosts), "keep_connections": keep},
                    policy={"targets": {"allow": ["h0"]}}))
            for node, lst, orch in lanes.values():
                self.fem_once(lst, orch, node, "warm")
            for i in range(rounds):
                for keep in (True, False) if i % 2 == 0 else (False, True):
                    node, lst, orch = lanes[keep]
                    used = self.cpu(node)
                    times[keep].append(self.fem_once(lst, orch, node, f"k{i}"))
                    cpu[keep].append(self.cpu(node) - used)
        finally:
            for _node, lst, orch in lanes.values():
                lst.stop()
                orch.close()
            host.stop()
            shutil.rmtree(base, ignore_errors=True)
        self.row("SSH host: trivial task, connection kept vs per run (s)",
                 f"{median(times[True]):.2f}", f"{median(times[False]):.2f}",
                 median(times[True]) / median(times[False]), "< 1")
        self.row("SSH host: controller CPU, kept vs per run (CPU-s)",
                 f"{median(cpu[True]):.2f}", f"{median(cpu[False]):.2f}",
                 median(cpu[True]) / median(cpu[False]), "< 1")

    # -- output ----------------------------------------------------------------------------

    def table(self) -> str:
        lines = ["| measure | fem-ansible | baseline | ratio | target |", "|---|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in self.rows]
        return "\n".join(lines)

    def machine(self) -> str:
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.machine())
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
        docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                                capture_output=True, text=True).stdout.strip()
        return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} x {cpu}, "
                f"{mem} GiB, Python {platform.python_version()}, Docker {docker}, "
                f"{'quick' if self.quick else 'full'} mode")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def lane_cgroup(name: str) -> Path:
    """A cgroup (v2) of the bench's own, for one listener and everything it starts (a forked
    run's CPU is not the listener's: the resident Ansible reaps it)."""
    root = cgroups.base()
    if root is None:
        raise SystemExit("the bench needs a writable cgroup v2 (root) to count CPU")
    group = root.parent / f"fem-bench-{name}"
    group.mkdir()
    return group


@contextlib.contextmanager
def started_in(group: Path) -> Iterator[None]:
    """Processes started meanwhile begin in ``group`` (this process moves there and back)."""
    own = cgroups.base()
    assert own is not None
    cgroups.join(group)
    try:
        yield
    finally:
        cgroups.join(own.parent)


def remove_cgroup(group: Path) -> None:
    """``group`` and the groups its listener made, once their processes have ended."""
    for path in sorted(group.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            cgroups.remove(path)
    cgroups.remove(group)


def cgroup_cpu_s(group: Path) -> float:
    """CPU seconds used so far by the processes of ``group`` and its sub-groups."""
    for line in (group / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    raise RuntimeError(f"{group}/cpu.stat has no usage_usec")


def cpu_s(pid: int, children: bool = False) -> float:
    """CPU seconds of ``pid`` itself (utime + stime) or, with ``children``, of its reaped
    descendants (cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, small sizes (CI)")
    parser.add_argument("--only", nargs="*", help="run only these measures")
    parser.add_argument("--write", action="store_true", help="record in bench/RESULTS.md")
    parser.add_argument("--tasks", type=int, help="tasks per throughput point (default 50, "
                        "quick 2): fewer for a before/after on a slow machine")
    args = parser.parse_args()
    bench = Bench(args.quick, args.tasks)
    measures: dict[str, Callable[[], None]] = {
        "overhead": bench.overhead, "throughput": bench.throughput,
        "stage_out": bench.stage_out, "footprint": bench.footprint, "scale": bench.scale,
        "hosts": bench.hosts, "kept_ssh": bench.kept_ssh,
    }
    print(f"{'measure':<34} {'fem-ansible':>16} {'baseline':>16} {'ratio':>7}  target")
    try:
        for name, fn in measures.items():
            if not args.only or name in args.only:
                fn()
    finally:
        bench.close()
    print(f"\nmachine: {bench.machine()}")
    if args.write:
        results = REPO / "bench" / "RESULTS.md"
        entry = f"\n## {bench.machine()}\n\n{bench.table()}\n"
        with results.open("a") as f:
            f.write(entry)
        print(f"appended to {results}")
    print(json.dumps({"rows": bench.rows}))


if __name__ == "__main__":
    main()
