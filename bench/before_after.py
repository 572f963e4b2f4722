"""A change's cost per task: this checkout against an earlier commit, interleaved in one run.

    .venv/bin/python bench/before_after.py 9689372                  # 3 rounds, 6 profile pairs
    .venv/bin/python bench/before_after.py 9689372 --rounds 4 --tasks 8 --pairs 6

The earlier commit is checked out (``git worktree add --detach``) into a temporary directory,
removed at the end, and both sides run with this venv, each with its own tree first on
``PYTHONPATH``: the two differ only in the project's code, not in Ansible's or Mitogen's
release, and they share the services (the worktree's ``.fem-dev`` is this checkout's).
The check below sees which fem_ansible the listener imports; a run's ``ansible-playbook``
imports it again, and commits from ca075a8 (runs' environment confined) up to fc9485f (the
listener's ``PYTHONPATH`` passed to runs) dropped ``PYTHONPATH`` there, so their runs would
import this checkout's ``playbook_cli``: compare such a commit from a venv of its own.

A round runs each side's own ``bench/run.py --only overhead throughput`` (its figures and the
shell script's, as bench/RESULTS.md shows them), which side goes first alternating round by
round; then ``--pairs`` pairs of ``bench/profile.py`` (one task, published to COMPLETED, and
its controller CPU) likewise.  The machine drifts (it is shared), so the figures are read per
round: the table gives each side's median, after ÷ before per round, and each side's own
spread over the rounds, which is the noise a difference has to exceed.  Nothing here fails
on a slow number.  ``--breakdown TASKS`` adds bench/breakdown.py's phases and playbook
tasks, medians side by side: where a difference of a few tenths of a second a task goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pairs import profile

REPO = Path(__file__).resolve().parent.parent
BREAKDOWN = Path(__file__).resolve().parent / "breakdown.py"
SIDES = ("after", "before")


@contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """``ref`` in a temporary worktree sharing this checkout's services."""
    tmp = Path(tempfile.mkdtemp(prefix="fem-before-"))
    tree = tmp / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree),
                    ref], check=True)
    try:
        (tree / ".fem-dev").symlink_to(REPO / ".fem-dev")
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def side_env(tree: Path) -> dict[str, str]:
    """The environment that makes ``tree``'s fem_ansible the one imported, by the harness and
    by the listener it starts (this venv's ``fem-ansible``): PYTHONPATH comes before the
    editable install's path entry."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    probe = "import fem_ansible; print(fem_ansible.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], env=env, cwd="/",
                           capture_output=True, text=True, check=True)
    if not where.stdout.startswith(f"{tree}/"):
        sys.exit(f"{tree}: fem_ansible is imported from {where.stdout.strip()}, not from it")
    return env


def last_json(argv: list[str], env: dict[str, str]) -> Any:
    """The JSON a bench script prints last; a failed run raises with the tail of its output,
    which a bare CalledProcessError would lose."""
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={done.returncode}:\n"
                           f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_rows(tree: Path, env: dict[str, str], tasks: int) -> dict[str, float]:
    """``tree``'s bench/run.py overhead and throughput: each row's fem-ansible figure, and the
    shell script's seconds (the drift of the machine in that run)."""
    rows = last_json([str(tree / "bench" / "run.py"), "--only", "overhead", "throughput",
                      "--tasks", str(tasks)], env)["rows"]
    figures = {name: float(fem.split()[0]) for name, fem, *_ in rows}
    shell = next(base for name, _, base, *_ in rows if name.startswith("overhead: trivial"))
    figures["shell script (s)"] = float(shell.split()[0])
    return figures


def cost(name: str, after: float, before: float) -> float:
    """After's cost ÷ before's: above 1 is slower (seconds up, or tasks per minute down)."""
    return before / after if "/min" in name else after / before


def spread(xs: list[float]) -> str:
    return f"{(max(xs) / min(xs) - 1) * 100:.0f} %" if len(xs) > 1 else "-"


def report(title: str, runs: dict[str, list[dict[str, float]]]) -> None:
    if not runs["after"]:
        return
    print(f"\n{title}\n| measure | after, median | before, median | after ÷ before per round "
          "(> 1 slower) | after slower in | spread after / before |\n|---|---|---|---|---|---|")
    for name in runs["after"][0]:
        a = [r[name] for r in runs["after"]]
        if name not in runs["before"][0]:  # a measure the earlier bench/run.py did not take
            print(f"| {name} | {statistics.median(a):.2f} | - | - | - | {spread(a)} / - |")
            continue
        b = [r[name] for r in runs["before"]]
        costs = [cost(name, x, y) for x, y in zip(a, b, strict=True)]
        print(f"| {name} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
              f"{', '.join(f'{c:.2f}' for c in costs)} (median {statistics.median(costs):.2f})"
              f" | {sum(c > 1 for c in costs)} of {len(costs)} | {spread(a)} / {spread(b)} |",
              flush=True)


def breakdown(tree: Path, env: dict[str, str], tasks: int) -> dict[str, Any]:
    """bench/breakdown.py on ``tree``'s harness: its phases and playbook tasks, each a list
    of seconds over ``tasks`` tasks."""
    return last_json([str(BREAKDOWN), "--tree", str(tree), "--tasks", str(tasks)], env)


def report_breakdown(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Each side's medians over all its breakdown runs, phase by phase, then the playbook
    tasks whose medians differ (a task on one side only counts 0 on the other)."""
    merged: dict[str, dict[str, dict[str, list[float]]]] = {}
    for side, results in runs.items():
        merged[side] = {"phases": {}, "tasks": {}}
        for result in results:
            for kind in ("phases", "tasks"):
                for name, values in result[kind].items():
                    merged[side][kind].setdefault(name, []).extend(values)
    after, before = merged["after"], merged["before"]
    print("\nbench/breakdown.py: medians, after / before / difference")
    for name, values in after["phases"].items():
        a = statistics.median(values)
        if name not in before["phases"]:  # not measured by the earlier checkout's harness
            print(f"| {name} | {a:.3f} | - | - |")
            continue
        b = statistics.median(before["phases"][name])
        print(f"| {name} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    print("playbook tasks whose medians differ by 5 ms or more:")
    total = 0.0
    for name in [*after["tasks"], *(n for n in before["tasks"] if n not in after["tasks"])]:
        a, b = (statistics.median(side["tasks"][name]) if name in side["tasks"] else 0.0
                for side in (after, before))
        total += a - b
        if abs(a - b) >= 0.005:
            print(f"| {name[:90]} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    print(f"sum of the playbook tasks' differences: {total:+.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the earlier commit (the 'before')")
    parser.add_argument("--rounds", type=int, default=3, help="bench/run.py runs per side")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per throughput point")
    parser.add_argument("--pairs", type=int, default=6, help="bench/profile.py runs per side")
    parser.add_argument("--breakdown", type=int, default=0, metavar="TASKS",
                        help="then two bench/breakdown.py runs per side of TASKS tasks each")
    args = parser.parse_args()
    with checkout(args.ref) as before:
        trees = {"after": REPO, "before": before}
        envs = {side: side_env(tree) for side, tree in trees.items()}
        benches: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        profiles: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for n in range(args.rounds):
            for side in SIDES if n % 2 == 0 else SIDES[::-1]:
                benches[side].append(bench_rows(trees[side], envs[side], args.tasks))
                print(f"round {n + 1} {side}: {json.dumps(benches[side][-1])}", flush=True)
        for n in range(args.pairs):
            for side in SIDES if n % 2 == 0 else SIDES[::-1]:
                s, cpu = profile(script=trees[side] / "bench" / "profile.py", env=envs[side])
                profiles[side].append({"published to COMPLETED (s)": s,
                                       "controller CPU (s)": cpu})
                print(f"pair {n + 1} {side}: {s:.2f} s, {cpu:.2f} CPU-s", flush=True)
        # Printed before the breakdown, which a failed task would end.
        report(f"bench/run.py --only overhead throughput --tasks {args.tasks}, {args.rounds} "
               f"rounds (after = {REPO.name} checkout, before = {args.ref})", benches)
        report(f"bench/profile.py, {args.pairs} pairs", profiles)
        breakdowns: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for n in range(2 if args.breakdown else 0):
            for side in SIDES if n % 2 == 0 else SIDES[::-1]:
                breakdowns[side].append(breakdown(trees[side], envs[side], args.breakdown))
    if args.breakdown:
        report_breakdown(breakdowns)


if __name__ == "__main__":
    main()
