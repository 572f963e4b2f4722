"""A ``submit_run``'s own task definition (``task_info{image, var_envs, volumes, command,
source_code, cpus, memory, gpus}``) mapped onto a ``fem.task/v1`` task, for a catalogue
entry that lets the message name its image (``legacy.tools.<id>.from_task_info``).

Nothing here reaches a shell, a host path or a template: host paths are the site's, the
command is an argv (docs/legacy.md has the mapping).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from .. import schema
from ..errors import PolicyViolation, RejectedError
from .message import TASK_PREFIX, LegacyMessage, run_ids

SANDBOX_VOLUME = "$SANDBOX_PATH/%%user_id%%/%%execution_id%%"
DATA_VOLUME = "$DATA_PATH"
# Datasets the listener resolves for a legacy run (policy.decide's run_datasets).
DATA_DATASET = "legacy-data"
INPUT_DATASET = "legacy-input"
# Where the files pushed by receive_files are mounted, read-only, in every legacy task.
RECEIVED_MOUNT = "/fem/received"
_SITE_VAR = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
PLACEHOLDER = re.compile(r"%%([A-Za-z0-9_]+)%%")
_DIGEST = re.compile(r"^(sha256:)?([a-f0-9]{64})$")


def image_ref(image: Any) -> str:
    """``<repository>/<name>@<hash>`` when ``hash`` is a real sha256 digest, else
    ``<repository>/<name>:<tag>`` (tag default ``latest``; no ``repository/`` when empty)."""
    if not isinstance(image, dict) or not isinstance(image.get("name"), str) or \
            not image["name"].strip():
        raise RejectedError("task_info/image: a dict with a name is required")
    repo = str(image.get("repository") or "").strip().rstrip("/")
    name = image["name"].strip()
    base = f"{repo}/{name}" if repo else name
    digest = _DIGEST.fullmatch(str(image.get("hash") or "").strip())
    if digest:
        return f"{base}@sha256:{digest.group(2)}"
    tag = str(image.get("tag") or "").strip() or "latest"
    return f"{base}:{tag}"


def _env(var_envs: Any, site_vars: Mapping[str, str]) -> dict[str, str]:
    if var_envs in (None, "", {}):
        return {}
    if not isinstance(var_envs, dict):
        raise RejectedError("task_info/var_envs: expected a dict")
    env = {}
    for key, value in var_envs.items():
        if value is None or isinstance(value, dict | list):
            raise RejectedError(f"task_info/var_envs/{key}: expected a string or number")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        m = _SITE_VAR.fullmatch(text)
        if m:
            if m.group(1) not in site_vars:
                raise PolicyViolation("legacy.site_vars",
                                      f"var_envs/{key}: ${m.group(1)} is not a site variable")
            text = site_vars[m.group(1)]
        env[key] = text
    return env


def _volumes(volumes: Any) -> tuple[str | None, str | None]:
    """``(sandbox container path, data container path)``: the only two host paths a legacy
    task may name; anything else is refused."""
    if volumes in (None, "", []):
        return None, None
    if not isinstance(volumes, list):
        raise RejectedError("task_info/volumes: expected a list")
    sandbox = data = None
    for i, vol in enumerate(volumes):
        if not isinstance(vol, dict) or not isinstance(vol.get("host_path"), str) or \
                not isinstance(vol.get("container_path"), str):
            raise RejectedError(f"task_info/volumes/{i}: host_path and container_path "
                                "strings are required")
        host = vol["host_path"].strip()
        host = host.rstrip("/") or host
        target = vol["container_path"]
        if host == SANDBOX_VOLUME and sandbox is None:
            sandbox = target
        elif host == DATA_VOLUME and data is None:
            data = target
        else:
            raise PolicyViolation("legacy.volumes", f"volumes/{i}: host_path {host[:200]!r} "
                                  f"is not allowed (only {SANDBOX_VOLUME} and {DATA_VOLUME}, "
                                  "each once)")
    return sandbox, data


def split_words(text: str, where: str) -> list[str]:
    """``text`` split like a POSIX shell word list (quotes honoured, nothing expanded)."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise RejectedError(f"{where}: {e}") from None


def _source(source_code: Any) -> dict[str, str] | None:
    url = source_code.get("url") if isinstance(source_code, dict) else source_code
    if url in (None, ""):
        return None
    if not isinstance(url, str):
        raise RejectedError("task_info/source_code/url: expected a string")
    words = split_words(url, "task_info/source_code/url")
    if not words:
        return None
    if len(words) == 1:
        return {"repo": words[0], "mount": schema.SOURCE_MOUNT}
    if len(words) == 3 and words[1] in ("--branch", "-b"):
        return {"repo": words[0], "version": words[2], "mount": schema.SOURCE_MOUNT}
    raise RejectedError("task_info/source_code/url: only '<url> [--branch <name>]' is allowed")


def _arg_value(value: Any, where: str) -> str:
    if isinstance(value, int | float | str):  # bool is an int: "True"/"False"
        return str(value)
    raise RejectedError(f"{where}: expected a string or number, got {type(value).__name__}")


def build_argv(command: Any, params: Mapping[str, Any], placeholders: Mapping[str, str]
               ) -> list[str] | None:
    """``command{base, args}`` plus the user's parameters → argv (never a shell string).

    ``base`` is split like a POSIX shell word list and its ``%%name%%`` placeholders filled
    from ``placeholders`` (unknown ones are an error); each arg, in ``position`` order (args
    without one after, in list order), takes the parameter of its ``id``, else its
    ``default_value``; a missing ``required`` one is an error, a missing optional one is
    left out; ``prefix`` comes before the value as its own word (``separate``, default
    true) or glued to it; a ``boolean``/``flag`` arg adds only its prefix, when true.
    """
    if command in (None, "", {}):
        return None
    if not isinstance(command, dict):
        raise RejectedError("task_info/command: expected a dict")
    base = command.get("base") or ""
    if not isinstance(base, str):
        raise RejectedError("task_info/command/base: expected a string")
    argv = split_words(base, "task_info/command/base")

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in placeholders:
            raise RejectedError(f"task_info/command/base: unknown placeholder {match.group(0)}")
        return placeholders[match.group(1)]

    argv = [PLACEHOLDER.sub(fill, word) for word in argv]
    args = command.get("args") or []
    if not isinstance(args, list):
        raise RejectedError("task_info/command/args: expected a list")
    ordered = []
    for i, arg in enumerate(args):
        if not isinstance(arg, dict) or not isinstance(arg.get("id"), str):
            raise RejectedError(f"task_info/command/args/{i}: a dict with an id is required")
        pos = arg.get("position")
        if pos in (None, ""):
            key: tuple[int, float, int] = (1, 0, i)
        else:
            try:
                key = (0, float(pos), i)
            except (TypeError, ValueError):
                raise RejectedError(f"task_info/command/args/{i}/position: not a number"
                                    ) from None
        ordered.append((key, arg))
    for _key, arg in sorted(ordered, key=lambda item: item[0]):
        where = f"command/args/{arg['id']}"
        value = params.get(arg["id"], arg.get("default_value"))
        prefix = arg.get("prefix") or ""
        if not isinstance(prefix, str):
            raise RejectedError(f"{where}/prefix: expected a string")
        if value is None or value == "":
            if _truthy(arg.get("required")):
                raise RejectedError(f"{where}: a required argument has no value")
            continue
        if str(arg.get("type", "")).lower() in ("boolean", "bool", "flag"):
            if _truthy(value):
                if not prefix:
                    raise RejectedError(f"{where}: a boolean argument needs a prefix")
                argv.append(prefix)
            continue
        text = _arg_value(value, where)
        if not prefix:
            argv.append(text)
        elif arg.get("separate") is None or _truthy(arg.get("separate")):
            argv.extend([prefix, text])
        else:
            argv.append(prefix + text)
    return argv or None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


def _resources(info: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in ("cpus", "memory", "gpus"):
        value = info.get(name)
        if value in (None, ""):
            continue
        if name == "memory":
            res[name] = value if isinstance(value, int) else str(value).strip()
            continue
        try:
            number = float(value) if name == "cpus" else int(str(value).strip())
        except (TypeError, ValueError):
            raise RejectedError(f"task_info/{name}: {str(value)[:32]!r} is not a number"
                                ) from None
        res[name] = number
    return res


def user_params(params: Mapping[str, Any], node_name: str,
                sections: Sequence[str] = ()) -> dict[str, Any]:
    """The user's parameters for this node.  The orchestrator may key them per node,
    ``{"server": {…}, "BSC": {…}, "UB": {…}}`` [NB]: the top level's plain values, then the
    dicts under ``sections`` (a tool's ``params``, e.g. ``server`` for the federated
    server), then the dict under this node's name, each laid over the one before."""
    out = {k: v for k, v in params.items() if not isinstance(v, dict)}
    for name in (*sections, node_name):
        own = params.get(name)
        if isinstance(own, dict):
            out.update(own)
    return out


def to_task(msg: LegacyMessage, node_name: str, site_vars: Mapping[str, str]
            ) -> dict[str, Any]:
    """The ``fem.task/v1`` message of a ``submit_run`` (still to be validated)."""
    eid, user = run_ids(msg)
    tid = TASK_PREFIX + eid
    info = msg.task_info
    try:
        if not isinstance(info, dict):
            raise RejectedError("task_info: a dict is required")
        if not msg.tool_id:
            raise RejectedError("tool_id: empty")
        sandbox, data = _volumes(info.get("volumes"))
        source = _source(info.get("source_code"))
        placeholders = {"execution_id": eid, "user_id": user or "", "node_name": node_name,
                        "tool_id": msg.tool_id, "task_id": str(info.get("_id") or "")}
        task: dict[str, Any] = {
            "schema": schema.TASK_SCHEMA_ID,
            "task_id": tid,
            "image": {"ref": image_ref(info.get("image"))},
            "env": _env(info.get("var_envs"), site_vars),
            "datasets": [{"name": INPUT_DATASET, "mount": RECEIVED_MOUNT}],
            "resources": _resources(info),
            "labels": {"legacy.tool_id": msg.tool_id[:1024],
                       "legacy.task": str(info.get("_id") or "")[:1024],
                       "legacy.execution_id": eid},
        }
        argv = build_argv(info.get("command"), user_params(msg.parametric_args, node_name),
                          placeholders)
        if argv is not None:
            task["command"] = argv
        if sandbox is not None:
            task["outputs"] = {"path": sandbox}
        if data is not None:
            task["datasets"].append({"name": DATA_DATASET, "mount": data})
        if source is not None:
            task["source"] = source
            task["workdir"] = source["mount"]
    except RejectedError as e:
        e.task_id = tid
        raise
    return task
