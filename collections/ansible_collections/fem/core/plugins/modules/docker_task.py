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
  - The container always runs with the engine's init process as PID 1 (C(--init)), so a
    stop's SIGTERM reaches the tool, unprivileged, with a private IPC namespace, the given
    hardening and limits (a limit not above 0 is refused, never taken as none), and an
    engine log capped in size (C(json-file), C(max-size) twice O(log_bytes)). Its user is the
    image's own, resolved to numbers in the image's C(/etc/passwd), unless that is uid 0
    however written, a name the image does not define, or empty; then it is O(fallback_user).
    It is always given as C(uid:gid), so the engine adds no supplementary group from the
    image's C(/etc/group); a gid of 0 or not known gets O(fallback_user)'s gid.
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
  - An engine that stops answering while the container runs (restarted) is asked again
    every second until the task's timeout. A container it kept running (live-restore) is
    waited for as before; one it did not keep fails the module with
    RV(fem_error_code=engine_unavailable).
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
    O(watch_bytes); C(disk_full) when their file system fell below O(min_free_bytes) or a
    write found it full; C(engine_unavailable) when the engine went away while the
    container ran and did not keep it (docker_task).
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
    STOP_EXIT_CODES,
    TASK_PURPOSE,
    OutputWatch,
    StopRequest,
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
from ansible_collections.fem.core.plugins.module_utils.disk import FloorWatch, full_code

try:
    import docker
    import requests
    from docker.errors import APIError, DockerException, ImageNotFound, NotFound
    from docker.types import DeviceRequest, LogConfig, Mount
except ImportError:
    DOCKER_IMPORT_ERROR = traceback.format_exc()
    ENGINE_GONE = ()
else:
    DOCKER_IMPORT_ERROR = None
    # What an engine call raises when the engine goes away under it (stopped, restarted).
    ENGINE_GONE = (requests.exceptions.ConnectionError,
                   requests.exceptions.ChunkedEncodingError)

# The error code of a task whose engine went away and did not keep its container.
ENGINE_UNAVAILABLE = "engine_unavailable"
# Seconds between two tries to reach an engine that stopped answering.
ENGINE_RETRY_S = 1


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
        # docker-init (tini) as PID 1 passes a stop's SIGTERM on to the tool, which the
        # kernel would not deliver to a PID 1 without a handler (a shell, most tools).
        "init": True,
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
        # The engine failed the wait or stopped answering since the container was last
        # seen running: if it is not running when the engine answers, the engine ended it.
        self.engine_lost = False
        self.floor = FloorWatch(self.p)
        self.over_limit = False

    def steady(self, deadline, call, *args, **kwargs):
        """``call(*args, **kwargs)``, an engine call; while the engine does not answer
        (restarted under the task) it is tried again every ENGINE_RETRY_S until it does,
        or the module fails C(engine_unavailable) at ``deadline``."""
        while True:
            try:
                return call(*args, **kwargs)
            except ENGINE_GONE as exc:
                self.engine_lost = True
                if time.time() >= deadline:
                    self.module.fail_json(
                        msg=f"Docker task {self.p['name']}: the engine did not answer again "
                            f"before the task's timeout ({exc})",
                        fem_error_code=ENGINE_UNAVAILABLE, changed=self.changed)
                time.sleep(ENGINE_RETRY_S)

    def engine_state(self, container_id, deadline):
        """The container's state, asked until the engine answers (:meth:`steady`)."""
        state = self.steady(deadline, self.api.inspect_container, container_id)["State"]
        if state.get("Running"):
            self.engine_lost = False  # it survived (live-restore)
        return state

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
        # Started: from here an engine that goes away is waited for (steady).
        return self.steady(time.time() + self.p["timeout"], self.api.inspect_container,
                           container_id)

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
                except (requests.exceptions.ReadTimeout, *ENGINE_GONE):
                    # The HTTP read timeout is how a step ends; a wait broken early is the
                    # engine's trouble (stopping, restarting): waited out (engine_state).
                    if time.time() < step_end - 1:
                        self.engine_lost = True
                        time.sleep(ENGINE_RETRY_S)
                    state = self.engine_state(container_id, started + timeout)
                    if not state.get("Running"):
                        return state.get("ExitCode"), False
                if self.watch.exceeded() or self.floor.breached():
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
        with StopRequest(self.p["stop_file"], lambda: self.stop()["stopped"]) as request:
            exit_code, timed_out = self.wait(info)
        # An engine that goes away now (it stopped the container as it went) is waited for.
        started = parse_docker_time(info["State"].get("StartedAt")) or time.time()
        deadline = started + self.p["timeout"] + self.p["api_timeout"]
        info = self.steady(deadline, self.api.inspect_container, info["Id"])
        logs = self.steady(deadline, self.collect_logs, info["Id"])
        if self.engine_lost:
            # The engine went away while the container ran, and did not keep it (no
            # live-restore): its exit is the engine's doing, not the task's.
            self.module.fail_json(
                msg=f"Docker task {self.p['name']}: the engine went away while the container "
                    f"ran and did not keep it running (exit {exit_code}; live-restore off?)",
                fem_error_code=ENGINE_UNAVAILABLE, changed=self.changed, logs=logs,
                timed_out=False)
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
            exception=traceback.format_exc(), **full_code(exc),
        )


if __name__ == "__main__":
    main()
