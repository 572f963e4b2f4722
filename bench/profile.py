"""Where one trivial task's time goes: the listener's events and the playbook's tasks.

    .venv/bin/python bench/profile.py                      # execution.strategy mitogen
    .venv/bin/python bench/profile.py --strategy linear    # stock Ansible
    .venv/bin/python bench/profile.py --without own_host   # one patch of the fast path off

Runs a warm-up task and one measured task through a real listener (the benchmark's
services and task), then prints, in seconds from the task's publication, when each event
was published, when ansible-playbook wrote its first and last event and when ansible-runner
finished, and each playbook task's own duration from the run's job events; then the CPU
the task cost on the controller (everything the listener started, in its cgroup:
ansible-playbook, its workers, module interpreters, the resident Ansible) against the shell
script's.  The table "Where the time goes" in bench/RESULTS.md is read off this.
``--without GROUP`` leaves out a patch group of the fast path (fem.core's
``plugin_utils/fastpath.py``, ``FEMCORE_FASTPATH_OFF``); bench/pairs.py measures each one's
gain with it.  The listener runs with ``PYTHONUNBUFFERED=1``, as
contrib/fem-ansible.service starts it.
"""

from __future__ import annotations

import argparse
import resource
import time
import uuid
from pathlib import Path

from breakdown import created, job_events
from run import Bench

from fem_ansible.schema import event_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["mitogen", "linear"], default="mitogen")
    parser.add_argument("--without", action="append", default=[], metavar="GROUP",
                        help="a patch group of the fast path to leave out (repeatable)")
    args = parser.parse_args()
    bench = Bench(quick=True)
    env = {"PYTHONUNBUFFERED": "1", "FEMCORE_FASTPATH_OFF": ",".join(args.without)}
    try:
        _profile(bench, args.strategy, env)
    finally:  # the listener's work dir, run dirs and cgroup, as bench/run.py leaves nothing
        bench.close()


def _profile(bench: Bench, strategy: str, env: dict[str, str]) -> None:
    node = f"profile{uuid.uuid4().hex[:6]}"
    lst, orch = bench.listener(node, env=env, strategy=strategy)
    try:
        bench.fem_once(lst, orch, node, "warm")
        cpu0 = bench.cpu(node)
        t0 = time.time()
        total = bench.fem_once(lst, orch, node, "p0")
        fem_cpu = bench.cpu(node) - cpu0
        events = orch.events("p0")
        found, ansible = job_events(bench.tmp / node / "work", "p0")
        artifacts: Path = found.parent
    finally:
        lst.stop()
        orch.close()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    bench.baseline("profile")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shell_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"strategy {strategy}: published to COMPLETED received in {total:.2f} s\n")
    marks = [(event_time(e) - t0, f"event {e['state']}") for e in events]
    marks += [(created(ansible[0]) - t0, "ansible-playbook: first event"),
              (created(ansible[-1]) - t0, "ansible-playbook: last event"),
              ((artifacts / "rc").stat().st_mtime - t0, "ansible-runner: run over")]
    for at, what in sorted(marks):
        print(f"{at:7.2f}  {what}")
    print("\nplaybook tasks (own duration, s):")
    for e in ansible:
        data = e.get("event_data", {})
        if e["event"] in ("runner_on_ok", "runner_on_skipped", "runner_on_failed"):
            kind = "skipped" if e["event"] == "runner_on_skipped" else ""
            print(f"{data.get('duration') or 0:7.2f}  {data.get('role', '')}: "
                  f"{data.get('task', '')[:70]} {kind}")
    print(f"\ncontroller CPU: {fem_cpu:.2f} s for the task, {shell_cpu:.2f} s for the shell "
          "script (the containers' own CPU is the engine's, in neither)")


if __name__ == "__main__":
    main()
