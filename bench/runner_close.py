"""What pexpect's fixed delays cost a run through ansible-runner: pexpect's stock child
against fem-ansible's.

    .venv/bin/python bench/runner_close.py [--runs 20]

Runs a program that asks for a password as Ansible's vault prompt does (Python's
``getpass``), answered by ansible-runner's ``passwords`` as every run's vault prompt is,
through ``ansible_runner.run_command`` ``--runs`` times with each child, alternating
(stock, fem, stock, ...), and prints the median seconds of a run with each and their ratio.
pexpect sleeps 0.05 s (``delaybeforesend``) before it sends the answer, and ptyprocess's
close, which ansible-runner calls only after seeing its child end, sleeps 0.1 s
(``delayafterclose``) before checking again; :class:`fem_ansible.runner.RunnerSpawn` skips
both.  What is measured is what the listener waits for in every run (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import ansible_runner
import pexpect

from fem_ansible.runner import RunnerSpawn

STOCK = RunnerSpawn.__mro__[1]
#: Asks as Ansible's vault prompt does, and fails unless it reads the answer.
ASKS = "import getpass, sys; sys.exit(getpass.getpass('Vault password (fem): ') != 'x')"


def one_run(spawn: type, private_data_dir: str) -> float:
    pexpect.spawn = spawn  # what ansible-runner's Runner.run spawns its child with
    t0 = time.perf_counter()
    _out, _err, rc = ansible_runner.run_command(
        executable_cmd=sys.executable, cmdline_args=["-I", "-c", ASKS],
        private_data_dir=private_data_dir, quiet=True,
        passwords={r"Vault password \(fem\):\s*?$": "x"})
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the prompted program exited {rc}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"stock": [], "fem": []}
    with tempfile.TemporaryDirectory(prefix="fem-bench-close-") as pdd:
        one_run(RunnerSpawn, pdd)  # warm-up
        for _ in range(args.runs):
            times["stock"].append(one_run(STOCK, pdd))
            times["fem"].append(one_run(RunnerSpawn, pdd))
    pexpect.spawn = RunnerSpawn
    stock, fem = (statistics.median(times[k]) for k in ("stock", "fem"))
    print(f"pexpect's delays: {args.runs} runs each of a prompted program through "
          "ansible_runner.run_command")
    print(f"  stock pexpect         {stock:.3f} s a run (median)")
    print(f"  fem RunnerSpawn       {fem:.3f} s a run (median)")
    print(f"  fem / stock           {fem / stock:.2f}  (saved {stock - fem:.3f} s a run)")


if __name__ == "__main__":
    main()
