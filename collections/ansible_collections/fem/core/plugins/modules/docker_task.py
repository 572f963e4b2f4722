#!/usr/bin/python
# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Run one fem task container to completion, idempotently, and collect its logs."""

# Ansible module layout (documentation before imports); runs on the target's Python (>= 3.8).
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: docker_task
short_description: Run one task container to completion with a timeout and collect its logs
version_added: 1.0.0
description:
  - Creates and starts a container named O(name), or finds the one a previous run of the
    same task started, waits for it to exit and writes its stdout and stderr, each capped at
    O(log_bytes), plus its exit code into O(log_dir).
  - The timeout is counted from the container's C(State.StartedAt), so running the module
    again after an interruption (listener restart) only waits for the rest of it. A container
    still running is waited for, never started again; one that has exited is only collected.
  - At the timeout the container is stopped (SIGTERM, then SIGKILL after O(stop_grace)) and
    the module reports RV(timed_out=true) and RV(exit_code=null).
  - The container always runs unprivileged, with a private IPC namespace, the given
    hardening and limits (a limit not above 0 is refused, never taken as none), and an
    engine log capped in size (C(json-file), C(max-size) twice O(log_bytes)). Its user is the
    image's own, resolved to numbers in the image's C(/etc/passwd), unless that is uid 0
    however written, a name the image does not define, or empty; then it is O(fallback_user).
  - While the container runs, the total size of O(watch_dirs) is looked at every
    O(watch_interval) seconds; over O(watch_bytes) the container is stopped, its logs are
    collected and the module fails with RV(fem_error_code=limit_exceeded).
  - A non-zero exit code is a result, not a failure.
  - With O(state=stopped) it stops the container if it runs (SIGTERM, SIGKILL after
    O(stop_grace)), which is how a task is cancelled. The run waiting for it then collects
    it as exited.
  - With O(state=absent) it removes the container (killing it if it runs, with its anonymous
    volumes), the never-started O(accounts_name) container that reads the image's account
    files if a killed module left it, and the named O(volumes); objects already gone are
    fine.
  - Talks to the engine through the Docker SDK for Python (C(docker)); C(DOCKER_HOST) and
    friends are honoured.
options:
  image:
    description:
      - Image reference; must already be present on the engine.
      - Required with O(state=present).
    type: str
  fallback_user:
    description:
      - C(uid:gid) used when the image's user is empty, uid 0 however written, or a name
        the image maps to uid 0 or does not define.
      - Required with O(state=present).
    type: str
  gpus:
    description: Number of GPUs requested through the engine's device requests.
    type: int
    default: 0
  timeout:
    description:
      - Seconds the container may run, counted from its start.
      - Required with O(state=present).
    type: float
  watch_interval:
    description: Seconds between two measures of O(watch_dirs).
    type: float
    default: 2
  stop_grace:
    description: Seconds between SIGTERM and SIGKILL when stopping at the timeout.
    type: int
    default: 10
  log_dir:
    description:
      - Existing directory that receives C(stdout.log), C(stderr.log) and C(exit_code).
      - Required with O(state=present).
    type: path
  log_bytes:
    description:
      - Maximum size of each log file, the truncation marker line included.
      - Required with O(state=present).
    type: int
  docker_host:
    description: Engine URL; C(DOCKER_HOST) or the local socket when omitted.
    type: str
  api_timeout:
    description: Seconds to wait for an engine API call (the wait itself excepted).
    type: int
    default: 60
requirements:
  - docker (Docker SDK for Python) >= 5
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
- name: Run the task container
  fem.core.docker_task:
    name: fem-node1-task42-5ac623931b04083beed07f01ae6e5e04
    accounts_name: fem-node1-task42-accounts-06f752a721ec802f64bfd59b7ee6d0f7
    image: registry.example.org/lab/train:1.2
    command: [python, train.py]
    labels: {fem.node_id: node1, fem.task_id: task42}
    mounts:
      - {source: /var/lib/fem-ansible/runs/task42/input, target: /fem/input}
      - {source: /var/lib/fem-ansible/runs/task42/output, target: /fem/output, read_only: false}
    fallback_user: "65534:65534"
    tmpfs: {/tmp: "rw,nosuid,nodev,size=64m,mode=1777"}
    pids_limit: 256
    memory: 2147483648
    cpus: 1
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
    O(watch_bytes).
  returned: failure
  type: str
stopped:
  description: Whether the container was running and got stopped (O(state=stopped)).
  returned: when O(state=stopped)
  type: bool
removed:
  description: Names of the container and volumes removed (O(state=absent)).
  returned: when O(state=absent)
  type: list
  elements: str
"""

import os
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.fem.core.plugins.module_utils.container import (
    ACCOUNT_FILES,
    ACCOUNTS_PURPOSE,
    CONTAINER_OPTIONS,
    LIMIT_OPTIONS,
    NEVER_STARTED,
    TASK_PURPOSE,
    OutputWatch,
    account_files,
    check_limits,
    effective_user,
    engine_log_bytes,
    nano_cpus,
    needs_accounts,
    object_labels,
    write_capped,
)
from ansible_collections.fem.core.plugins.module_utils.container import (
    parse_engine_time as parse_docker_time,
)

try:
    import docker
    import requests
    from docker.errors import APIError, DockerException, ImageNotFound, NotFound
    from docker.types import DeviceRequest, LogConfig, Mount
except ImportError:
    DOCKER_IMPORT_ERROR = traceback.format_exc()
else:
    DOCKER_IMPORT_ERROR = None

def host_config_kwargs(params):
    """The engine's host settings for a task container, from the module's parameters.

    Every hardening setting is decided here and nowhere else, as plain data, so that what
    reaches the engine can be checked without one (GPUs, on a machine that has none).
    """
    p = params
    check_limits(p)
    mounts = [
        Mount(
            target=m["target"],
            source=m["source"],
            type=m["type"],
            read_only=m["read_only"],
        )
        for m in p["mounts"]
    ]
    host_config = {
        "mounts": mounts,
        "read_only": p["read_only"],
        "cap_drop": p["cap_drop"],
        "security_opt": ["no-new-privileges"] if p["no_new_privileges"] else None,
        "tmpfs": p["tmpfs"] or None,
        "network_mode": p["network_mode"],
        "ipc_mode": "private",
        "privileged": False,
        "pids_limit": p["pids_limit"],
        "mem_limit": p["memory"],
        "memswap_limit": p["memory"],
        "nano_cpus": nano_cpus(p["cpus"]),
        "log_config": LogConfig(type=LogConfig.types.JSON,
                                config={"max-size": str(engine_log_bytes(p["log_bytes"]))}),
    }
    if p["gpus"] > 0:
        host_config["device_requests"] = [DeviceRequest(count=p["gpus"], capabilities=[["gpu"]])]
    return host_config


class TaskRunner:
    """One container's lifecycle: find or create, start, wait with timeout, collect."""

    def __init__(self, module):
        self.module = module
        self.p = module.params
        kwargs = {"timeout": self.p["api_timeout"]}
        if self.p["docker_host"]:
            self.client = docker.DockerClient(base_url=self.p["docker_host"], **kwargs)
        else:
            self.client = docker.from_env(**kwargs)
        self.api = self.client.api
        self.changed = False
        self.watch = OutputWatch(self.p)
        self.over_limit = False

    def find(self):
        try:
            return self.api.inspect_container(self.p["name"])
        except NotFound:
            return None

    def image_user(self):
        try:
            config = self.api.inspect_image(self.p["image"]).get("Config") or {}
        except ImageNotFound:
            self.module.fail_json(
                msg=f"Image {self.p['image']} is not present on the engine "
                "(fem_image pulls it first)"
            )
        return config.get("User") or ""

    def image_accounts(self):
        """The image's account files, from a container created and never started."""
        name = self.p["accounts_name"]
        self.remove_container(name)  # one a killed module left behind
        created = self.api.create_container(
            image=self.p["image"], entrypoint=[NEVER_STARTED], network_disabled=True,
            name=name, labels=object_labels(self.p["labels"], ACCOUNTS_PURPOSE))
        files = {}
        try:
            for path in ACCOUNT_FILES:
                try:
                    stream, _ = self.api.get_archive(created["Id"], path)
                except NotFound:
                    continue
                files.update(account_files(b"".join(stream)))
        finally:
            self.remove_container(created["Id"])
        return files

    def create(self):
        p = self.p
        image_user = self.image_user()
        files = self.image_accounts() if needs_accounts(image_user) else None
        user = effective_user(image_user, p["fallback_user"], files)
        created = self.api.create_container(
            image=p["image"],
            name=p["name"],
            command=p["command"],
            working_dir=p["workdir"] or None,
            environment={k: str(v) for k, v in {**p["env"], **p["secret_env"]}.items()},
            labels=object_labels(p["labels"], TASK_PURPOSE),
            user=user,
            host_config=self.api.create_host_config(**host_config_kwargs(p)),
        )
        self.changed = True
        return created["Id"]

    def start(self, container_id):
        self.api.start(container_id)
        self.changed = True
        return self.api.inspect_container(container_id)

    def wait(self, info):
        """Wait for the rest of the timeout; stop at it. Return (exit_code, timed_out)."""
        container_id = info["Id"]
        state = info["State"]
        started = parse_docker_time(state.get("StartedAt")) or time.time()
        timeout = self.p["timeout"]
        if state.get("Running") or state.get("Paused") or state.get("Restarting"):
            remaining = started + timeout - time.time()
            while remaining > 0:
                step = self.watch.step(remaining)
                step_end = time.time() + step
                try:
                    result = self.api.wait(container_id, timeout=step)
                    return result.get("StatusCode"), False
                except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                    # The HTTP read timeout is how a step ends; anything else that breaks
                    # the wait early is an engine problem.
                    state = self.api.inspect_container(container_id)["State"]
                    if not state.get("Running"):
                        return state.get("ExitCode"), False
                    if time.time() < step_end - 1:
                        raise
                if self.watch.exceeded():
                    self.over_limit = True
                    break
                remaining = started + timeout - time.time()
            self.api.stop(container_id, timeout=self.p["stop_grace"])
            self.api.wait(container_id, timeout=self.p["stop_grace"] + self.p["api_timeout"])
            self.changed = True
            return None, not self.over_limit
        # Exited before this run saw it: it timed out if it ran for the whole timeout
        # (an earlier run stopped it and was interrupted before collecting).
        finished = parse_docker_time(state.get("FinishedAt"))
        if finished is not None and finished - started >= timeout:
            return None, True
        return state.get("ExitCode"), False

    def collect_logs(self, container_id):
        logs = {}
        for stream in ("stdout", "stderr"):
            path = os.path.join(self.p["log_dir"], stream + ".log")
            chunks = self.api.logs(
                container_id,
                stdout=stream == "stdout",
                stderr=stream == "stderr",
                stream=True,
                follow=False,
            )
            try:
                written, truncated = write_capped(chunks, path, self.p["log_bytes"])
            finally:
                close = getattr(chunks, "close", None)
                if close:
                    close()
            logs[stream] = {"path": path, "bytes": written, "truncated": truncated}
        return logs

    def stop(self):
        """Stop the container if it runs; nothing to do when it is gone or has exited."""
        info = self.find()
        if info is None or not info["State"].get("Running"):
            return {"changed": False, "stopped": False}
        self.api.stop(info["Id"], timeout=self.p["stop_grace"])
        return {"changed": True, "stopped": True}

    def remove_container(self, name):
        """Remove the container ``name`` (killed if running, anonymous volumes too); whether
        there was one."""
        try:
            self.api.remove_container(name, force=True, v=True)
        except NotFound:
            return False
        return True

    def remove(self):
        """Remove the container (killed if running, anonymous volumes too), the one that
        read the image's accounts if a killed run left it, and the volumes."""
        removed = [name for name in (self.p["name"], self.p["accounts_name"])
                   if name and self.remove_container(name)]
        for volume in self.p["volumes"]:
            try:
                self.api.remove_volume(volume, force=True)
                removed.append(volume)
            except NotFound:
                pass
        return {"changed": bool(removed), "removed": removed}

    def run(self):
        info = self.find()
        if info is None:
            info = self.start(self.create())
        elif info["State"].get("Status") == "created":
            info = self.start(info["Id"])
        exit_code, timed_out = self.wait(info)
        info = self.api.inspect_container(info["Id"])
        logs = self.collect_logs(info["Id"])
        with open(os.path.join(self.p["log_dir"], "exit_code"), "w") as out:
            out.write("null\n" if exit_code is None else f"{exit_code}\n")
        if self.over_limit:
            self.module.fail_json(changed=self.changed, timed_out=False, logs=logs,
                                  **self.watch.failure(self.p["name"]))
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
            "watch_interval": {"type": "float", "default": 2},
            "log_dir": {"type": "path"},
            "log_bytes": {"type": "int"},
            "docker_host": {"type": "str"},
            "api_timeout": {"type": "int", "default": 60},
        },
        required_if=[
            ("state", "present", ("image", "accounts_name", "fallback_user", "timeout",
                                  "log_dir", "log_bytes", *LIMIT_OPTIONS)),
        ],
        supports_check_mode=True,
    )
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    if module.check_mode:
        module.exit_json(changed=False, timed_out=False, msg="check mode: nothing done")
    try:
        runner = TaskRunner(module)
        if module.params["state"] == "absent":
            module.exit_json(**runner.remove())
        if module.params["state"] == "stopped":
            module.exit_json(**runner.stop())
        module.exit_json(**runner.run())
    except (APIError, DockerException, requests.exceptions.RequestException, OSError,
            ValueError) as exc:
        module.fail_json(
            msg=f"Docker task {module.params['name']} failed: {exc}",
            exception=traceback.format_exc(),
        )


if __name__ == "__main__":
    main()
