"""The one rule that names what a task owns on a host, and the one place that lays out its
run: which objects it has, where its dirs are, what its container mounts
(``fem_run``, docs/roles.md).

Every object of a task — its container, the container that reads the image's account files,
its scratch volumes, its run dir on a host, its Slurm job, its processes' marker — is named
by :func:`object_name` of the exact ``(node_id, task_id, purpose, item)``: a readable
prefix, then a digest of those four values.  Joining ids with ``-`` is not injective (task
``s1`` with scratch ``x-y`` and task ``s1-x`` with scratch ``y`` both made ``…-s1-x-y``;
task ``vic``'s ``vic-accounts`` was task ``vic-accounts``' container), so nothing selects
an object by a prefix of its name, and roles never build a name: they get them all here,
from the listener (docs/decisions.md, "Object names").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from . import schema

# What an object is for; part of the digest, so two purposes never share a name.
TASK = "task"  # the task's container, its Slurm job and its run dir (three namespaces)
ACCOUNTS = "accounts"  # the never-started container that reads the image's account files
SCRATCH = "scratch"  # a scratch volume; ``item`` is the scratch's name
PURPOSES = (TASK, ACCOUNTS, SCRATCH)

# Readable part at most this long; the digest (128 bits of SHA-256) makes the name.
PREFIX_MAX = 64
DIGEST_HEX = 32
NAME_MAX = PREFIX_MAX + 1 + DIGEST_HEX
# Valid as a Docker and podman container and volume name, a Slurm job name and a directory
# name (no "/", never "." or ".."); no "." either, so a run's process marker
# ``<name>.a<attempt>…`` splits at its first "." back into the name (runner.kill_task_processes).
NAME_PATTERN = re.compile(rf"[a-zA-Z0-9][a-zA-Z0-9_-]{{1,{NAME_MAX - 1}}}")
# Bumped if the encoding ever changes: names of the old rule are then never reused.
_DOMAIN = "fem-ansible object name v1"


def object_name(node_id: str, task_id: str, purpose: str, item: str | None = None) -> str:
    """The name of the task's object of ``purpose`` (and ``item``, e.g. a scratch name).

    Injective over the exact tuple: the digest is over its JSON encoding (unambiguous,
    whatever the fields hold); the prefix only helps a person reading ``docker ps``.

    :raises ValueError: for a purpose that is not one of :data:`PURPOSES`.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"not an object purpose: {purpose!r}")
    encoded = json.dumps([_DOMAIN, node_id, task_id, purpose, item], separators=(",", ":"))
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:DIGEST_HEX]
    words = ["fem", node_id, task_id] + ([] if purpose == TASK else [purpose])
    readable = re.sub(r"[^a-zA-Z0-9_-]", "_", "-".join(words + ([item] if item else [])))
    return f"{readable[:PREFIX_MAX]}-{digest}"


def run_dir(host_work_dir: str, name: str) -> str:
    """``fem_run.dir``: the run dir on a host of the task whose :data:`TASK` name is
    ``name`` (the listener writes a cancel's stop file there on its own host)."""
    return f"{host_work_dir}/tasks/{name}"


def scratch_is_volume(policy: dict[str, Any]) -> bool:
    """Whether the task's scratch dirs are mounted as engine volumes: on Docker, unless the
    task runs as a Slurm job, whose compute node's engine is not the one that would hold
    the volume; podman and Slurm bind the dirs."""
    return policy["engine"] == "docker" and policy["executor"] != "slurm"


def fem_run(node_id: str, task: dict[str, Any], policy: dict[str, Any],
            datasets: Iterable[dict[str, Any]], *, host_work_dir: str, attempt: int,
            local_dir: str) -> dict[str, Any]:
    """The ``fem_run`` extra-var: the task's names, dirs and container mounts.

    :param task: the normal form (:func:`fem_ansible.schema.read_task`).
    :param policy: ``fem_policy`` (:func:`fem_ansible.policy.decide`).
    :param datasets: ``fem_datasets``, resolved from the site policy.
    :param host_work_dir: the target host's work dir (inventory var ``fem_work_dir``).
    """
    tid = task["task_id"]
    name = object_name(node_id, tid, TASK)
    run = run_dir(host_work_dir, name)
    volumes = scratch_is_volume(policy)
    scratch = [{
        "name": s["name"],
        "mount": s["mount"],
        # Inside the run dir (its own name) under the scratch's name, unique in the task.
        "dir": f"{run}/scratch/{s['name']}",
        "volume": object_name(node_id, tid, SCRATCH, s["name"]) if volumes else None,
    } for s in task["scratch"]]
    mounts = [_mount(f"{run}/input", schema.INPUT_MOUNT)]
    if task["source"]:
        mounts.append(_mount(f"{run}/src", task["source"]["mount"]))
    mounts.append(_mount(f"{run}/output", task["outputs"]["path"], read_only=False))
    mounts += [_mount(d["host_path"], d["mount"]) for d in datasets]
    mounts += [_mount(s["volume"], s["mount"], read_only=False, type_="volume") if s["volume"]
               else _mount(s["dir"], s["mount"], read_only=False) for s in scratch]
    return {
        "dir": run,
        "attempt": attempt,
        "name": name,
        "accounts_container": object_name(node_id, tid, ACCOUNTS),
        "scratch": scratch,
        "mounts": mounts,
        "local_dir": local_dir,
    }


def _mount(source: str, target: str, *, read_only: bool = True,
           type_: str = "bind") -> dict[str, Any]:
    return {"type": type_, "source": source, "target": target, "read_only": read_only}
