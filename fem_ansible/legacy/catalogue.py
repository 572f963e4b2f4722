"""The site's tool catalogue (``legacy.tools``): what a ``submit_run`` of a tool may run.

The real client does not run an image the message names: its site maps the request onto a
launch template, ``json_launcher.json``, whose ``%%placeholders%%`` it fills (docs/legacy.md,
[K]).  ``legacy.tools`` is our equivalent: per ``tool_id`` (``*`` for any other) the
task template the site allows.  The message only fills placeholders, as data, into argv
words and env values (never a shell); the task that results then goes through the same
schema and policy as any task.  The ``token`` reaches the launch only as a secret env var.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import schema
from ..config import Config, LegacyToolConfig
from ..errors import ConfigError, PolicyViolation, RejectedError
from .message import LegacyMessage, run_ids
from .sandbox import safe_relative
from .taskinfo import (
    INPUT_DATASET,
    PLACEHOLDER,
    RECEIVED_MOUNT,
    build_argv,
    split_words,
    user_params,
)

DEFAULT_TOOL = "*"
TOKEN = "%%token%%"
TASK_COMMAND = "TASK_COMMAND"
# The real client's placeholders (docs/legacy.md, [K]); task_info's own entries too.
PLACEHOLDERS = ("execution_id", "task_id", "user_id", "node_name", "sandbox_host",
                "sandbox_fem", "data_path", "token", TASK_COMMAND, "api_base_url")
DATA_PREFIX = "legacy-data"
MOUNT_PREFIX = "legacy-mount"
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


@dataclass(frozen=True)
class Launch:
    """A ``submit_run`` as the catalogue turned it into a task (not validated yet).

    ``datasets``: host paths of the task's datasets (the adapter's ``run_datasets``);
    ``outputs_into``: the sandbox sub-directory the outputs are unpacked into ("" = root);
    ``secret_env``: container env vars passed as secrets (the token), never journaled.
    """

    task: dict[str, Any]
    datasets: dict[str, str]
    outputs_into: str | None
    secret_env: dict[str, str] = field(repr=False)


def select(config: Config, tool_id: str) -> LegacyToolConfig:
    tools = config.legacy.tools
    tool = tools.get(tool_id) or tools.get(DEFAULT_TOOL)
    if tool is None:
        raise PolicyViolation("legacy.tools", f"tool {tool_id[:64]!r} is not in this site's "
                              "catalogue")
    return tool


def check_catalogue(config: Config) -> None:
    """What the config model cannot say of ``legacy.tools``; at start, a ConfigError."""
    for tid, tool in config.legacy.tools.items():
        where = f"legacy.tools.{tid}"
        if tool.from_task_info:
            continue
        if not tool.image:
            raise ConfigError(f"{where}.image: required unless from_task_info is true")
        for word in tool.command or []:
            if TOKEN in word:
                raise ConfigError(f"{where}.command: %%token%% may only be an env value "
                                  "(it is a secret: never in argv)")
        for key, value in tool.env.items():
            if not _ENV_NAME.fullmatch(key):
                raise ConfigError(f"{where}.env.{key}: not an env variable name")
            if TOKEN in value and value != TOKEN:
                raise ConfigError(f"{where}.env.{key}: %%token%% must be the whole value")
        kinds = []
        for i, m in enumerate(tool.mounts):
            try:
                kinds.append(_kind(m.source))
            except ValueError as e:
                raise ConfigError(f"{where}.mounts[{i}].source: {e}") from None
            if kinds[-1] == "data" and not config.legacy.data_path:
                raise ConfigError(f"{where}.mounts[{i}]: legacy.data_path is not set")
        if kinds.count("sandbox") > 1:
            raise ConfigError(f"{where}.mounts: at most one sandbox mount (the run's "
                              "writable one)")


def _kind(source: str) -> str:
    head, _, rest = source.partition("/")
    if head in ("sandbox", "data"):
        if rest:
            try:
                safe_relative(rest, "source")
            except RejectedError as e:
                raise ValueError(e.message) from None
        return head
    if os.path.isabs(source) and os.path.normpath(source) == source:
        return "host"
    raise ValueError(f"{source!r}: sandbox[/<dir>], data[/<dir>] or a normalised absolute "
                     "host path")


def to_launch(msg: LegacyMessage, tool: LegacyToolConfig, config: Config, node_name: str,
              sandbox_host: str) -> Launch:
    """The task of a ``submit_run`` of ``tool`` (to be validated by the node's intake).

    :raises RejectedError: the message cannot fill the template (a placeholder with no
        value, a bad ``task_info.command``), with the task id.
    """
    eid, user = run_ids(msg)
    tid = f"legacy-{eid}"
    info = msg.task_info or {}
    try:
        task: dict[str, Any] = {
            "schema": schema.TASK_SCHEMA_ID,
            "task_id": tid,
            "image": {"ref": tool.image},
            "datasets": [{"name": INPUT_DATASET, "mount": RECEIVED_MOUNT}],
            "network": tool.network,
            "labels": {"legacy.tool_id": msg.tool_id[:1024],
                       "legacy.task": str(info.get("_id") or "")[:1024],
                       "legacy.execution_id": eid},
        }
        datasets: dict[str, str] = {}
        outputs_into = None
        values = {"execution_id": eid, "task_id": str(info.get("_id") or ""),
                  "user_id": user or "", "node_name": node_name}
        if config.legacy.api_base_url:
            values["api_base_url"] = config.legacy.api_base_url
        for i, m in enumerate(tool.mounts):
            rest = m.source.partition("/")[2]
            kind = _kind(m.source)
            if kind == "sandbox":
                task["outputs"] = {"path": m.mount}
                outputs_into = rest
                # Where the tool sees its sandbox: the host path means nothing inside the
                # container, so both placeholders name the mount (docs/legacy.md).
                values["sandbox_host"] = values["sandbox_fem"] = m.mount
            elif kind == "data":
                name = DATA_PREFIX if not rest else f"{DATA_PREFIX}-{i}"
                datasets[name] = os.path.join(config.legacy.data_path or "", rest).rstrip("/")
                task["datasets"].append({"name": name, "mount": m.mount})
                if not rest:
                    values["data_path"] = m.mount
            else:
                name = f"{MOUNT_PREFIX}-{i}"
                datasets[name] = m.source
                task["datasets"].append({"name": name, "mount": m.mount})
        if tool.command is not None:
            task["command"] = fill_argv(tool.command, values, info, msg, node_name,
                                        tool.params)
        if tool.workdir:
            task["workdir"] = tool.workdir
        env, secret_env = {}, {}
        for key, value in tool.env.items():
            if value == TOKEN:
                if not msg.token:
                    raise RejectedError(f"env {key}: the message has no token")
                secret_env[key] = msg.token
            else:
                env[key] = fill_word(value, values, info)
        task["env"] = env
        resources = {k: getattr(tool, k) for k in ("cpus", "memory", "gpus", "timeout_s")
                     if getattr(tool, k) is not None}
        if resources:
            task["resources"] = resources
    except RejectedError as e:
        e.task_id = tid
        raise
    return Launch(task, datasets, outputs_into, secret_env)


def fill_word(word: str, values: Mapping[str, str], info: Mapping[str, Any]) -> str:
    """``%%name%%`` in ``word`` filled from ``values``, else from a scalar ``task_info``
    entry; any other placeholder is refused, never passed through."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in values:
            return values[name]
        if name not in PLACEHOLDERS and isinstance(info.get(name), str | int | float):
            value = info[name]
            return str(value).lower() if isinstance(value, bool) else str(value)
        raise PolicyViolation("legacy.tools", f"placeholder {match.group(0)} has no value "
                              "for this message")

    return PLACEHOLDER.sub(fill, word)


def fill_argv(template: list[str], values: Mapping[str, str], info: Mapping[str, Any],
              msg: LegacyMessage, node_name: str, params: Sequence[str] = ()) -> list[str]:
    """The argv of a template: each word filled as data; a word that is exactly
    ``%%TASK_COMMAND%%`` becomes the words of ``task_info.command`` (a string is split like
    a POSIX word list, a ``{base, args}`` dict is built as docs/legacy.md says)."""
    argv: list[str] = []
    for word in template:
        if word == f"%%{TASK_COMMAND}%%":
            argv.extend(task_command(info, msg, values, node_name, params))
        elif f"%%{TASK_COMMAND}%%" in word:
            command = info.get("command")
            if not isinstance(command, str):
                raise RejectedError("task_info/command: a string is needed inside a word")
            argv.append(fill_word(word, {**values, TASK_COMMAND: command}, info))
        else:
            argv.append(fill_word(word, values, info))
    return argv


def task_command(info: Mapping[str, Any], msg: LegacyMessage, values: Mapping[str, str],
                 node_name: str, params: Sequence[str] = ()) -> list[str]:
    """``task_info.command`` as argv words, its placeholders filled in each word."""
    command = info.get("command")
    if isinstance(command, str):
        return [fill_word(w, values, info) for w in split_words(command, "task_info/command")]
    argv = build_argv(command, user_params(msg.parametric_args, node_name, params), values)
    if argv is None:
        raise RejectedError("task_info/command: the tool's template needs a command")
    return argv
