"""The site policy (DESIGN.md §7): what a valid task may do here, decided in Python before
Ansible starts.

:func:`decide` either refuses the task with one :class:`PolicyViolation` naming every rule
it breaks, or returns the :class:`Decision` the roles receive: the datasets resolved to host
paths and the container settings the listener chose.  Nothing a role does is left to the
message.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .config import Config
from .errors import PolicyViolation, RejectedError
from .refs import glob_match, normalise_url, normalise_url_pattern, parse_image
from .schema import parse_time
from .sizes import format_bytes

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
    """``node_id`` and ``not_after`` (DESIGN.md §3), checked after the schema, before policy.

    :raises RejectedError: ``wrong_node``, ``expired``, or ``invalid_message`` for a
        ``not_after`` that is no time: the one place a task's or a cancel's is parsed
        (the schema only bounds its length).
    """
    tid = task["task_id"]
    if task.get("node_id") is not None and task["node_id"] != config.node_id:
        raise RejectedError(
            f"task is for node {task['node_id']!r}, this is {config.node_id!r}",
            code="wrong_node", task_id=tid,
        )
    if config.security.signature.mode != "none" and task.get("node_id") is None:
        raise RejectedError("signed tasks must name their node_id", code="wrong_node", task_id=tid)
    if task.get("not_after") is not None:
        try:
            deadline = parse_time(task["not_after"])
        except ValueError as e:
            raise RejectedError(f"not_after: {e}", task_id=tid) from None
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


def collect(found: list[tuple[str, str]], check: Callable[..., None], *args: Any) -> None:
    """Run a check that raises :class:`PolicyViolation`, adding its violations to ``found``
    instead, so that one rejection lists every rule broken."""
    try:
        check(*args)
    except PolicyViolation as e:
        found.extend(e.violations)


def image_pattern(pattern: str) -> str:
    """A ``policy.images.allow`` entry in the normal form the task's reference has: a
    pattern without wildcards is an image reference (``busybox:1.36`` is
    ``docker.io/library/busybox:1.36``), as the URL patterns are URLs
    (:func:`~fem_ansible.refs.normalise_url_pattern`); a glob is taken as written."""
    if any(c in pattern for c in "*?"):
        return pattern
    try:
        return str(parse_image(pattern))
    except ValueError:
        return pattern


def allowed(name: str, patterns: list[str]) -> bool:
    """``name`` (a target, executor or network) is matched by one of the allow-list's
    globs; like every allow-list, ``*`` does not cross ``/`` and ``**`` does (the names
    here hold no ``/``), and an entry without wildcards is the name itself."""
    return glob_match(name, patterns) is not None


def _limit_text(name: str, value: float) -> str:
    """A resource as people write it: ``64 GiB``, ``2 CPUs``, ``3600 s``."""
    if name == "memory":
        return format_bytes(value).replace(".0 ", " ")
    if name == "timeout_s":
        return f"{value:g} s"
    return f"{value:g}"


def decide(task: dict[str, Any], config: Config,
           run_datasets: Mapping[str, str] | None = None) -> Decision:
    """Check a normalised task against the site policy: every rule, not the first broken.

    :param run_datasets: datasets the listener itself resolved for this one task (name →
        host path), never from a message: the legacy protocol's data path and the run's
        received files (docs/legacy.md).  They are looked up before the site's datasets.
    :raises PolicyViolation: listing each rule broken (``policy.images``,
        ``policy.limits.memory``…) with why.
    """
    pol, tid = config.policy, task["task_id"]
    found: list[tuple[str, str]] = []
    check = functools.partial(collect, found)
    if not allowed(task["executor"], pol.executors.allow):
        found.append(("policy.executors", f"executor {task['executor']!r} is not allowed"))
    ref = task["image"]["ref"]
    image = parse_image(ref)
    if pol.images.require_digest and image.digest is None:
        found.append(("policy.images.require_digest", f"{ref} is not pinned by digest"))
    if not glob_match(ref, [image_pattern(p) for p in pol.images.allow]):
        found.append(("policy.images", f"{ref} is not in the allow-list"))
    if task["source"]:
        check(_url_allowed, "policy.sources", task["source"]["repo"], pol.sources.allow,
              GIT_SCHEMES, tid)
    for item in task["inputs"]:
        check(_url_allowed, "policy.downloads", item["url"], pol.downloads.allow,
              HTTP_SCHEMES, tid)
    for kind in ("outputs", "logs"):
        up = task[kind]["upload"]
        if up:
            check(_url_allowed, "policy.uploads", up["url"], pol.uploads.allow, HTTP_SCHEMES,
                  tid)

    datasets = []
    for d in task["datasets"]:
        host_path = (run_datasets or {}).get(d["name"])
        if host_path is None and d["name"] in pol.datasets:
            host_path = pol.datasets[d["name"]].path
        if host_path is None:
            found.append(("policy.datasets", f"no dataset named {d['name']!r}"))
            continue
        datasets.append({"name": d["name"], "host_path": host_path, "mount": d["mount"]})

    network = task["network"]
    if network != "none" and not allowed(network, pol.networks.allow):
        found.append(("policy.networks", f"network {network!r} is not allowed"))
    if not allowed(task["target"], pol.targets.allow):
        found.append(("policy.targets", f"target {task['target']!r} is not allowed"))

    res, limits = task["resources"], pol.limits
    for name in ("cpus", "memory", "gpus", "timeout_s"):
        if res[name] > getattr(limits, name):
            found.append((f"policy.limits.{name}",
                          f"asks {_limit_text(name, res[name])}, the limit is "
                          f"{_limit_text(name, getattr(limits, name))}"))
    if found:
        raise PolicyViolation.of_all(found, task_id=tid)

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
            "source_bytes": limits.source_bytes,
            "output_bytes": limits.output_bytes,
            "log_bytes": limits.log_bytes,
            # Site settings, never the message's: where Slurm runs the task's job.
            "slurm": dict(asdict(config.execution.slurm)),
            "engine": engine,
            # Site settings: whether podman checks TLS for the image's registry.
            "podman": {"tls_verify": image.registry
                       not in {r.lower() for r in config.execution.podman.insecure_registries}},
        },
        datasets=datasets,
    )
