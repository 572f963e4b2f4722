#!/usr/bin/python
# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Run one fem task container as a Slurm job, idempotently, and collect its logs."""

# Ansible module layout (documentation before imports); runs on the target's Python (>= 3.8).
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: slurm_task
short_description: Run one task container as a Slurm job, with a timeout, and collect its logs
version_added: 1.0.0
description:
  - Runs on the cluster's login node (the inventory host). The job is named O(name) and its
    step runs the container with O(runtime) on a compute node, with the same hardening and
    mounts as M(fem.core.docker_task) (the command line is built from the same options). The
    run dir O(run_dir) must be on a filesystem the compute nodes share.
  - Idempotent by the job's name. A job of that name (of this user) that is queued or running
    is found again, never submitted twice; one that has ended is only collected.
  - V(submitted) submits the job, or finds it, and returns its id, state and pending reason.
  - V(started) waits until the job has left the queue.
  - V(present) waits for the job to end, counting O(timeout) from the container's start; at
    the timeout it cancels the job (C(scancel); the job stops the container through its engine)
    and reports RV(timed_out=true). Writes C(stdout.log), C(stderr.log) (each capped at
    O(log_bytes)) and C(exit_code) into O(log_dir). A non-zero exit code is a result, not a
    failure. While it waits it measures O(watch_dirs) every O(poll_interval) seconds; over
    O(watch_bytes) it cancels the job and fails with RV(fem_error_code=limit_exceeded).
  - The job step keeps at most O(log_bytes) (and one byte, to tell truncation) of each of
    the container's streams in its files, and the engine's own log of the container is
    capped too (twice O(log_bytes)), so O(log_bytes) is required with O(state=submitted).
  - The container's user is the image's own, resolved to numbers in the image's
    C(/etc/passwd) on the login node's engine, unless that is uid 0 however written, a name
    the image does not define, or empty; then O(fallback_user); always as C(uid:gid), so no
    supplementary group comes from the image's C(/etc/group). A limit not above 0 is
    refused, never taken as none.
  - V(stopped) cancels the job if it is queued or running (cancel). V(absent) does the same and
    waits until it has left the queue (cleanup).
  - The exit code is the container's, as the job step records it, else the job's C(ExitCode)
    from C(scontrol show job). Slurm's accounting database is not needed.
options:
  name:
    description: Job name and container name.
    type: str
    required: true
  state:
    description: See the description.
    type: str
    choices: [submitted, started, present, stopped, absent]
    default: present
  run_dir:
    description:
      - The task's work dir, shared with the compute nodes; the job's files go in its C(slurm/).
    type: path
    required: true
  runtime:
    description: Container engine on the compute nodes.
    type: str
    choices: [docker, podman]
    default: docker
  partition:
    description: Slurm partition; the cluster's default when omitted.
    type: str
  account:
    description: Slurm account; the user's default when omitted.
    type: str
  qos:
    description: Slurm QoS; the default when omitted.
    type: str
  image:
    description: Image reference. Required with O(state=submitted).
    type: str
  command:
    description: Argument vector; the image's default command when omitted or null.
    type: list
    elements: str
  workdir:
    description: Working directory in the container.
    type: str
  env:
    description:
      - Container environment, passed in an env file (never on a command line).
      - A value with a line break is refused (the env file format cannot hold it).
    type: dict
    default: {}
  labels:
    description: The task's labels (C(fem.node_id), C(fem.task_id)), on its container and on
      the O(accounts_name) container, each with C(fem.purpose) V(task) or V(accounts).
    type: dict
    default: {}
  accounts_name:
    description:
      - Name of the never-started container that reads the image's account files on the
        login node's engine when the image's user is a name. Required with
        O(state=submitted); given by the caller, never derived from O(name).
    type: str
  mounts:
    description: Bind mounts and named volumes, as for M(fem.core.docker_task).
    type: list
    elements: dict
    default: []
    suboptions:
      type:
        description: C(bind) or C(volume).
        type: str
        choices: [bind, volume]
        default: bind
      source:
        description: Host path or volume name.
        type: str
        required: true
      target:
        description: Path in the container.
        type: str
        required: true
      read_only:
        description: Mount read-only.
        type: bool
        default: true
  fallback_user:
    description:
      - C(uid:gid) used when the image's user is empty, uid 0 however written, or a name
        the image maps to uid 0 or does not define.
      - Required with O(state=submitted).
    type: str
  read_only:
    description: Read-only root filesystem.
    type: bool
    default: true
  cap_drop:
    description: Capabilities to drop.
    type: list
    elements: str
    default: [ALL]
  no_new_privileges:
    description: Set no-new-privileges.
    type: bool
    default: true
  tmpfs:
    description: Container path to tmpfs options.
    type: dict
    default: {}
  pids_limit:
    description: Process limit, above 0. Required with O(state=submitted).
    type: int
  memory:
    description:
      - Memory in bytes, above 0; the container's limit and the job's C(--mem) (MiB,
        rounded up). Required with O(state=submitted).
    type: int
  cpus:
    description:
      - CPUs, at least one nano CPU; the container's limit and the job's
        C(--cpus-per-task) (rounded up). Required with O(state=submitted).
    type: float
  gpus:
    description: GPUs; C(--gres=gpu:N) when above 0.
    type: int
    default: 0
  network_mode:
    description: Network mode.
    type: str
    default: none
  watch_dirs:
    description: Dirs the container writes (output, scratch), measured while it runs.
    type: list
    elements: path
    default: []
  watch_bytes:
    description: Largest total size of O(watch_dirs); not watched when omitted.
    type: int
  timeout:
    description:
      - Seconds the container may run, counted from its start.
      - Required with O(state=submitted) and O(state=present).
    type: float
  stop_grace:
    description: Seconds the engine waits between SIGTERM and SIGKILL when the container is stopped.
    type: int
    default: 10
  log_dir:
    description: Directory that receives the logs and C(exit_code). Required with O(state=present).
    type: path
  log_bytes:
    description: Maximum size of each log file. Required with O(state=present).
    type: int
  poll_interval:
    description: Seconds between two looks at the queue.
    type: float
    default: 1
  wait_timeout:
    description: Seconds O(state=absent) waits for a cancelled job to leave the queue.
    type: float
    default: 90
requirements:
  - Slurm client commands (sbatch, squeue, scontrol, scancel) on the target
  - python3 on the compute nodes
attributes:
  check_mode:
    support: full
    details: In check mode the module does nothing and reports no change.
author:
  - fem-ansible developers
"""

EXAMPLES = r"""
- name: Submit the task's job
  fem.core.slurm_task:
    name: fem-node1-task42-5ac623931b04083beed07f01ae6e5e04
    state: submitted
    accounts_name: fem-node1-task42-accounts-06f752a721ec802f64bfd59b7ee6d0f7
    run_dir: /shared/fem/tasks/fem-node1-task42-5ac623931b04083beed07f01ae6e5e04
    image: registry.example.org/lab/train:1.2
    command: [python, train.py]
    fallback_user: "65534:65534"
    cpus: 2
    memory: 2147483648
    timeout: 3600
    partition: fem
"""

RETURN = r"""
job_id:
  description: The Slurm job id; null when no job was found (V(stopped), V(absent)).
  returned: always
  type: str
job_state:
  description: The job's state as squeue or the job's files tell (C(PENDING), C(RUNNING)...).
  returned: always
  type: str
reason:
  description: Why a pending job waits (C(Priority), C(Resources)...), else C(None).
  returned: always
  type: str
node:
  description: The node the job runs on, once it started.
  returned: always
  type: str
exit_code:
  description: The container's exit code; null when it was stopped.
  returned: with O(state=present)
  type: int
timed_out:
  description: Whether the job was cancelled at the timeout.
  returned: with O(state=present)
  type: bool
logs:
  description: Per stream, C(path), C(bytes) written and whether it was C(truncated).
  returned: with O(state=present)
  type: dict
fem_error_code:
  description: C(limit_exceeded) when the job was cancelled because O(watch_dirs) grew over
    O(watch_bytes).
  returned: failure
  type: str
"""

import json
import math
import os
import subprocess
import time
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.fem.core.plugins.module_utils.container import (
    CONTAINER_OPTIONS,
    LIMIT_OPTIONS,
    OutputWatch,
    cli_account_files,
    effective_user,
    file_chunks,
    needs_accounts,
    run_argv,
    write_capped,
    write_env_file,
)
from ansible_collections.fem.core.plugins.module_utils.slurm_job import JOB_SCRIPT

# A job in one of these states holds (or waits for) resources; any other state has ended.
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")
QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")
# The job gets this PATH and nothing else of the submitter's environment: the listener's
# process markers (FEM_JOB_ID) must not reach the job, or recovery would kill it.
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Slurm's own time limit is a safety net above the module's: this much over timeout + grace.
SLURM_TIME_MARGIN_S = 120


class SlurmError(Exception):
    """A Slurm or engine command failed."""


def run_cmd(argv, timeout=60):
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv[:2])} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[:1000]}")
    return proc.stdout


def stdout_or_none(argv, timeout=60):
    """The bytes ``argv`` writes to stdout, None when it fails."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


class SlurmTask:
    """One task's job: find or submit, wait to start, wait to end with timeout, collect."""

    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.dir = os.path.join(self.p["run_dir"], "slurm")
        self.changed = False

    def path(self, name):
        return os.path.join(self.dir, name)

    def read_json(self, name):
        try:
            with open(self.path(name), encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    # -- the queue --------------------------------------------------------------------------

    def find(self):
        """This user's newest job named ``name`` that Slurm still knows, as a dict, or None.

        ``-t all`` includes jobs that ended less than ``MinJobAge`` ago."""
        out = run_cmd(["squeue", "--me", "-h", "-t", "all", "-n", self.p["name"],
                       "-o", "%i|%T|%r|%N"])
        jobs = []
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 4 and parts[0].isdigit():
                jobs.append({"job_id": parts[0], "job_state": parts[1], "reason": parts[2],
                             "node": parts[3]})
        if not jobs:
            return None
        active = [j for j in jobs if j["job_state"] in ACTIVE]
        return max(active or jobs, key=lambda j: int(j["job_id"]))

    def known_job_id(self):
        try:
            with open(self.path("job_id"), encoding="utf-8") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def status(self):
        """The job as Slurm knows it; when Slurm has forgotten it, as its files tell."""
        job = self.find()
        if job is not None:
            return job
        job_id = self.known_job_id()
        if job_id is None:
            return None
        result = self.read_json("result.json")
        return {"job_id": job_id, "job_state": "COMPLETED" if result else "UNKNOWN",
                "reason": "None", "node": ""}

    def scontrol_exit_code(self, job_id):
        """The job's ``ExitCode`` (``code:signal``); None when it died by a signal or is gone."""
        try:
            out = run_cmd(["scontrol", "-o", "show", "job", job_id])
        except SlurmError:
            return None
        for field in out.split():
            if field.startswith("ExitCode="):
                code, _, sig = field[len("ExitCode="):].partition(":")
                if sig not in ("", "0"):
                    return None
                return int(code) if code.isdigit() else None
        return None

    # -- submit -----------------------------------------------------------------------------

    def image_user(self):
        fmt = "{{.Config.User}}"
        try:
            return run_cmd([self.p["runtime"], "image", "inspect", "--format", fmt,
                            self.p["image"]]).strip()
        except SlurmError as exc:
            raise SlurmError(f"image {self.p['image']} is not present on the login node's "
                             f"engine (fem_image pulls it first): {exc}") from exc

    def job_env(self):
        """What the job's engine client runs with: a fixed PATH, and the registry credentials
        fem_image wrote to the run dir (so compute nodes pull as the login node did)."""
        env = {"PATH": JOB_PATH, "HOME": os.environ.get("HOME", "/")}
        docker_dir = os.path.join(self.p["run_dir"], "docker")
        if os.path.isfile(os.path.join(docker_dir, "config.json")):
            env["DOCKER_CONFIG"] = docker_dir
            env["REGISTRY_AUTH_FILE"] = os.path.join(docker_dir, "config.json")
        return env

    def sbatch_argv(self):
        p = self.p
        limit_s = p["timeout"] + p["stop_grace"] + SLURM_TIME_MARGIN_S
        argv = ["sbatch", "--parsable", "--job-name", p["name"], "--nodes", "1",
                "--ntasks", "1", "--chdir", self.dir, "--output", self.path("job.log"),
                "--export", f"PATH={JOB_PATH}", "--time", str(math.ceil(limit_s / 60)),
                "--cpus-per-task", str(max(1, math.ceil(p["cpus"]))),
                "--mem", f"{math.ceil(p['memory'] / 1048576)}M"]
        if p["gpus"] > 0:
            argv += [f"--gres=gpu:{p['gpus']}"]
        for key in ("partition", "account", "qos"):
            if p[key]:
                argv += [f"--{key}", p[key]]
        return [*argv, self.path("job.py"), self.dir]

    def submit(self):
        """Lay out the job's files and submit it; returns its id."""
        p = self.p
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for stale in ("result.json", "started_at", "stdout", "stderr", "timed_out",
                      "over_limit"):
            if os.path.exists(self.path(stale)):
                os.unlink(self.path(stale))
        image_user = self.image_user()
        files = None
        if needs_accounts(image_user):
            files = cli_account_files(stdout_or_none, p["runtime"], p["image"],
                                      p["accounts_name"], p["labels"])
        user = effective_user(image_user, p["fallback_user"], files)
        env_file = self.path("env")
        write_env_file(env_file, p["env"])
        job = {
            "run": run_argv(p["runtime"], p, user, env_file=env_file),
            "stop": [p["runtime"], "stop", "-t", str(p["stop_grace"]), p["name"]],
            "env": self.job_env(),
            "log_bytes": p["log_bytes"],
        }
        fd = os.open(self.path("job.json"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(job, f)
        fd = os.open(self.path("job.py"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(JOB_SCRIPT)
        job_id = run_cmd(self.sbatch_argv()).strip().split(";")[0]
        with open(self.path("job_id"), "w", encoding="utf-8") as f:
            f.write(job_id + "\n")
        self.changed = True
        return job_id

    def submitted(self):
        job = self.status()
        if job is None:
            self.submit()
            # One look, so that a job the scheduler starts at once is not reported queued.
            time.sleep(min(self.p["poll_interval"], 1))
            job = self.find() or {"job_id": self.known_job_id(), "job_state": "PENDING",
                                  "reason": "None", "node": ""}
        return {"changed": self.changed, **job}

    # -- wait -------------------------------------------------------------------------------

    def started(self):
        while True:
            job = self.status()
            if job is None:
                raise SlurmError(f"no Slurm job named {self.p['name']}")
            if job["job_state"] not in QUEUED:
                return {"changed": False, **job}
            time.sleep(self.p["poll_interval"])

    def started_at(self):
        try:
            with open(self.path("started_at"), encoding="utf-8") as f:
                return float(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def cancel(self, job_id):
        run_cmd(["scancel", job_id])
        self.changed = True

    def present(self):
        """Wait for the job to end, cancel it at the timeout; collect logs and exit code."""
        p = self.p
        timed_out = os.path.exists(self.path("timed_out"))
        over_limit = os.path.exists(self.path("over_limit"))
        watch = OutputWatch(p)
        cancelled_at = None
        while True:
            job = self.status()
            if job is None:
                raise SlurmError(f"no Slurm job named {p['name']}")
            if job["job_state"] not in ACTIVE:
                break
            started = self.started_at()
            now = time.time()
            if started is not None and now >= started + p["timeout"] and cancelled_at is None:
                # Marked first: a restart after this point still knows why the job ended.
                with open(self.path("timed_out"), "w", encoding="utf-8") as f:
                    f.write(f"{now:.3f}\n")
                timed_out = True
                self.cancel(job["job_id"])
                cancelled_at = now
            if cancelled_at is None and watch.exceeded():
                with open(self.path("over_limit"), "w", encoding="utf-8") as f:
                    f.write(f"{watch.size}\n")
                over_limit = True
                self.cancel(job["job_id"])
                cancelled_at = now
            time.sleep(p["poll_interval"])
        result = self.read_json("result.json")
        if timed_out or over_limit:
            exit_code = None
        elif result is not None:
            exit_code = result["exit_code"]
        elif job["job_state"] in ("COMPLETED", "FAILED", "OUT_OF_MEMORY"):
            # The step died before it could record the container's code (node failure...).
            exit_code = self.scontrol_exit_code(job["job_id"])
        else:
            exit_code = None  # cancelled (or lost) before the container ended
        logs = {}
        for stream in ("stdout", "stderr"):
            target = os.path.join(p["log_dir"], stream + ".log")
            written, truncated = write_capped(file_chunks(self.path(stream)), target,
                                              p["log_bytes"])
            logs[stream] = {"path": target, "bytes": written, "truncated": truncated}
        with open(os.path.join(p["log_dir"], "exit_code"), "w", encoding="utf-8") as f:
            f.write("null\n" if exit_code is None else f"{exit_code}\n")
        if over_limit:
            watch.exceeded()
            self.module.fail_json(changed=self.changed, **job, timed_out=False, logs=logs,
                                  **watch.failure(p["name"]))
        return {"changed": self.changed, **job, "exit_code": exit_code,
                "timed_out": timed_out, "logs": logs}

    # -- cancel -----------------------------------------------------------------------------

    def stopped(self, wait):
        job = self.find()
        if job is None or job["job_state"] not in ACTIVE:
            return {"changed": False, "job_id": job and job["job_id"],
                    "job_state": job and job["job_state"], "reason": "None", "node": ""}
        self.cancel(job["job_id"])
        deadline = time.monotonic() + self.p["wait_timeout"]
        while wait and time.monotonic() < deadline:
            job = self.find() or job
            if job["job_state"] not in ACTIVE:
                break
            time.sleep(self.p["poll_interval"])
        return {"changed": True, **job}


def main():
    spec = {
        "name": {"type": "str", "required": True},
        "state": {"type": "str", "default": "present",
                  "choices": ["submitted", "started", "present", "stopped", "absent"]},
        "run_dir": {"type": "path", "required": True},
        "runtime": {"type": "str", "choices": ["docker", "podman"], "default": "docker"},
        "partition": {"type": "str"},
        "account": {"type": "str"},
        "qos": {"type": "str"},
        "timeout": {"type": "float"},
        "stop_grace": {"type": "int", "default": 10},
        "log_dir": {"type": "path"},
        "log_bytes": {"type": "int"},
        "poll_interval": {"type": "float", "default": 1},
        "wait_timeout": {"type": "float", "default": 90},
        **CONTAINER_OPTIONS,
    }
    module = AnsibleModule(
        argument_spec=spec,
        required_if=[
            ("state", "submitted", ("image", "accounts_name", "fallback_user", "timeout",
                                    "log_bytes", *LIMIT_OPTIONS)),
            ("state", "present", ("timeout", "log_dir", "log_bytes")),
        ],
        supports_check_mode=True,
    )
    if module.check_mode:
        module.exit_json(changed=False, msg="check mode: nothing done")
    task = SlurmTask(module)
    state = module.params["state"]
    try:
        if state == "submitted":
            module.exit_json(**task.submitted())
        if state == "started":
            module.exit_json(**task.started())
        if state == "present":
            module.exit_json(**task.present())
        module.exit_json(**task.stopped(wait=state == "absent"))
    except (SlurmError, ValueError, OSError) as exc:
        module.fail_json(msg=f"Slurm task {module.params['name']} failed: {exc}",
                         exception=traceback.format_exc())


if __name__ == "__main__":
    main()
