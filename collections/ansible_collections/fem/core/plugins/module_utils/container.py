# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""What every fem executor module shares: the container settings, the limits, the user rule,
the log caps and the watch on the writable dirs.

``docker_task`` applies the settings through the Docker API; ``slurm_task`` turns the same
settings into a ``docker run``/``podman run`` command line (:func:`run_argv`) for a Slurm job
step.  Both take them under the same option names (:data:`CONTAINER_OPTIONS`), so a setting
added to ``fem_policy`` is added here once and reaches both.
"""

# Runs on the target's Python (>= 3.8): timezone.utc, not datetime.UTC.
# ruff: noqa: UP017

from __future__ import annotations

import io
import math
import os
import re
import tarfile
import threading
from datetime import datetime, timezone

from ansible_collections.fem.core.plugins.module_utils.disk import LIMIT_EXCEEDED, usage

_NUMERIC_ID = re.compile(r"[+-]?[0-9]+\Z")
# Never started: a container created only to read the image's account files.
NEVER_STARTED = "/fem-never-started"
ACCOUNT_FILES = ("/etc/passwd", "/etc/group")
# The engine keeps a container's log (both streams, framed) up to this many times log_bytes,
# never under ENGINE_LOG_FLOOR (podman refuses a tiny log size).
ENGINE_LOG_FACTOR = 2
ENGINE_LOG_FLOOR = 1 << 20
_TRUNCATION_MARKER = "\n[fem: log truncated at {limit} bytes]\n"

# How often a run module looks for its stop request (stop_file) while the container runs.
STOP_POLL_S = 0.2
# Exit codes of a container whose tool the stop's SIGTERM or SIGKILL ended (through its init).
STOP_EXIT_CODES = (128 + 15, 128 + 9)
# Podman's own init (its default init_path), then tini builds that do the same job.
PODMAN_INITS = ("/usr/libexec/podman/catatonit", "/usr/bin/catatonit", "/usr/bin/tini-static",
                "/usr/bin/docker-init")

# Module options describing the container (docs: each module's DOCUMENTATION).
CONTAINER_OPTIONS = {
    "image": {"type": "str"},
    "command": {"type": "list", "elements": "str"},
    "workdir": {"type": "str"},
    "env": {"type": "dict", "default": {}},
    # Laid over env; hidden from the module's logged arguments and results (a legacy token).
    "secret_env": {"type": "dict", "default": {}, "no_log": True},
    "labels": {"type": "dict", "default": {}},
    # Named by the listener, like the task's container (fem_ansible/naming.py): never made
    # from the task's name here, where another task's container may be called that.
    "accounts_name": {"type": "str"},
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
    "pids_limit": {"type": "int"},
    "memory": {"type": "int"},
    "cpus": {"type": "float"},
    "gpus": {"type": "int", "default": 0},
    "network_mode": {"type": "str", "default": "none"},
    "watch_dirs": {"type": "list", "elements": "path", "default": []},
    "watch_bytes": {"type": "int"},
    "min_free_bytes": {"type": "int"},
}
# What a module needs to run a container: a limit left out would be no limit.
LIMIT_OPTIONS = ("pids_limit", "memory", "cpus")


_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_engine_time(value):
    """Epoch seconds of an engine's RFC 3339 (nanosecond) time (Docker's and podman's
    ``State.StartedAt``), None when unset (``0001-01-01…``)."""
    match = _TS_RE.fullmatch(value or "")
    if not match or match.group(1).startswith("0001-"):
        return None
    base, frac, zone = match.groups()
    stamp = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    return stamp.replace(tzinfo=stamp.tzinfo or timezone.utc).timestamp() + float(
        "0." + (frac or "0")
    )


def check_limits(p):
    """Refuse a limit that the engine would read as none: ``pids_limit``, ``memory`` or
    ``cpus`` not above 0 (or not finite), or ``cpus`` so small that its nano CPUs round to 0.

    :raises ValueError: naming the limit.
    """
    for key in LIMIT_OPTIONS:
        value = p.get(key)
        if value is None:
            raise ValueError(f"{key} is required: a container without it has no limit")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} {value!r} is not a limit (it must be above 0)")
    if nano_cpus(p["cpus"]) < 1:
        raise ValueError(f"cpus {p['cpus']!r} is below one nano CPU, which means no limit")


def nano_cpus(cpus):
    """The engine's ``NanoCpus`` for ``cpus``; 0 would mean unlimited (see check_limits)."""
    return int(cpus * 1e9)


def engine_log_bytes(log_bytes):
    """Size cap of the engine's own log of a container (both streams, with framing)."""
    return max(ENGINE_LOG_FACTOR * log_bytes, ENGINE_LOG_FLOOR)


def _accounts(text):
    """``name -> (id, primary gid)`` of an ``/etc/passwd`` or ``/etc/group`` file."""
    found = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit() and fields[0] not in found:
            found[fields[0]] = (int(fields[2]), fields[3])
    return found


def needs_accounts(image_user):
    """Whether deciding the user of ``image_user`` takes the image's account files: it
    names a user or group, or gives a uid alone (whose primary group is in the image's
    ``/etc/passwd``), instead of giving both numbers."""
    user, _, group = (image_user or "").partition(":")
    if not _NUMERIC_ID.match(user):
        return bool(user)
    return int(user) > 0 and not (group and _NUMERIC_ID.match(group))


def effective_user(image_user, fallback, files=None):
    """The ``uid:gid`` a task container runs as: the image's own, as numbers, unless it is
    root or cannot be told, then ``fallback`` (the site's ``container_uid``).

    Root is uid 0 however it is written (``0``, ``00``, ``+0``, ``0:0``) or any name that
    the image's ``/etc/passwd`` maps to uid 0: ids are compared as numbers and names are
    resolved in ``files`` (path -> text of the image's :data:`ACCOUNT_FILES`, None when it
    has none), never passed on for the engine to resolve. A name the image does not define,
    a negative id, or an empty user gets ``fallback``.

    The gid is always given: handed a uid alone, the engine (runc, for Docker and podman)
    adds as supplementary groups every group the image's ``/etc/group`` lists the user in
    (``root``, ``disk``, ``shadow``…); handed ``uid:gid`` it adds none, so the task has its
    one gid.  That gid is the image's (written, or the user's primary group in its
    ``/etc/passwd``); the root group (0) or a uid the image does not list gets the
    fallback's gid.
    """
    user, sep, group = (image_user or "").partition(":")
    files = files or {}
    passwd = files.get("/etc/passwd")
    uid = _account_id(user, passwd)
    if uid is None or uid <= 0:
        return fallback
    if sep:
        gid = _account_id(group, files.get("/etc/group"))
        if gid is None or gid < 0:
            return fallback
    else:
        gid = _primary_gid(user, uid, passwd)
    if gid is None or gid <= 0:
        gid = fallback.rpartition(":")[2]
    return f"{uid}:{gid}"


def _primary_gid(user, uid, passwd_text):
    """The primary gid of ``user`` (a name, else the uid ``uid``) in the image's passwd
    file, None when it has no such entry."""
    if _NUMERIC_ID.match(user):
        entries = [entry for entry in _accounts(passwd_text).values() if entry[0] == uid]
    else:
        entries = [_accounts(passwd_text).get(user)]
    gid = entries[0][1] if entries and entries[0] else ""
    return int(gid) if gid.isdigit() else None


def _account_id(name, accounts_text):
    """``name`` as a number: itself if it is one, else its id in ``accounts_text`` (the
    image's passwd or group file), None if the file does not define it."""
    if _NUMERIC_ID.match(name):
        return int(name)
    entry = _accounts(accounts_text).get(name)
    return None if entry is None else entry[0]


def account_files(tar_bytes):
    """The account files in ``tar_bytes`` (an engine's archive of a container's paths) as
    :func:`effective_user` takes them; links are not followed."""
    files = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            name = "/etc/" + os.path.basename(member.name)
            if name in ACCOUNT_FILES and member.isfile() and member.size <= 1 << 20:
                files[name] = tar.extractfile(member).read().decode("utf-8", "replace")
    return files


# What a task's object is for, beside the task's own labels (fem.node_id, fem.task_id), so a
# sweep selects by exact labels; the values are fem_ansible/naming.py's purposes.
PURPOSE_LABEL = "fem.purpose"
TASK_PURPOSE = "task"
ACCOUNTS_PURPOSE = "accounts"


def object_labels(labels, purpose):
    """The task's ``labels`` as engines take them (strings), with the object's ``purpose``."""
    return {**{k: str(v) for k, v in labels.items()}, PURPOSE_LABEL: purpose}


def label_args(labels):
    """``labels`` as an engine CLI's ``--label key=value`` arguments."""
    return [arg for key, value in sorted(labels.items())
            for arg in ("--label", f"{key}={value}")]


def cli_account_files(run, runtime, image, container, labels):
    """The image's account files through an engine's CLI (``docker`` or ``podman``): a
    container named ``container`` (the task's ``accounts_name``, with its ``labels``)
    created and never started, copied from, removed.  ``run(argv)`` returns the command's
    stdout as bytes, None when it failed.

    :raises ValueError: when the engine cannot create the container.
    """
    run([runtime, "rm", "--force", container])  # one a killed module left behind
    created = run([runtime, "create", "--name", container,
                   *label_args(object_labels(labels, ACCOUNTS_PURPOSE)), "--network",
                   "none", "--entrypoint", NEVER_STARTED, "--", image])
    if created is None:
        raise ValueError(f"cannot read the user accounts of image {image}")
    try:
        files = {}
        for path in ACCOUNT_FILES:
            tar = run([runtime, "cp", f"{container}:{path}", "-"])
            if tar is not None:  # None: the image has no such file
                files.update(account_files(tar))
        return files
    finally:
        run([runtime, "rm", "--force", container])


class OutputWatch:
    """Whether the task's writable dirs (output, scratch) together take more than
    ``watch_bytes`` of disk (:func:`disk.usage`: blocks and inodes, not file sizes): looked
    at every ``watch_interval`` seconds while the container runs, because a bind mount has
    no quota of its own."""

    def __init__(self, p):
        self.dirs = p.get("watch_dirs") or []
        self.limit = p.get("watch_bytes")
        self.interval = p.get("watch_interval") or 2
        self.size = 0

    def step(self, remaining):
        """Seconds to wait before the next look (all of ``remaining`` when nothing is
        watched)."""
        return remaining if not self.dirs or self.limit is None else min(remaining,
                                                                         self.interval)

    def exceeded(self):
        if not self.dirs or self.limit is None:
            return False
        self.size = usage(self.dirs).bytes
        return self.size > self.limit

    def failure(self, name):
        """The failed module result of a container stopped for its size."""
        return {"msg": f"Task {name} took {self.size} bytes of disk in its output and "
                       "scratch dirs (blocks, at least one per file or directory), "
                       f"over the site's limit of {self.limit} bytes "
                       "(policy.limits.output_bytes); it was stopped and nothing is archived.",
                "fem_error_code": LIMIT_EXCEEDED, "output_bytes": self.size}


class StopRequest:
    """A cancel's stop, done by the module that waits for the container: once ``path``
    exists (the listener, or the executor's ``stop`` entry point, creates it) a thread here
    calls ``stop()`` within :data:`STOP_POLL_S`.  ``stop()`` stops the container only if it
    still runs and says whether it did; with the exit code (:data:`STOP_EXIT_CODES`) that
    tells a stop that ended the tool from a tool that exited by itself (RV(stopped))."""

    def __init__(self, path, stop):
        self.path = path
        self._stop = stop
        self.stopped = False
        self._done = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.path:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc):
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self):
        while not self._done.wait(STOP_POLL_S):
            if os.path.exists(self.path):
                self.stopped = self._stop()
                return


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


def init_args(runtime):
    """``--init``: the engine's init as PID 1 passes a stop's SIGTERM on to the tool (the
    kernel delivers none to a PID 1 without a handler).  Podman's default init, catatonit,
    is only a Recommends of Debian's podman; the same job is done by ``tini-static``, which
    Debian's docker.io ships as ``docker-init``, so the first found is named.  With none,
    the container runs without (a stop then waits out the grace)."""
    if not runtime.endswith("podman"):
        return ["--init"]
    for path in PODMAN_INITS:
        if os.path.isfile(path):
            return ["--init", "--init-path", path]
    return []


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
            "--network", p["network_mode"], "--ipc", "private", *init_args(runtime)]
    argv += label_args(object_labels(p["labels"], TASK_PURPOSE))
    if p["read_only"]:
        argv.append("--read-only")
    for cap in p["cap_drop"]:
        argv += ["--cap-drop", cap]
    if p["no_new_privileges"]:
        argv += ["--security-opt", "no-new-privileges"]
    for path, options in sorted(p["tmpfs"].items()):
        argv += ["--tmpfs", f"{path}:{options}" if options else path]
    check_limits(p)
    argv += ["--pids-limit", str(p["pids_limit"]),
             "--memory", f"{p['memory']}b", "--memory-swap", f"{p['memory']}b",
             "--cpus", f"{nano_cpus(p['cpus']) / 1e9:.9f}",
             # A driver that takes max-size (and, for podman, keeps stdout and stderr apart;
             # journald would need a running journal).
             "--log-driver", "json-file" if runtime.endswith("docker") else "k8s-file",
             "--log-opt", f"max-size={engine_log_bytes(p['log_bytes'])}"]
    if p["gpus"] > 0:
        argv += (["--gpus", str(p["gpus"])] if runtime.endswith("docker")
                 else ["--device", "nvidia.com/gpu=all"])
    if runtime.endswith("podman"):
        # Podman's default ulimits may exceed the host's hard limits, and its run then fails
        # (seen on this project's development VMs; docs/roles.md, known limits).
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
