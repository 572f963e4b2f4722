"""The roles a run uses: the site's (``execution.roles_path``) before the built-in ones.

A site replaces a built-in role by putting one of the same name earlier on the path, and
adds an executor by putting a role ``fem_executor_<name>`` there and listing ``<name>`` in
``policy.executors.allow`` (docs/customising.md).  The listener checks at intake that the
executor's role exists, so a typo in the policy or a missing role is a clear rejection,
not a failed play.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config
from .errors import PolicyViolation
from .runner import data_dir


def roles_path(config: Config) -> list[str]:
    """The roles path of every run: site role dirs first, then the built-in roles; a
    relative dir is the listener's (Ansible runs elsewhere, runner.run_playbook)."""
    return [*(str(Path(p).absolute()) for p in config.execution.roles_path),
            str(data_dir() / "roles")]


def find_role(name: str, config: Config) -> Path | None:
    """The directory of role ``name`` as Ansible would find it on :func:`roles_path`."""
    for base in roles_path(config):
        candidate = Path(base) / name
        if (candidate / "tasks" / "main.yml").is_file() or \
                (candidate / "tasks" / "main.yaml").is_file():
            return candidate
    return None


def check_executor(task: dict[str, Any], config: Config) -> None:
    """At intake, after the policy: the executor's role must be on the roles path, with the
    ``stop`` entry point cancel needs.

    :raises PolicyViolation: rule ``policy.executors``.
    """
    name = f"fem_executor_{task['executor']}"
    role = find_role(name, config)
    if role is None:
        raise PolicyViolation(
            "policy.executors",
            f"executor {task['executor']!r} is allowed but no role {name} is on "
            f"execution.roles_path or among the built-in roles", task_id=task["task_id"])
    if not any((role / "tasks" / f"stop.{ext}").is_file() for ext in ("yml", "yaml")):
        raise PolicyViolation(
            "policy.executors",
            f"role {name} ({role}) has no tasks/stop.yml entry point, so its tasks could "
            f"not be cancelled", task_id=task["task_id"])


# The built-in executors whose run module waits for the container and watches for
# ``fem_run.dir/stop`` itself (fem.core's container module_utils, StopRequest): their
# ``stop`` entry point only creates that file (roles/fem_container/tasks/stop.yml).
STOP_FILE_EXECUTORS = ("docker", "podman")


def stopped_by_file(executor: str, config: Config) -> bool:
    """Whether creating ``fem_run.dir/stop`` is the whole stop of ``executor``'s tasks: a
    built-in container executor that the site has not replaced on ``execution.roles_path``.
    The listener then needs no stop playbook on a host of its own; a site's role is always
    stopped through its ``stop`` entry point."""
    name = f"fem_executor_{executor}"
    return (executor in STOP_FILE_EXECUTORS
            and find_role(name, config) == data_dir() / "roles" / name)
