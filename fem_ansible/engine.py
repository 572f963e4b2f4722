"""The local container engine as one of the node's own resources (issue 28): while the
Docker engine the node's local tasks run in does not answer, the node takes no task, and
says why (docs/operating.md, "When the node is unhealthy").

Only the engine on the listener's own host is watched, and only when tasks may run there
(the ``docker`` executor allowed, a host of the inventory on a ``local`` connection):
engines on inventory hosts are reached through their hosts, whose faults end the task that
meets them (an unreachable host).
"""

from __future__ import annotations

import os

from .config import Config
from .targets import Targets

# Seconds between two looks at the engine, and the most one look may take.
CHECK_S = 5.0
PING_TIMEOUT_S = 5


def watches_docker(config: Config, targets: Targets) -> bool:
    """Whether tasks may run in this host's Docker engine."""
    executors = {*config.policy.executors.allow, config.execution.default_executor}
    return "docker" in executors and any(
        hostvars.get("ansible_connection") == "local"
        for hostvars in targets.inventory.hostvars.values())


def docker_problem() -> str | None:
    """Why this host's Docker engine (``DOCKER_HOST``, else the local socket) cannot take
    a task now; None while it answers."""
    import docker
    import docker.errors
    import requests

    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=PING_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        reason = str(e).split("\n")[0][:200]
        return f"the Docker engine at {where} does not answer ({reason})"
    return None
