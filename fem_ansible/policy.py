"""The site policy (DESIGN.md §7): what a valid task may do here, decided in Python before
Ansible starts.

:func:`decide` either refuses the task with a :class:`PolicyViolation` naming the rule, or
returns the :class:`Decision` the roles receive: the datasets resolved to host paths and the
container settings the listener chose.  Nothing a role does is left to the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .config import Config
from .errors import PolicyViolation, RejectedError
from .refs import glob_match, normalise_url, normalise_url_pattern, parse_image
from .schema import parse_time

GIT_SCHEMES = ("https", "ssh", "git")
HTTP_SCHEMES = ("https", "http")
STOP_GRACE_S = 10
TMPFS_OPTIONS = "rw,nosuid,nodev,noexec,size=64m,mode=1777"


@dataclass(frozen=True)
class Decision:
    """What the listener decided for one task; becomes ``fem_policy`` and ``fem_datasets``."""

    policy: dict[str, Any]
    datasets: list[dict[str, str]]


def check_addressing(task: dict[str, Any], config: Config, now: datetime | None = None) -> None:
    """``node_id`` and ``not_after`` (DESIGN.md §3), checked after the schema, before policy."""
    tid = task["task_id"]
    if task.get("node_id") is not None and task["node_id"] != config.node_id:
        raise RejectedError(
            f"task is for node {task['node_id']!r}, this is {config.node_id!r}",
            code="wrong_node", task_id=tid,
        )
    if config.security.signature.mode != "none" and task.get("node_id") is None:
        raise RejectedError("signed tasks must name their node_id", code="wrong_node", task_id=tid)
    if task.get("not_after"):
        deadline = parse_time(task["not_after"])
        if (now or datetime.now(UTC)) > deadline:
            raise RejectedError(f"task expired at {task['not_after']}", code="expired",
                                task_id=tid)


def _url_allowed(rule: str, url: str, patterns: list[str], schemes: tuple[str, ...],
                 tid: str) -> None:
    try:
        norm = normalise_url(url)
    except ValueError as e:
        raise PolicyViolation(rule, str(e), task_id=tid) from None
    scheme = norm.split(":", 1)[0]
    if scheme not in schemes:
        raise PolicyViolation(rule, f"scheme {scheme!r} is not allowed", task_id=tid)
    if not glob_match(norm, [normalise_url_pattern(p) for p in patterns]):
        raise PolicyViolation(rule, f"{norm} is not in the allow-list", task_id=tid)


def decide(task: dict[str, Any], config: Config,
           run_datasets: Mapping[str, str] | None = None) -> Decision:
    """Check a normalised task against the site policy.

    :param run_datasets: datasets the listener itself resolved for this one task (name →
        host path), never from a message: the legacy protocol's data path and the run's
        received files (docs/legacy.md).  They are looked up before the site's datasets.
    :raises PolicyViolation: with the rule (``policy.images``, ``policy.limits.memory``…).
    """
    pol, tid = config.policy, task["task_id"]

    if task["executor"] not in pol.executors.allow:
        raise PolicyViolation("policy.executors", f"executor {task['executor']!r} is not allowed",
                              task_id=tid)
    ref = task["image"]["ref"]
    if pol.images.require_digest and parse_image(ref).digest is None:
        raise PolicyViolation("policy.images.require_digest",
                              f"{ref} is not pinned by digest", task_id=tid)
    if not glob_match(ref, pol.images.allow):
        raise PolicyViolation("policy.images", f"{ref} is not in the allow-list", task_id=tid)
    if task["source"]:
        _url_allowed("policy.sources", task["source"]["repo"], pol.sources.allow, GIT_SCHEMES,
                     tid)
    for item in task["inputs"]:
        _url_allowed("policy.downloads", item["url"], pol.downloads.allow, HTTP_SCHEMES, tid)
    for kind in ("outputs", "logs"):
        up = task[kind]["upload"]
        if up:
            _url_allowed("policy.uploads", up["url"], pol.uploads.allow, HTTP_SCHEMES, tid)

    datasets = []
    for d in task["datasets"]:
        host_path = (run_datasets or {}).get(d["name"])
        if host_path is None and d["name"] in pol.datasets:
            host_path = pol.datasets[d["name"]].path
        if host_path is None:
            raise PolicyViolation("policy.datasets", f"no dataset named {d['name']!r}",
                                  task_id=tid)
        datasets.append({"name": d["name"], "host_path": host_path, "mount": d["mount"]})

    network = task["network"]
    if network != "none" and network not in pol.networks.allow:
        raise PolicyViolation("policy.networks", f"network {network!r} is not allowed",
                              task_id=tid)
    if task["target"] not in pol.targets.allow:
        raise PolicyViolation("policy.targets", f"target {task['target']!r} is not allowed",
                              task_id=tid)

    res, limits = task["resources"], pol.limits
    for name in ("cpus", "memory", "gpus", "timeout_s"):
        if res[name] > getattr(limits, name):
            raise PolicyViolation(f"policy.limits.{name}",
                                  f"asks {res[name]}, the limit is {getattr(limits, name)}",
                                  task_id=tid)

    uid = config.execution.container_uid
    # The engine that pulls, runs and removes the task's container (fem_image, fem_cleanup).
    engine = {"podman": "podman", "slurm": config.execution.slurm.runtime}.get(
        task["executor"], "docker")
    return Decision(
        policy={
            "executor": task["executor"],
            "user": f"{uid}:{uid}",
            "network": network,
            "cpus": res["cpus"],
            "memory": res["memory"],
            "gpus": res["gpus"],
            "pids": limits.pids,
            "timeout_s": res["timeout_s"],
            "stop_grace_s": STOP_GRACE_S,
            "read_only": True,
            "cap_drop": ["ALL"],
            "no_new_privileges": True,
            "tmpfs": {"/tmp": TMPFS_OPTIONS},
            "input_bytes": limits.input_bytes,
            "output_bytes": limits.output_bytes,
            "log_bytes": limits.log_bytes,
            # Site settings, never the message's: where Slurm runs the task's job.
            "slurm": dict(asdict(config.execution.slurm)),
            "engine": engine,
            # Site settings: whether podman checks TLS for the image's registry.
            "podman": {"tls_verify": parse_image(ref).registry
                       not in {r.lower() for r in config.execution.podman.insecure_registries}},
        },
        datasets=datasets,
    )
