# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""What every fem executor module shares: the container settings, the user rule, the log cap.

``docker_task`` applies the settings through the Docker API; ``slurm_task`` turns the same
settings into a ``docker run``/``podman run`` command line (:func:`run_argv`) for a Slurm job
step.  Both take them under the same option names (:data:`CONTAINER_OPTIONS`), so a setting
added to ``fem_policy`` is added here once and reaches both.
"""

# Runs on the target's Python (>= 3.8): timezone.utc, not datetime.UTC.
# ruff: noqa: UP017

from __future__ import annotations

import os
import re
from datetime import datetime, timezone

_ROOT_USERS = ("", "root", "0")
_TRUNCATION_MARKER = "\n[fem: log truncated at {limit} bytes]\n"

# Module options describing the container (docs: each module's DOCUMENTATION).
CONTAINER_OPTIONS = {
    "image": {"type": "str"},
    "command": {"type": "list", "elements": "str"},
    "workdir": {"type": "str"},
    "env": {"type": "dict", "default": {}},
    # Laid over env; hidden from the module's logged arguments and results (a legacy token).
    "secret_env": {"type": "dict", "default": {}, "no_log": True},
    "labels": {"type": "dict", "default": {}},
    "mounts": {
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "type": {"type": "str", "choices": ["bind", "volume"], "default": "bind"},
            "source": {"type": "str", "required": True},
            "target": {"type": "str", "required": True},
            "read_only": {"type": "bool", "default": True},
        },
    },
    "fallback_user": {"type": "str"},
    "read_only": {"type": "bool", "default": True},
    "cap_drop": {"type": "list", "elements": "str", "default": ["ALL"]},
    "no_new_privileges": {"type": "bool", "default": True},
    "tmpfs": {"type": "dict", "default": {}},
    "pids_limit": {"type": "int", "default": 0},
    "memory": {"type": "int", "default": 0},
    "cpus": {"type": "float", "default": 0},
    "gpus": {"type": "int", "default": 0},
    "network_mode": {"type": "str", "default": "none"},
}


_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_engine_time(value):
    """Epoch seconds of an engine's RFC 3339 (nanosecond) time (Docker's and podman's
    ``State.StartedAt``), None when unset (``0001-01-01…``)."""
    match = _TS_RE.match(value or "")
    if not match or match.group(1).startswith("0001-"):
        return None
    base, frac, zone = match.groups()
    stamp = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    return stamp.replace(tzinfo=stamp.tzinfo or timezone.utc).timestamp() + float(
        "0." + (frac or "0")
    )


def effective_user(image_user, fallback):
    """The image's user unless it is empty or root (by name or uid), else ``fallback``."""
    if (image_user or "").split(":", 1)[0] in _ROOT_USERS:
        return fallback
    return image_user


def write_capped(chunks, path, limit):
    """Write ``chunks`` to ``path`` keeping at most ``limit`` bytes, marker line included.

    Reads the iterator lazily and stops at the limit, so a large log is never held in memory.
    Returns ``(bytes_written, truncated)``.
    """
    marker = _TRUNCATION_MARKER.format(limit=limit).encode()
    written = 0
    truncated = False
    with open(path, "wb") as out:
        for chunk in chunks:
            if written + len(chunk) > limit:
                keep = max(limit - len(marker), 0)
                if written > keep:
                    out.truncate(keep)
                    out.seek(keep)
                    written = keep
                out.write(chunk[: keep - written])
                out.write(marker[: limit - keep])
                written = keep + min(len(marker), limit - keep)
                truncated = True
                break
            out.write(chunk)
            written += len(chunk)
    return written, truncated


def file_chunks(path, size=1 << 16):
    """The bytes of ``path`` in chunks, none when it does not exist (for :func:`write_capped`)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as src:
        while True:
            chunk = src.read(size)
            if not chunk:
                return
            yield chunk


def _mount_arg(mount):
    """``--mount`` value; a comma or an equals sign in a path would change its meaning."""
    for key in ("source", "target"):
        if "," in mount[key] or "=" in mount[key]:
            raise ValueError(f"mount {key} {mount[key]!r} contains ',' or '='")
    value = f"type={mount['type']},source={mount['source']},target={mount['target']}"
    return value + (",readonly" if mount["read_only"] else "")


def run_argv(runtime, p, user, env_file=None, create=False):
    """The ``<runtime> run`` argument vector for the settings ``p`` (:data:`CONTAINER_OPTIONS`
    plus ``name``), with the hardening ``docker_task`` applies through the API.

    The environment is not on the command line (where any local user could read it): it is
    in ``env_file``, written by :func:`write_env_file`.  The container is removed by the
    engine when it ends (``--rm``), so one stopped with its job leaves nothing behind.
    With ``create`` it is ``<runtime> create`` instead: the caller (``podman_task``) starts,
    waits for, collects and removes the container itself.
    """
    verb = ["create"] if create else ["run", "--rm"]
    argv = [runtime, *verb, "--name", p["name"], "--user", user,
            "--network", p["network_mode"], "--ipc", "private"]
    for key, value in sorted(p["labels"].items()):
        argv += ["--label", f"{key}={value}"]
    if p["read_only"]:
        argv.append("--read-only")
    for cap in p["cap_drop"]:
        argv += ["--cap-drop", cap]
    if p["no_new_privileges"]:
        argv += ["--security-opt", "no-new-privileges"]
    for path, options in sorted(p["tmpfs"].items()):
        argv += ["--tmpfs", f"{path}:{options}" if options else path]
    if p["pids_limit"] > 0:
        argv += ["--pids-limit", str(p["pids_limit"])]
    if p["memory"] > 0:
        argv += ["--memory", f"{p['memory']}b", "--memory-swap", f"{p['memory']}b"]
    if p["cpus"] > 0:
        argv += ["--cpus", f"{p['cpus']:g}"]
    if p["gpus"] > 0:
        argv += (["--gpus", str(p["gpus"])] if runtime.endswith("docker")
                 else ["--device", "nvidia.com/gpu=all"])
    if runtime.endswith("podman"):
        # Podman's default ulimits may exceed the node's hard limits (machine-facts.md).
        argv += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    for mount in p["mounts"]:
        argv += ["--mount", _mount_arg(mount)]
    if p["workdir"]:
        argv += ["--workdir", p["workdir"]]
    if env_file:
        argv += ["--env-file", env_file]
    argv += ["--", p["image"]]
    if p["command"] is not None:
        argv += list(p["command"])
    return argv


def write_env_file(path, env):
    """Write ``env`` as an engine env file (``KEY=value`` lines, mode 0600).

    The format has no quoting: a value with a line break cannot be written and is refused.
    """
    lines = []
    for key, value in sorted(env.items()):
        value = str(value)
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"env {key}: a line break cannot be passed in an env file")
        lines.append(f"{key}={value}\n")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(lines)
