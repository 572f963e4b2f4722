# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""The program a fem Slurm job runs, as text the ``slurm_task`` module writes to the run dir.

It is a fixed program (no task data in it): the container's command line is in ``job.json``
beside it, so no task field is ever part of a shell script.  ``sbatch`` copies the batch
script into the node's spool, so the job finds its dir through its first argument.

On the compute node it:

- records when it starts the container (``started_at``), from which ``slurm_task`` counts
  the task's timeout;
- runs ``<runtime> run`` attached, its stdout and stderr into ``stdout``/``stderr``, each
  file kept at ``log_bytes`` + 1 bytes (the rest read and dropped: the shared filesystem
  never holds more; the one byte more tells the collection it was truncated);
- on SIGTERM (``scancel``, Slurm's own time limit) stops the container through its engine
  (``<runtime> stop``): a container belongs to the engine, not to the job, and would outlive
  a job that only killed its client;
- writes ``result.json`` ``{exit_code, stopped}`` (exit code null when stopped) last, by
  rename, so a half-written result is never read; and exits with the container's code, which
  Slurm keeps as the job's ``ExitCode``.
"""

JOB_SCRIPT = '''#!/usr/bin/env python3
"""fem-ansible Slurm job: run the task's container, stop it through its engine on SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

run_dir = sys.argv[1]
with open(os.path.join(run_dir, "job.json"), encoding="utf-8") as f:
    job = json.load(f)
stopped = []
keep = job["log_bytes"] + 1


def copy_capped(pipe, path):
    with open(path, "wb") as out:
        kept = 0
        for chunk in iter(lambda: pipe.read(65536), b""):
            if kept < keep:
                out.write(chunk[:keep - kept])
                kept += len(chunk[:keep - kept])


def on_signal(signum, frame):
    if stopped:
        return
    stopped.append(signum)
    subprocess.run(job["stop"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=job["env"], check=False)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
with open(os.path.join(run_dir, "started_at"), "w", encoding="utf-8") as f:
    f.write("%.3f\\n" % time.time())
proc = subprocess.Popen(job["run"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, env=job["env"])
copies = [threading.Thread(target=copy_capped, args=(pipe, os.path.join(run_dir, name)))
          for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
for copy in copies:
    copy.start()
code = proc.wait()
for copy in copies:
    copy.join()
result = {"exit_code": None if stopped else code, "stopped": bool(stopped),
          "finished_at": time.time()}
tmp = os.path.join(run_dir, "result.json.tmp")
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f)
os.replace(tmp, os.path.join(run_dir, "result.json"))
sys.exit(code if 0 <= code < 256 else 128 - code)
'''
