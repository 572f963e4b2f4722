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
    description: Container labels.
    type: dict
    default: {}
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
    description: Maximum number of processes; unlimited when 0.
    type: int
    default: 0
  memory:
    description: Memory limit in bytes (swap included); unlimited when 0.
    type: int
    default: 0
  cpus:
    description: CPU limit in CPUs; unlimited when 0.
    type: float
    default: 0
  network_mode:
    description: Network mode (C(none), C(host) or a network name).
    type: str
    default: none
"""
