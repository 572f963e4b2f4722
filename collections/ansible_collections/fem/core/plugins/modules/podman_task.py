#!/usr/bin/python
# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Run one fem task container on podman to completion, idempotently, and collect its logs.

The same states, options and return values as ``docker_task``, through the ``podman`` CLI
(there is no daemon API to talk to; the CLI is podman's stable interface).
"""

# Ansible module layout (documentation before imports); runs on the target's Python (>= 3.8).
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: podman_task
short_description: Run one task container on podman to completion with a timeout
version_added: 1.1.0
description:
  - The podman twin of M(fem.core.docker_task), with the same states, container options and
    return values. Creates (C(podman create)) and starts a container named O(name), or finds
    the one a previous run of the same task started, waits for it to exit and writes its
    stdout and stderr, each capped at O(log_bytes), plus its exit code into O(log_dir).
  - The timeout is counted from the container's C(State.StartedAt), so running the module
    again after an interruption only waits for the rest of it. A container still running is
    waited for, never started again; one that has exited is only collected.
  - At the timeout the container is stopped (SIGTERM, then SIGKILL after O(stop_grace)) and
    the module reports RV(timed_out=true) and RV(exit_code=null).
  - The container runs unprivileged with the given hardening and limits (a limit not above
    0 is refused), the C(k8s-file) log driver (so that stdout and stderr stay apart) capped
    at twice O(log_bytes), and ulimits within the host's hard limits. Its user is the
    image's own, resolved to numbers in the image's C(/etc/passwd), unless that is uid 0
    however written, a name the image does not define, or empty; then O(fallback_user).
    It is always given as C(uid:gid), so the engine adds no supplementary group from the
    image's C(/etc/group); a gid of 0 or not known gets O(fallback_user)'s gid.
  - While the container runs, the total size of O(watch_dirs) is looked at every
    O(watch_interval) seconds; over O(watch_bytes) the container is stopped, its logs are
    collected and the module fails with RV(fem_error_code=limit_exceeded).
  - The environment goes through an env file (mode 0600, removed once the container is
    created), never the command line.
  - A non-zero exit code is a result, not a failure.
  - With O(state=stopped) it stops the container if it runs; with O(state=absent) it
    removes the container (killing it if it runs, with its anonymous volumes), the
    never-started O(accounts_name) container that reads the image's account files if a
    killed module left it, and the named O(volumes); objects already gone are fine.
options:
  image:
    description: Image reference, already present; required with O(state=present).
    type: str
  fallback_user:
    description:
      - C(uid:gid) used when the image's user is empty, uid 0 however written, or a name
        the image maps to uid 0 or does not define.
    type: str
  gpus:
    description: GPUs; when above 0 all of the host's CDI C(nvidia.com/gpu) devices.
    type: int
    default: 0
  timeout:
    description: Seconds the container may run, counted from its start.
    type: float
  watch_interval:
    description: Seconds between two measures of O(watch_dirs).
    type: float
    default: 2
  stop_grace:
    description: Seconds between SIGTERM and SIGKILL when stopping.
    type: int
    default: 10
  log_dir:
    description: Existing directory that receives C(stdout.log), C(stderr.log), C(exit_code).
    type: path
  log_bytes:
    description: Maximum size of each log file, the truncation marker line included.
    type: int
  executable:
    description: The podman command.
    type: str
    default: podman
  api_timeout:
    description: Seconds to wait for a podman command (the wait itself excepted).
    type: int
    default: 60
requirements:
  - podman >= 4
attributes:
  check_mode:
    support: full
    details: In check mode the module does nothing and reports no change.
extends_documentation_fragment:
  - fem.core.container_task
author:
  - fem-ansible developers
"""

EXAMPLES = r"""
- name: Run the task container on podman
  fem.core.podman_task:
    name: fem-node1-task42-5ac623931b04083beed07f01ae6e5e04
    accounts_name: fem-node1-task42-accounts-06f752a721ec802f64bfd59b7ee6d0f7
    image: registry.example.org/lab/train:1.2
    command: [python, train.py]
    labels: {fem.node_id: node1, fem.task_id: task42}
    mounts:
      - {source: /var/lib/fem-ansible/runs/task42/input, target: /fem/input}
      - {source: /var/lib/fem-ansible/runs/task42/output, target: /fem/output, read_only: false}
    fallback_user: "65534:65534"
    timeout: 3600
    log_dir: /var/lib/fem-ansible/runs/task42/logs
    log_bytes: 104857600
"""

RETURN = r"""
exit_code:
  description: The container's exit code; null when it was stopped at the timeout.
  returned: success with O(state=present), not in check mode
  type: int
timed_out:
  description: Whether the container was stopped at the timeout.
  returned: always
  type: bool
container_id:
  description: Full container id.
  returned: success and not check mode
  type: str
user:
  description: The user the container ran as.
  returned: success and not check mode
  type: str
oom_killed:
  description: Whether the kernel's OOM killer stopped the container.
  returned: success and not check mode
  type: bool
started_at:
  description: The container's C(State.StartedAt).
  returned: success and not check mode
  type: str
finished_at:
  description: The container's C(State.FinishedAt).
  returned: success and not check mode
  type: str
logs:
  description: Per stream, C(path), C(bytes) written and whether it was C(truncated).
  returned: success and not check mode
  type: dict
fem_error_code:
  description: C(limit_exceeded) when the module failed because O(watch_dirs) grew over
    O(watch_bytes); C(disk_full) when their file system fell below O(min_free_bytes) or a
    write found it full.
  returned: failure
  type: str
stopped:
  description:
    - With O(state=stopped), whether the container was running and got stopped.
    - With O(state=present), whether the stop ended the container, that is O(stop_file)
      appeared while it ran and it ended by SIGTERM or SIGKILL (exit code 143 or 137).
      False for a tool that exited by itself, before the stop or during its grace.
  returned: when O(state=stopped), and success with O(state=present)
  type: bool
removed:
  description: Names of the container and volumes removed (O(state=absent)).
  returned: when O(state=absent)
  type: list
  elements: str
"""

import json
import os
import subprocess
import tempfile
import threading
import time
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.fem.core.plugins.module_utils.container import (
    CONTAINER_OPTIONS,
    LIMIT_OPTIONS,
    STOP_EXIT_CODES,
    OutputWatch,
    StopRequest,
    cli_account_files,
    effective_user,
    needs_accounts,
    parse_engine_time,
    run_argv,
    write_capped,
    write_env_file,
)
from ansible_collections.fem.core.plugins.module_utils.disk import FloorWatch, full_code

_RUNNING = ("running", "paused", "stopping")
_NOT_STARTED = ("created", "configured", "initialized")


class PodmanError(Exception):
    """A podman command failed."""


class PodmanTask:
    """One container's lifecycle through the podman CLI: find or create, start, wait, collect."""

    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.changed = False
        self.watch = OutputWatch(self.p)
        self.floor = FloorWatch(self.p)
        self.over_limit = False

    def podman(self, *args, timeout=None, check=True):
        argv = [self.p["executable"], *args]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout or self.p["api_timeout"])
        except FileNotFoundError:
            raise PodmanError(f"{argv[0]} not found (install podman)") from None
        if check and done.returncode != 0:
            raise PodmanError(f"podman {args[0]} {args[1] if len(args) > 1 else ''}: "
                              f"{done.stderr.decode(errors='replace').strip()}")
        return done

    def stdout_or_none(self, argv):
        """stdout of ``argv`` (a podman command line), None when it failed."""
        done = self.podman(*argv[1:], check=False)
        return done.stdout if done.returncode == 0 else None

    def inspect(self, kind, name):
        """``podman <kind> inspect`` of one object, None when there is no such object."""
        done = self.podman(kind, "inspect", name, check=False)
        if done.returncode != 0:
            if b"no such" in done.stderr.lower():
                return None
            raise PodmanError(done.stderr.decode(errors="replace").strip())
        return json.loads(done.stdout)[0]

    def find(self):
        return self.inspect("container", self.p["name"])

    def create(self):
        p = self.p
        image = self.inspect("image", p["image"])
        if image is None:
            self.module.fail_json(msg=f"Image {p['image']} is not present on podman "
                                      "(fem_image pulls it first)")
        image_user = (image.get("Config") or {}).get("User")
        files = None
        if needs_accounts(image_user):
            files = cli_account_files(self.stdout_or_none, p["executable"], p["image"],
                                      p["accounts_name"], p["labels"])
        user = effective_user(image_user, p["fallback_user"], files)
        fd, env_file = tempfile.mkstemp(prefix=".env-", dir=p["log_dir"])
        os.close(fd)
        try:
            write_env_file(env_file, {**p["env"], **p["secret_env"]})
            argv = run_argv(p["executable"], p, user, env_file=env_file, create=True)
            self.podman(*argv[1:])
        finally:
            os.unlink(env_file)
        self.changed = True

    def start(self):
        self.podman("start", self.p["name"])
        self.changed = True
        return self.find()

    def wait(self, info):
        """Wait for the rest of the timeout; stop at it. Return (exit_code, timed_out)."""
        state = info["State"]
        started = parse_engine_time(state.get("StartedAt")) or time.time()
        timeout = self.p["timeout"]
        if state.get("Status") in _RUNNING:
            remaining = started + timeout - time.time()
            while remaining > 0:
                try:
                    self.podman("wait", info["Id"], timeout=self.watch.step(remaining))
                    return self.find()["State"].get("ExitCode"), False
                except subprocess.TimeoutExpired:
                    pass
                if self.watch.exceeded() or self.floor.breached():
                    self.over_limit = True
                    break
                remaining = started + timeout - time.time()
            self.podman("stop", "--time", str(self.p["stop_grace"]), info["Id"],
                        timeout=self.p["stop_grace"] + self.p["api_timeout"])
            self.changed = True
            return None, not self.over_limit
        # Exited before this run saw it: it timed out if it ran for the whole timeout
        # (an earlier run stopped it and was interrupted before collecting).
        finished = parse_engine_time(state.get("FinishedAt"))
        if finished is not None and finished - started >= timeout:
            return None, True
        return state.get("ExitCode"), False

    def collect_logs(self, container_id):
        """Both streams of ``podman logs``, each read by its own thread so that neither pipe
        fills up; past the cap the rest is read and dropped, never held."""
        proc = subprocess.Popen([self.p["executable"], "logs", container_id],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        logs, errors = {}, []

        def drain(stream, pipe):
            path = os.path.join(self.p["log_dir"], stream + ".log")
            chunks = iter(lambda: pipe.read(1 << 16), b"")
            try:
                written, truncated = write_capped(chunks, path, self.p["log_bytes"])
                logs[stream] = {"path": path, "bytes": written, "truncated": truncated}
            except OSError as exc:
                errors.append(exc)
            for _ in chunks:
                pass

        threads = [threading.Thread(target=drain, args=("stdout", proc.stdout)),
                   threading.Thread(target=drain, args=("stderr", proc.stderr))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if proc.wait() != 0 or errors:
            raise PodmanError(f"podman logs {container_id} failed: {errors or proc.returncode}")
        return logs

    def stop(self):
        """Stop the container if it runs; nothing to do when it is gone or has exited."""
        info = self.find()
        if info is None or info["State"].get("Status") not in _RUNNING:
            return {"changed": False, "stopped": False}
        self.podman("stop", "--time", str(self.p["stop_grace"]), info["Id"],
                    timeout=self.p["stop_grace"] + self.p["api_timeout"])
        return {"changed": True, "stopped": True}

    def remove(self):
        """Remove the container (killed if running, anonymous volumes too) and the volumes."""
        removed = []
        if self.find() is not None:
            self.podman("rm", "--force", "--volumes", "--time", str(self.p["stop_grace"]),
                        self.p["name"], timeout=self.p["stop_grace"] + self.p["api_timeout"])
            removed.append(self.p["name"])
        accounts = self.p["accounts_name"]
        if accounts and self.inspect("container", accounts) is not None:  # a killed run's
            self.podman("rm", "--force", accounts)
            removed.append(accounts)
        for volume in self.p["volumes"]:
            if self.inspect("volume", volume) is not None:
                self.podman("volume", "rm", "--force", volume)
                removed.append(volume)
        return {"changed": bool(removed), "removed": removed}

    def run(self):
        info = self.find()
        if info is None:
            self.create()
            info = self.start()
        elif info["State"].get("Status") in _NOT_STARTED:
            info = self.start()
        with StopRequest(self.p["stop_file"], lambda: self.stop()["stopped"]) as request:
            exit_code, timed_out = self.wait(info)
        info = self.find()
        logs = self.collect_logs(info["Id"])
        with open(os.path.join(self.p["log_dir"], "exit_code"), "w") as out:
            out.write("null\n" if exit_code is None else f"{exit_code}\n")
        if self.over_limit or (exit_code not in (0, None) and self.floor.breached()):
            # Stopped for its size or the file system's floor; or it exited failing with
            # the file system below the floor, which it most likely filled.
            failure = (self.floor.failure(self.p["name"]) if self.floor.hit
                       else self.watch.failure(self.p["name"]))
            self.module.fail_json(changed=self.changed, timed_out=False, logs=logs, **failure)
        return {
            "changed": self.changed,
            "exit_code": exit_code,
            "timed_out": timed_out,
            "container_id": info["Id"],
            "user": info["Config"].get("User") or "",
            "oom_killed": bool(info["State"].get("OOMKilled")),
            "started_at": info["State"].get("StartedAt"),
            "finished_at": info["State"].get("FinishedAt"),
            "logs": logs,
            "stopped": request.stopped and exit_code in STOP_EXIT_CODES,
        }


def main():
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "state": {
                "type": "str",
                "choices": ["present", "stopped", "absent"],
                "default": "present",
            },
            "volumes": {"type": "list", "elements": "str", "default": []},
            **CONTAINER_OPTIONS,
            "timeout": {"type": "float"},
            "stop_grace": {"type": "int", "default": 10},
            "stop_file": {"type": "path"},
            "watch_interval": {"type": "float", "default": 2},
            "log_dir": {"type": "path"},
            "log_bytes": {"type": "int"},
            "executable": {"type": "str", "default": "podman"},
            "api_timeout": {"type": "int", "default": 60},
        },
        required_if=[
            ("state", "present", ("image", "accounts_name", "fallback_user", "timeout",
                                  "log_dir", "log_bytes", *LIMIT_OPTIONS)),
        ],
        supports_check_mode=True,
    )
    if module.check_mode:
        module.exit_json(changed=False, timed_out=False, msg="check mode: nothing done")
    task = PodmanTask(module)
    try:
        if module.params["state"] == "absent":
            module.exit_json(**task.remove())
        if module.params["state"] == "stopped":
            module.exit_json(**task.stop())
        module.exit_json(**task.run())
    except (PodmanError, subprocess.SubprocessError, ValueError, OSError) as exc:
        module.fail_json(msg=f"Podman task {module.params['name']} failed: {exc}",
                         exception=traceback.format_exc(), **full_code(exc))


if __name__ == "__main__":
    main()
