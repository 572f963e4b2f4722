"""Each patch group of the fast path, on and off, in interleaved pairs.

    .venv/bin/python bench/pairs.py                       # every group, 5 pairs each
    .venv/bin/python bench/pairs.py --pairs 6 own_host    # one group
    .venv/bin/python bench/pairs.py --plain --pairs 15    # bench/plain.yml, not a task
    .venv/bin/python bench/pairs.py --stages markers      # the task playbook, roles empty

A pair is two runs one after the other, one with every patch and one without GROUP
(``FEMCORE_FASTPATH_OFF``); which goes first alternates from pair to pair, and the groups
take turns round by round, so the machine's drift (it is shared) falls on both sides alike.
A run is ``bench/profile.py`` (one task through a real listener, published to COMPLETED, and
its controller CPU), or with ``--plain`` bench/plain.yml under fem-ansible's settings (the
shell script's steps as a plain playbook: no listener, broker or roles, so a tenth of a
second a run shows in fewer pairs), or with ``--stages`` playbooks/task.yml itself with every
stage role empty but the cleanup's, which removes the run's dir: what the task playbook's own
tasks cost, its stage markers.  Prints, per group, the time and CPU with and without
it, as medians, and the gain per pair.  bench/RESULTS.md's lines per patch are read off
this.  Nothing here fails on a slow number.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from fem_ansible.fastpath import patches

PROFILE = Path(__file__).resolve().parent / "profile.py"
# The groups of fem.core's plugin_utils/fastpath.py, and the variable that leaves them out.
GROUPS = tuple(patches.PATCHES)
OFF_ENV = patches.OFF_ENV


def profile(without: str | None = None, script: Path = PROFILE,
            env: dict[str, str] | None = None) -> tuple[float, float]:
    """One bench/profile.py run (``script``: another checkout's, for bench/before_after.py):
    the task's seconds and controller CPU-seconds."""
    args = [sys.executable, str(script)] + (["--without", without] if without else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    total = re.search(r"COMPLETED received in ([\d.]+) s", out)
    cpu = re.search(r"controller CPU: ([\d.]+) s", out)
    assert total and cpu, out
    return float(total[1]), float(cpu[1])


def plain_runner(stages: bool = False) -> tuple[Callable[[str | None], tuple[float, float]],
                                               Callable[[], None]]:
    """A run of bench/plain.yml (``stages``: of the task playbook, roles empty) under
    fem-ansible's settings, and what removes its files."""
    from run import REPO, Bench

    bench = Bench(quick=True)
    count = itertools.count()
    playbook, env = REPO / "bench/plain.yml", {}
    if stages:
        playbook = REPO / "playbooks/task.yml"
        env = {"ANSIBLE_ROLES_PATH": str(empty_roles(playbook, bench.tmp / "roles"))}

    def run(without: str | None) -> tuple[float, float]:
        os.environ[OFF_ENV] = without or ""  # bench.plain passes the bench's environment on
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = bench.plain(f"p{next(count)}", "fem", playbook, env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    run(None)  # warm-up: the import scans' cache and the page cache
    return run, lambda: shutil.rmtree(bench.tmp, ignore_errors=True)


def empty_roles(playbook: Path, roles: Path) -> Path:
    """In ``roles``, a role of each name ``playbook`` imports, doing nothing; fem_cleanup
    removes the dir bench.plain gives a run (``PLAIN_DIR``), as bench/plain.yml does."""
    names = {m[1] for m in re.finditer(r"import_role:\s*\n\s*name: (\S+)",
                                          playbook.read_text())}
    assert "fem_cleanup" in names, names
    for name in names:
        (roles / name / "tasks").mkdir(parents=True)
        (roles / name / "tasks/main.yml").write_text(
            "- name: Remove the run's dir\n  ansible.builtin.file:\n"
            "    path: \"{{ lookup('ansible.builtin.env', 'PLAIN_DIR') }}\"\n"
            "    state: absent\n" if name == "fem_cleanup" else "[]\n")
    return roles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--plain", action="store_true",
                        help="runs of bench/plain.yml instead of bench/profile.py")
    parser.add_argument("--stages", action="store_true",
                        help="runs of playbooks/task.yml with empty stage roles")
    parser.add_argument("groups", nargs="*", default=list(GROUPS))
    args = parser.parse_args()
    run, done = (plain_runner(args.stages) if args.plain or args.stages
                 else (profile, lambda: None))
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {
        g: {"on": [], "off": []} for g in args.groups}
    try:
        for n in range(args.pairs):
            for group in args.groups:
                order = ("on", "off") if n % 2 == 0 else ("off", "on")
                for side in order:
                    runs[group][side].append(run(None if side == "on" else group))
                on, off = runs[group]["on"][-1], runs[group]["off"][-1]
                print(f"pair {n + 1} {group}: on {on[0]:.2f} s {on[1]:.2f} CPU-s, "
                      f"off {off[0]:.2f} s {off[1]:.2f} CPU-s", flush=True)
    finally:
        done()
    print("\ngroup: s on/off (median), gain per pair; CPU-s likewise")
    for group, sides in runs.items():
        for i, what in ((0, "s"), (1, "CPU-s")):
            on = [r[i] for r in sides["on"]]
            off = [r[i] for r in sides["off"]]
            gains = sorted(b - a for a, b in zip(on, off, strict=True))
            faster = sum(g > 0 for g in gains)
            print(f"{group}: {what} {statistics.median(on):.2f} / {statistics.median(off):.2f}"
                  f", gain median {statistics.median(gains):+.2f} "
                  f"(pairs {', '.join(f'{g:+.2f}' for g in gains)}; "
                  f"faster on in {faster} of {len(gains)})", flush=True)


if __name__ == "__main__":
    main()
