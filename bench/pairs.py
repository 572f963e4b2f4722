"""Each patch group of the fast path, on and off, in interleaved pairs of bench/profile.py.

    .venv/bin/python bench/pairs.py                       # every group, 5 pairs each
    .venv/bin/python bench/pairs.py --pairs 6 own_host    # one group

A pair is two ``bench/profile.py`` runs one after the other, one with every patch and one
``--without GROUP``; which goes first alternates from pair to pair, and the groups take turns
round by round, so the machine's drift (it is shared) falls on both sides alike.  Prints,
per group, the task's time (published to COMPLETED) and controller CPU with and without the
group, as medians, and the gain per pair.  bench/RESULTS.md's lines per patch are read off
this.  Nothing here fails on a slow number.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

PROFILE = Path(__file__).resolve().parent / "profile.py"
# The groups of fem.core's plugin_utils/fastpath.py.
GROUPS = ("import_scans", "unminified", "collections", "own_host", "unbuffered",
          "cpu_placement", "routing")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("groups", nargs="*", default=list(GROUPS))
    args = parser.parse_args()
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {
        g: {"on": [], "off": []} for g in args.groups}
    for n in range(args.pairs):
        for group in args.groups:
            order = ("on", "off") if n % 2 == 0 else ("off", "on")
            for side in order:
                runs[group][side].append(profile(None if side == "on" else group))
            on, off = runs[group]["on"][-1], runs[group]["off"][-1]
            print(f"pair {n + 1} {group}: on {on[0]:.2f} s {on[1]:.2f} CPU-s, "
                  f"off {off[0]:.2f} s {off[1]:.2f} CPU-s", flush=True)
    print("\ngroup: task s on/off (median), gain per pair; CPU-s likewise")
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
