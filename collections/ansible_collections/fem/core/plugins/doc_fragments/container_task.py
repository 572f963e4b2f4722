# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Options that fem.core.docker_task and fem.core.podman_task share, written once."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  name:
    description: Container name.
    type: str
    required: true
  state:
    description:
      - V(present) runs the container to completion and collects it.
      - V(stopped) stops it if it runs.
      - V(absent) removes the container and O(volumes).
    type: str
    choices: [present, stopped, absent]
    default: present
  stop_file:
    description:
      - A path on the host whose creation asks this run to stop the container (a cancel).
        It is looked for every 0.2 s while the container runs; the container is stopped
        (SIGTERM, SIGKILL after O(stop_grace)) if it still runs, and RV(stopped) says so.
    type: path
  volumes:
    description: Named volumes removed with O(state=absent).
    type: list
    elements: str
    default: []
  command:
    description: Argument vector; the image's default command when omitted or null.
    type: list
    elements: str
  workdir:
    description: Working directory in the container; the image's when omitted or null.
    type: str
  env:
    description: Container environment.
    type: dict
    default: {}
  secret_env:
    description: Container environment passed as secrets (a legacy run's token), laid over
      I(env); its values are hidden from the module's logged arguments and results.
    type: dict
    default: {}
  labels:
    description: The task's labels (C(fem.node_id), C(fem.task_id)), on its container and on
      the O(accounts_name) container, each with C(fem.purpose) V(task) or V(accounts).
    type: dict
    default: {}
  accounts_name:
    description:
      - Name of the never-started container that reads the image's account files when its
        user is a name; removed with O(state=absent) if a killed module left it.
      - Required with O(state=present); given by the caller (fem-ansible names every object
        of a task), never derived from O(name).
    type: str
  mounts:
    description: Bind mounts and named volumes.
    type: list
    elements: dict
    default: []
    suboptions:
      type:
        description: C(bind) for a host path, C(volume) for a named volume.
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
    description: Set the C(no-new-privileges) security option.
    type: bool
    default: true
  tmpfs:
    description: Map of container path to tmpfs mount options.
    type: dict
    default: {}
  pids_limit:
    description:
      - Maximum number of processes. Required to run a container; a value not above 0 is
        refused (the engine would read it as no limit).
    type: int
  memory:
    description:
      - Memory limit in bytes (swap included). Required to run a container; a value not
        above 0 is refused.
    type: int
  cpus:
    description:
      - CPU limit in CPUs. Required to run a container; a value whose nano CPUs round to 0
        is refused (the engine would read it as no limit).
    type: float
  network_mode:
    description: Network mode (C(none), C(host) or a network name).
    type: str
    default: none
  watch_dirs:
    description:
      - Host dirs the container writes through bind mounts (output, scratch), whose total
        size is watched while it runs.
    type: list
    elements: path
    default: []
  watch_bytes:
    description:
      - Largest total size of O(watch_dirs); past it the container is stopped and the module
        fails with C(fem_error_code=limit_exceeded). Not watched when omitted.
    type: int
  min_free_bytes:
    description:
      - The node's free-space floor on the file system of the first of O(watch_dirs),
        looked at with their size; below it the container is stopped and the module fails
        with C(fem_error_code=disk_full), the file system and its figures in C(msg). A
        container that exits non-zero with the file system below the floor fails the same
        way. Not watched when omitted.
    type: int
"""
