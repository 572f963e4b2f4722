"""What closing ansible-runner's child costs: pexpect's stock close against fem-ansible's.

    .venv/bin/python bench/runner_close.py [--runs 20]

Runs ``true`` through ``ansible_runner.run_command`` ``--runs`` times with each close,
alternating (stock, fem, stock, ...), and prints the median seconds of a run with each and
their ratio.  ansible-runner closes its child only after seeing it end; ptyprocess's close
then sleeps 0.1 s (``delayafterclose``) before checking again, which
:class:`fem_ansible.runner.ReapedChildSpawn` skips for a child already reaped.  What is
measured is what the listener waits for at the end of every run (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import ansible_runner
import pexpect

from fem_ansible.runner import ReapedChildSpawn

STOCK = ReapedChildSpawn.__mro__[1]


def one_run(spawn: type, private_data_dir: str) -> float:
    pexpect.spawn = spawn  # what ansible-runner's Runner.run spawns its child with
    t0 = time.perf_counter()
    _out, _err, rc = ansible_runner.run_command(
        executable_cmd="true", cmdline_args=[], private_data_dir=private_data_dir,
        quiet=True)
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"true exited {rc}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"stock": [], "fem": []}
    with tempfile.TemporaryDirectory(prefix="fem-bench-close-") as pdd:
        one_run(ReapedChildSpawn, pdd)  # warm-up
        for _ in range(args.runs):
            times["stock"].append(one_run(STOCK, pdd))
            times["fem"].append(one_run(ReapedChildSpawn, pdd))
    pexpect.spawn = ReapedChildSpawn
    stock, fem = (statistics.median(times[k]) for k in ("stock", "fem"))
    print(f"runner close: {args.runs} runs each of `true` through ansible_runner.run_command")
    print(f"  stock pexpect close   {stock:.3f} s a run (median)")
    print(f"  fem ReapedChildSpawn  {fem:.3f} s a run (median)")
    print(f"  fem / stock           {fem / stock:.2f}  (saved {stock - fem:.3f} s a run)")


if __name__ == "__main__":
    main()
