"""The original FEM-client protocol (DESIGN.md §9), served on top of the same pipeline.

Sites that run the original FEM-client against the existing FEM-orchestrator can swap in
fem-ansible with ``legacy.enabled: true``: the listener then also consumes the node's legacy
queue, reads its 9-field pipe-delimited messages, and answers each on its ``reply_to`` with
the chunked reply the orchestrator reassembles.  Only reception and reply are legacy: a
``submit_run`` is mapped onto a ``fem.task/v1`` task and goes through the same schema,
policy, journal, playbook and roles as any other task (docs/legacy.md has the mapping).

Everything in a message is data.  ``task_info`` and ``parametric_args`` are read with
``ast.literal_eval`` (never ``eval``), ``execution`` as JSON; no field ever reaches a shell,
a host path or a template: host paths come from the site config, the command is an argv.
The ``token`` field is never stored, logged or used.
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from . import __version__, schema
from .config import Config
from .errors import ConfigError, PolicyViolation, RejectedError
from .schema import now_rfc3339

if TYPE_CHECKING:
    from .intake import Task
    from .listener import Listener

log = logging.getLogger(__name__)

FIELDS = ("action", "tool_id", "task_info", "execution", "parametric_args", "user_id",
          "public_ip", "json_action", "token")
SUBMIT = "submit_run"
HEALTH = ("health-check", "pre_checks")
ACTIONS = (SUBMIT, *HEALTH, "send_files", "receive_files", "cancel_run")
TASK_PREFIX = "legacy-"
# execution_id must make a valid task id (DESIGN.md §3) once prefixed: ids that do not are
# refused rather than rewritten, because the same id also names the run's sandbox dir.
EXECUTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,120}$"
# user_id names a directory: no separators, no leading dot; e-mail-like names are fine.
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$"
SANDBOX_VOLUME = "$SANDBOX_PATH/%%user_id%%/%%execution_id%%"
DATA_VOLUME = "$DATA_PATH"
# Datasets the listener resolves for a legacy run (policy.decide's run_datasets).
DATA_DATASET = "legacy-data"
INPUT_DATASET = "legacy-input"
# Where the files pushed by receive_files are mounted, read-only, in every legacy task.
RECEIVED_MOUNT = "/fem/received"
SOURCE_MOUNT = "/fem/src"
MAX_LITERAL_DEPTH = 16
_SITE_VAR = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_PLACEHOLDER = re.compile(r"%%([A-Za-z0-9_]+)%%")
_DIGEST = re.compile(r"^(sha256:)?([a-f0-9]{64})$")
_STATUS = {"COMPLETED": "success", "FAILED": "failed", "TIMED_OUT": "timeout",
           "CANCELLED": "cancelled", "REJECTED": "error"}


# -- reading a message -------------------------------------------------------------------

@dataclass(frozen=True)
class LegacyMessage:
    """The 9 fields, parsed.  ``token`` is deliberately not kept."""

    action: str
    tool_id: str
    task_info: dict[str, Any] | None
    execution: dict[str, Any] | None
    parametric_args: dict[str, Any]
    user_id: str | None
    public_ip: str | None
    json_action: str

    @property
    def execution_id(self) -> str | None:
        value = (self.execution or {}).get("execution_id")
        return value if isinstance(value, str) else None

    @property
    def task_id(self) -> str | None:
        eid = self.execution_id
        return TASK_PREFIX + eid if eid and re.match(EXECUTION_ID_PATTERN, eid) else None


def _none(text: str) -> bool:
    return text.strip() in ("", "None", "null")


def _check_data(value: Any, where: str, depth: int = 0) -> Any:
    """Plain data only (what JSON could say), tuples as lists, bounded nesting."""
    if depth > MAX_LITERAL_DEPTH:
        raise RejectedError(f"{where}: nested deeper than {MAX_LITERAL_DEPTH} levels")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_check_data(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise RejectedError(f"{where}: keys must be strings")
        return {k: _check_data(v, where, depth + 1) for k, v in value.items()}
    raise RejectedError(f"{where}: {type(value).__name__} values are not allowed")


def literal_dict(text: str, where: str) -> dict[str, Any] | None:
    """A Python-literal dict (``ast.literal_eval``: constants and containers, no names, no
    calls), or None for an empty/``None`` field."""
    if _none(text):
        return None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise RejectedError(f"{where}: not a Python literal ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise RejectedError(f"{where}: expected a dict, got {type(value).__name__}")
    return _check_data(value, where)


def parse_message(body: bytes, max_bytes: int) -> LegacyMessage:
    """Split and parse a legacy body; each field as data only.

    :raises RejectedError: ``invalid_message`` naming the field.
    """
    parts = schema.decode_body(body, max_bytes).split("|")
    if len(parts) != len(FIELDS):
        raise RejectedError(f"expected {len(FIELDS)} '|'-separated fields, got {len(parts)}")
    f = dict(zip(FIELDS, parts, strict=True))
    action = f["action"].strip()
    if action not in ACTIONS:
        raise RejectedError(f"action: unknown action {action[:64]!r}")
    execution = None
    if not _none(f["execution"]):
        try:
            execution = schema.parse_json(f["execution"].encode(), max_bytes)
        except RejectedError as e:
            raise RejectedError(f"execution: {e.message}") from None
        if not isinstance(execution, dict):
            raise RejectedError("execution: expected a JSON object")
    return LegacyMessage(
        action=action,
        tool_id=f["tool_id"].strip(),
        task_info=literal_dict(f["task_info"], "task_info"),
        execution=execution,
        parametric_args=literal_dict(f["parametric_args"], "parametric_args") or {},
        user_id=None if _none(f["user_id"]) else f["user_id"].strip(),
        public_ip=None if _none(f["public_ip"]) else f["public_ip"].strip(),
        json_action=f["json_action"].strip(),
    )


def run_ids(msg: LegacyMessage, *, user: bool = True) -> tuple[str, str | None]:
    """``(execution_id, user_id)``, checked as safe path components."""
    eid = msg.execution_id
    if eid is None:
        raise RejectedError("execution: execution_id is missing or not a string")
    if not re.match(EXECUTION_ID_PATTERN, eid):
        raise RejectedError(f"execution: execution_id {eid[:64]!r} does not match "
                            f"{EXECUTION_ID_PATTERN}")
    if not user:
        return eid, msg.user_id
    if msg.user_id is None or not re.match(USER_ID_PATTERN, msg.user_id):
        raise RejectedError(f"user_id: {str(msg.user_id)[:64]!r} does not match "
                            f"{USER_ID_PATTERN}", task_id=TASK_PREFIX + eid)
    return eid, msg.user_id


# -- mapping a task definition onto fem.task/v1 ----------------------------------------------

def image_ref(image: Any) -> str:
    """``<repository>/<name>@<hash>`` when ``hash`` is a real sha256 digest, else
    ``<repository>/<name>:<tag>`` (tag default ``latest``; no ``repository/`` when empty)."""
    if not isinstance(image, dict) or not isinstance(image.get("name"), str) or \
            not image["name"].strip():
        raise RejectedError("task_info/image: a dict with a name is required")
    repo = str(image.get("repository") or "").strip().rstrip("/")
    name = image["name"].strip()
    base = f"{repo}/{name}" if repo else name
    digest = _DIGEST.match(str(image.get("hash") or "").strip())
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
        m = _SITE_VAR.match(text)
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


def _source(source_code: Any) -> dict[str, str] | None:
    url = source_code.get("url") if isinstance(source_code, dict) else source_code
    if url in (None, ""):
        return None
    if not isinstance(url, str):
        raise RejectedError("task_info/source_code/url: expected a string")
    try:
        words = shlex.split(url)
    except ValueError as e:
        raise RejectedError(f"task_info/source_code/url: {e}") from None
    if not words:
        return None
    if len(words) == 1:
        return {"repo": words[0], "mount": SOURCE_MOUNT}
    if len(words) == 3 and words[1] in ("--branch", "-b"):
        return {"repo": words[0], "version": words[2], "mount": SOURCE_MOUNT}
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
    try:
        argv = shlex.split(base)
    except ValueError as e:
        raise RejectedError(f"task_info/command/base: {e}") from None

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in placeholders:
            raise RejectedError(f"task_info/command/base: unknown placeholder {match.group(0)}")
        return placeholders[match.group(1)]

    argv = [_PLACEHOLDER.sub(fill, word) for word in argv]
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


def user_params(params: Mapping[str, Any], node_name: str) -> dict[str, Any]:
    """The user's parameters for this node: the top level, overlaid by the dict under this
    node's name when the orchestrator keyed them per node."""
    out = {k: v for k, v in params.items() if not isinstance(v, dict)}
    own = params.get(node_name)
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


# -- the reply ---------------------------------------------------------------------------

def reply_messages(result: Any, chunk_size: int) -> list[dict[str, Any]]:
    """``chunk_start`` (number of chunks, sha256 of the raw bytes), then the base64 chunks."""
    raw = json.dumps(result).encode()
    chunks = [raw[i:i + chunk_size] for i in range(0, len(raw), chunk_size)] or [b""]
    out: list[dict[str, Any]] = [{"type": "chunk_start", "total": len(chunks),
                                  "checksum": hashlib.sha256(raw).hexdigest()}]
    out.extend({"type": "chunk", "index": i, "data": base64.b64encode(c).decode()}
               for i, c in enumerate(chunks))
    return out


def action_of(body: bytes) -> str | None:
    """The action of a body that could not be parsed, when it names a known one."""
    head = body.split(b"|", 1)[0].decode("utf-8", errors="replace").strip()
    return head if head in ACTIONS else None


def error_result(msg: LegacyMessage | None, node: str, err: RejectedError,
                 action: str | None = None) -> dict[str, Any]:
    """The answer to a message that was refused: nothing ran.  A ``submit_run`` (even one
    whose other fields could not be read) gets a process-info record; other actions
    ``{action, node, execution_id, status: "error", error}``."""
    error = {"code": err.code, "message": err.message}
    action = msg.action if msg else action
    if action == SUBMIT:
        now = now_rfc3339()
        info = msg.task_info if msg and isinstance(msg.task_info, dict) else {}
        return {"execution_id": msg.execution_id if msg else None, "action": SUBMIT,
                "tool_id": msg.tool_id if msg else None, "task_id": info.get("_id"),
                "user_id": msg.user_id if msg else None, "node": node,
                "result": {"error": error}, "status": "error", "return_code": None,
                "starting_time": now, "finish_time": now}
    return {"action": action, "node": node,
            "execution_id": msg.execution_id if msg else None, "status": "error",
            "error": error}


# -- files on the listener's host -----------------------------------------------------------

def safe_relative(path: Any, where: str) -> str:
    """A normalised relative path with no ``..``, no empty or dot-leading... components."""
    if not isinstance(path, str) or not path or len(path) > 1024 or "\x00" in path:
        raise RejectedError(f"{where}: a relative path is required")
    norm = posixpath.normpath(path)
    if norm != path.removeprefix("./") or path.startswith("/") or norm in (".", "..") or \
            norm.startswith("../") or "\\" in path:
        raise RejectedError(f"{where}: {path[:200]!r} is not a normalised relative path")
    return norm


def extract_outputs(archive: Path, dest: Path) -> list[str]:
    """Unpack the outputs archive into ``dest`` (replaced): regular files and directories
    only, names relative without ``..``; links and devices are skipped.  Returns the files."""
    tmp = Path(tempfile.mkdtemp(prefix=".output-", dir=dest.parent))
    files = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in ("", "."):
                    continue
                try:
                    rel = safe_relative(name.rstrip("/"), "archive member")
                except RejectedError:
                    log.warning("outputs archive: skipped member %r", member.name[:200])
                    continue
                target = tmp / rel
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True, mode=0o755)
                elif member.isreg():
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                    src = tar.extractfile(member)
                    assert src is not None
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o644)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out)
                    files.append(rel)
                else:
                    log.warning("outputs archive: skipped %s (not a file or directory)", rel)
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(files)


def read_member(archive: Path, name: str, limit: int) -> bytes | None:
    """One file of a (logs) archive, at most ``limit`` bytes; None when absent."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isreg() and member.name.removeprefix("./") == name:
                    src = tar.extractfile(member)
                    return src.read(limit) if src else None
    except (OSError, tarfile.TarError):
        return None
    return None


def list_files(root: Path) -> list[str]:
    """Regular files under ``root`` (never following links), relative, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out.append(str(path.relative_to(root)))
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return sorted(out)


def _file_entry(root: Path, rel: str, with_data: bool) -> dict[str, Any]:
    path = root / rel
    real = Path(os.path.realpath(path))
    if real != Path(os.path.realpath(root)) / rel or path.is_symlink() or not path.is_file():
        raise RejectedError(f"files: {rel!r} is not a file of the run")
    data = path.read_bytes()
    entry: dict[str, Any] = {"path": rel, "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
    if with_data:
        entry["data"] = base64.b64encode(data).decode()
    return entry


# -- the service -------------------------------------------------------------------------

class LegacyConsumer:
    """The legacy queue of a :class:`~fem_ansible.listener.Listener`.

    Everything broker-side runs on the listener's connection thread: reading a message,
    journaling a ``submit_run``, publishing replies, acking.  The ``submit_run`` task then
    runs in the listener's worker pool like any task; when it ends, :meth:`finished` (on
    the worker) unpacks its outputs into the sandbox and stores the reply, which the
    connection thread sends.  Other actions are answered from one helper thread (they read
    files and ask the engine), which hands the reply and the ack back to the connection.
    """

    def __init__(self, listener: Listener):
        self.listener = listener
        self.config: Config = listener.config
        legacy = self.config.legacy
        if not legacy.sandbox_path or not os.path.isabs(legacy.sandbox_path):
            raise ConfigError("legacy.sandbox_path: an absolute path is required when "
                              "legacy.enabled is true")
        if legacy.data_path is not None and not os.path.isabs(legacy.data_path):
            raise ConfigError("legacy.data_path: must be an absolute path")
        if legacy.chunk_size < 1:
            raise ConfigError("legacy.chunk_size: must be at least 1")
        self.node = listener.node
        self.journal = listener.journal
        self.queue = legacy.queue or self.config.node_id
        self.sandbox_root = Path(legacy.sandbox_path)
        self.records_dir = self.config.work_dir / "legacy"
        self.records_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.node.run_datasets = self.run_datasets
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="fem-legacy")
        self._lock = threading.Lock()
        self._ch: Any = None

    # Records: what the reply needs, beside the journal (never the token) ------------------

    def _record_path(self, task_id: str) -> Path:
        return self.records_dir / f"{task_id}.json"

    def load(self, task_id: str) -> dict[str, Any] | None:
        if not task_id.startswith(TASK_PREFIX):
            return None
        try:
            return json.loads(self._record_path(task_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _save(self, record: dict[str, Any]) -> None:
        path = self._record_path(record["task_id"])
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def sandbox(self, user_id: str, execution_id: str) -> Path:
        return self.sandbox_root / user_id / execution_id

    def datasets_for(self, user_id: str, execution_id: str) -> dict[str, str]:
        out = {INPUT_DATASET: str(self.sandbox(user_id, execution_id) / "input")}
        if self.config.legacy.data_path:
            out[DATA_DATASET] = self.config.legacy.data_path
        return out

    def run_datasets(self, task: dict[str, Any]) -> dict[str, str]:
        """Node.run_datasets: a legacy run's datasets, from its record (so recovery after a
        restart resolves them the same way)."""
        rec = self.load(task["task_id"])
        return self.datasets_for(rec["user_id"], rec["execution_id"]) if rec else {}

    # The connection ----------------------------------------------------------------------

    def attach(self, conn: pika.BlockingConnection) -> None:
        """Check the queue (declare it, as the original client does, only when missing and
        ``broker.declare`` is true), consume it, and send the replies still pending."""
        probe = conn.channel()
        try:
            probe.queue_declare(self.queue, passive=True)
            probe.close()
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 404 or not self.config.broker.declare:
                log.error("legacy queue %r cannot be used (%s); the legacy protocol is not "
                          "served on this connection", self.queue, e.reply_text)
                return
            conn.channel().queue_declare(self.queue)
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(self.queue, self._on_message)
        self._ch = ch
        log.info("serving the legacy protocol on queue %s", self.queue)
        self.flush()

    def detach(self) -> None:
        self._ch = None

    def close(self) -> None:
        self.helper.shutdown(wait=False, cancel_futures=True)

    def _send(self, ch: Any, reply_to: str, correlation_id: str | None, result: Any) -> None:
        props = pika.BasicProperties(correlation_id=correlation_id,
                                     content_type="application/json")
        for part in reply_messages(result, self.config.legacy.chunk_size):
            ch.basic_publish("", reply_to, json.dumps(part).encode(), props)

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        msg: LegacyMessage | None = None
        self.node.audit.record("received", None, protocol="legacy", bytes=len(body))
        try:
            msg = parse_message(body, self.config.security.max_message_bytes)
            if msg.action == SUBMIT:
                self._submit(ch, method, props, msg)
                return
        except RejectedError as e:
            self._refuse(ch, method, props, msg, e, action_of(body))
            return
        except (pika.exceptions.AMQPError, ConnectionError):
            raise
        except Exception as e:  # an answer is owed, and the consumer must go on
            log.exception("legacy message failed")
            self._refuse(ch, method, props, msg,
                         RejectedError(f"internal error: {type(e).__name__}",
                                       task_id=msg.task_id if msg else None), action_of(body))
            return
        self.helper.submit(self._answer, ch, method.delivery_tag, props, msg)

    def _refuse(self, ch: Any, method: Any, props: Any, msg: LegacyMessage | None,
                err: RejectedError, action: str | None = None) -> None:
        action = msg.action if msg else action
        log.warning("legacy %s refused (%s): %s", action or "message", err.code,
                    err.message, extra={"task_id": err.task_id})
        self.node.audit.record("rejected", err.task_id, protocol="legacy", code=err.code,
                               rule=getattr(err, "rule", None), reason=err.message)
        if action == SUBMIT:
            self.node.reject(err)
            self.listener._publish_pending()
        self._reply(ch, props, error_result(msg, self.config.node_id, err, action))
        ch.basic_ack(method.delivery_tag)

    def _reply(self, ch: Any, props: Any, result: Any) -> None:
        if props.reply_to:
            self._send(ch, props.reply_to, props.correlation_id, result)
        else:
            log.warning("legacy message without reply_to: answer dropped")

    # submit_run --------------------------------------------------------------------------

    def read_submit(self, msg: LegacyMessage) -> Task:
        """The accepted task of a ``submit_run``: its translation through the node's intake
        (schema, addressing, policy, target, executor), like any task's."""
        task = to_task(msg, self.queue, self.config.legacy.site_vars)
        eid, user = run_ids(msg)
        assert user is not None
        if any(d.get("name") == DATA_DATASET for d in task.get("datasets", [])) and \
                not self.config.legacy.data_path:
            raise PolicyViolation("legacy.data_path", "$DATA_PATH is not set on this site",
                                  task_id=task["task_id"])
        return self.node.intake.read_value(task, run_datasets=self.datasets_for(user, eid))

    def _submit(self, ch: Any, method: Any, props: Any, msg: LegacyMessage) -> None:
        accepted = self.read_submit(msg)
        task, tid = accepted.to_dict(), accepted.task_id
        eid, user = run_ids(msg)
        self.node.audit.record("accepted", tid, protocol="legacy", tool_id=msg.tool_id,
                               image=task["image"]["ref"], command=task["command"],
                               source=task["source"]["repo"] if task["source"] else None,
                               resources=task["resources"],
                               datasets=[d["name"] for d in task["datasets"]])
        with self._lock:
            rec = self.load(tid)
            if rec is None:
                (self.sandbox(user, eid) / "input").mkdir(parents=True, exist_ok=True,
                                                         mode=0o755)
                info = msg.task_info or {}
                rec = {"task_id": tid, "execution_id": eid, "user_id": user,
                       "tool_id": msg.tool_id, "task": info.get("_id"),
                       "starting_time": now_rfc3339(), "reply": None, "replied": False}
            rec.update(reply_to=props.reply_to, correlation_id=props.correlation_id)
            if rec["reply"] is not None:
                rec["replied"] = False  # asked again: answered again
            self._save(rec)
        _event, existing = self.node.accept(accepted)
        if existing is not None:
            self.listener._publish_pending()
            if existing.terminal:
                if rec["reply"] is None:
                    err = RejectedError(f"task {tid} already ran here", task_id=tid)
                    self._reply(ch, props, error_result(msg, self.config.node_id, err))
                self.flush()
            ch.basic_ack(method.delivery_tag)
            return
        self.listener.launch(tid)
        ch.basic_ack(method.delivery_tag)

    def finished(self, task_id: str, event: dict[str, Any]) -> None:
        """On the worker, once a task ended: a legacy run's outputs go into its sandbox and
        its process-info reply is stored, then sent from the connection thread."""
        with self._lock:
            rec = self.load(task_id)
        if rec is None or not event:
            return
        jrec = self.journal.get(task_id)
        result_paths = jrec.result if jrec else {}
        sandbox = self.sandbox(rec["user_id"], rec["execution_id"])
        outputs = (result_paths.get("outputs_archive") or {}).get("path")
        if outputs and Path(outputs).is_file():
            try:
                extract_outputs(Path(outputs), sandbox / "output")
            except (OSError, tarfile.TarError) as e:
                log.error("%s: unpacking the outputs into the sandbox failed: %s", task_id, e,
                          extra={"task_id": task_id})
        logs = (result_paths.get("logs_archive") or {}).get("path")
        info = {
            "execution_id": rec["execution_id"], "action": SUBMIT, "tool_id": rec["tool_id"],
            "task_id": rec["task"], "user_id": rec["user_id"], "node": self.config.node_id,
            "result": self._result(event, Path(logs) if logs else None),
            "status": _STATUS.get(event["state"], "error"),
            "return_code": event.get("exit_code"),
            "starting_time": rec["starting_time"], "finish_time": event["ts"],
        }
        with self._lock:
            rec = self.load(task_id) or rec
            rec.update(reply=info, replied=False)
            self._save(rec)
        self.prune()
        self.listener._call_on_connection(self.flush)

    def _result(self, event: dict[str, Any], logs: Path | None) -> Any:
        """The tool's stdout as JSON (the original's contract), else its text; an error of
        the pipeline when the tool did not run to an exit code."""
        if event.get("exit_code") is None and event.get("error"):
            return {"error": event["error"]}
        limit = self.config.policy.limits.log_bytes + 1024
        out = read_member(logs, "stdout.log", limit) if logs else None
        text = (out or b"").decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            err = read_member(logs, "stderr.log", limit) if logs else None
            return {"stdout": text, "stderr": (err or b"").decode("utf-8", errors="replace")}

    def flush(self) -> None:
        """On the connection thread: send every stored reply not sent yet."""
        ch = self._ch
        if ch is None or not ch.is_open:
            return
        for path in sorted(self.records_dir.glob(f"{TASK_PREFIX}*.json")):
            with self._lock:
                rec = self.load(path.stem)
                if rec is None or rec["reply"] is None or rec["replied"]:
                    continue
                if rec.get("reply_to"):
                    self._send(ch, rec["reply_to"], rec.get("correlation_id"), rec["reply"])
                rec["replied"] = True
                self._save(rec)

    def prune(self) -> None:
        """Sandboxes are kept as long as their run dir: ``execution.keep_runs``."""
        for tid in self.journal.finished_beyond(self.config.execution.keep_runs):
            with self._lock:
                rec = self.load(tid)
                if rec is None:
                    continue
                sandbox = self.sandbox(rec["user_id"], rec["execution_id"])
                shutil.rmtree(sandbox, ignore_errors=True)
                with contextlib.suppress(OSError):
                    sandbox.parent.rmdir()  # only when empty
                self._record_path(tid).unlink(missing_ok=True)

    # The other actions (helper thread) ----------------------------------------------------

    def _answer(self, ch: Any, delivery_tag: int, props: Any, msg: LegacyMessage) -> None:
        try:
            if msg.action in HEALTH:
                result = self.health(msg.action)
            elif msg.action == "send_files":
                result = self.send_files(msg)
            elif msg.action == "receive_files":
                result = self.receive_files(msg)
            else:
                result = self.cancel_run(msg)
            self.node.audit.record(msg.action, msg.task_id, protocol="legacy",
                                   status=result.get("status"))
        except RejectedError as e:
            self.node.audit.record("rejected", e.task_id or msg.task_id, protocol="legacy",
                                   action=msg.action, code=e.code, reason=e.message)
            result = error_result(msg, self.config.node_id, e)
        except Exception as e:  # an answer is owed whatever broke
            log.exception("legacy %s failed", msg.action)
            result = error_result(msg, self.config.node_id,
                                  RejectedError(f"internal error: {type(e).__name__}"))

        def deliver() -> None:
            if ch.is_open:
                self._reply(ch, props, result)
                ch.basic_ack(delivery_tag)

        self.listener._call_on_connection(deliver)

    def _base(self, msg: LegacyMessage, **fields: Any) -> dict[str, Any]:
        return {"action": msg.action, "node": self.config.node_id, "status": "success",
                **fields}

    def send_files(self, msg: LegacyMessage) -> dict[str, Any]:
        """The run's output files (all, or the relative paths in ``parametric_args.files``),
        base64 with size and sha256."""
        eid, user = run_ids(msg)
        assert user is not None
        root = self.sandbox(user, eid) / "output"
        if not root.is_dir():
            raise RejectedError(f"no outputs of execution {eid} for user {user} here",
                                task_id=TASK_PREFIX + eid)
        wanted = msg.parametric_args.get("files")
        if wanted is None:
            names = list_files(root)
        elif isinstance(wanted, list):
            names = [safe_relative(p, "parametric_args/files") for p in wanted]
        else:
            raise RejectedError("parametric_args/files: expected a list of paths")
        files = [_file_entry(root, name, with_data=True) for name in names]
        return self._base(msg, execution_id=eid, user_id=user, files=files)

    def receive_files(self, msg: LegacyMessage) -> dict[str, Any]:
        """Files pushed into the run's input side (``parametric_args.files``: a list of
        ``{path, data (base64), sha256?}``), which the task sees read-only at
        ``/fem/received``."""
        eid, user = run_ids(msg)
        assert user is not None
        files = msg.parametric_args.get("files")
        if not isinstance(files, list) or not files:
            raise RejectedError("parametric_args/files: a non-empty list is required")
        decoded = []
        for i, item in enumerate(files):
            where = f"parametric_args/files/{i}"
            if not isinstance(item, dict) or not isinstance(item.get("data"), str):
                raise RejectedError(f"{where}: {{path, data}} is required")
            rel = safe_relative(item.get("path"), f"{where}/path")
            try:
                data = base64.b64decode(item["data"], validate=True)
            except (binascii.Error, ValueError):
                raise RejectedError(f"{where}/data: not base64") from None
            digest = hashlib.sha256(data).hexdigest()
            if item.get("sha256") not in (None, digest):
                raise RejectedError(f"{where}/sha256: does not match the data")
            decoded.append((rel, data, digest))
        root = self.sandbox(user, eid) / "input"
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        written = []
        for rel, data, digest in decoded:
            _write_under(root, rel, data)
            written.append({"path": rel, "size": len(data), "sha256": digest})
        return self._base(msg, execution_id=eid, user_id=user, files=written)

    def cancel_run(self, msg: LegacyMessage) -> dict[str, Any]:
        """Cancel ``legacy-<execution_id>``: stopped when running, never started when it
        comes later (DESIGN.md §5's cancel)."""
        eid, _user = run_ids(msg, user=False)
        tid = TASK_PREFIX + eid
        rec = self.journal.get(tid)
        if rec is not None and rec.terminal:
            return self._base(msg, execution_id=eid, task_id=tid, cancel="already_finished",
                              state=rec.state)
        running = self.listener.cancel_task(tid)
        return self._base(msg, execution_id=eid, task_id=tid,
                          cancel="stopping" if running or rec else "recorded",
                          state=rec.state if rec else None)

    def health(self, action: str = "pre_checks") -> dict[str, Any]:
        """What the original's pre_checks reported, as far as it is not the site's secret:
        no listing of the data or sandbox contents."""
        legacy = self.config.legacy
        mem_total = mem_avail = None
        try:
            meminfo = dict(line.split(":", 1) for line in
                           Path("/proc/meminfo").read_text().splitlines() if ":" in line)
            mem_total = int(meminfo["MemTotal"].split()[0]) * 1024
            mem_avail = int(meminfo["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            pass
        return {
            "action": action, "node": self.config.node_id, "status": "success",
            "installation_check": {"fem_ansible_version": __version__,
                                   "docker_version": _command_output(
                                       ["docker", "version", "--format",
                                        "{{.Server.Version}}"])},
            "paths_check": {
                "sandbox_path_exists": self.sandbox_root.is_dir(),
                "sandbox_path_writable": os.access(self.sandbox_root, os.W_OK),
                "data_path_exists": bool(legacy.data_path) and Path(legacy.data_path).is_dir(),
            },
            "resources_check": {
                "CPU Count": os.cpu_count(), "Memory Total": mem_total,
                "Memory Available": mem_avail, "GPU Count": _gpu_count(),
                "running_tasks": len(self.listener.running),
                "max_parallel": self.config.execution.max_parallel,
            },
            "pem_certificates": _certificates(self.config),
        }


def _write_under(root: Path, rel: str, data: bytes) -> None:
    """Write ``root/rel`` without following a link anywhere below ``root``."""
    target = root
    for part in Path(rel).parts[:-1]:
        target = target / part
        if target.is_symlink():
            raise RejectedError(f"files: {rel!r} goes through a link")
        target.mkdir(exist_ok=True, mode=0o755)
    target = target / Path(rel).name
    if target.is_symlink() or target.is_dir():
        raise RejectedError(f"files: {rel!r} is not a plain file path")
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, target)


def _command_output(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _gpu_count() -> int:
    out = _command_output(["nvidia-smi", "-L"])
    return len(out.splitlines()) if out else 0


def _certificates(config: Config) -> dict[str, Any]:
    """Expiry of the broker TLS certificates (the original reported its PEM files)."""
    from datetime import UTC, datetime

    from cryptography import x509

    out: dict[str, Any] = {}
    tls = config.broker.tls
    for path in (tls.ca_file, tls.cert_file):
        if not path:
            continue
        try:
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError) as e:
            out[Path(path).name] = {"expiry_date": None, "status": f"unreadable: {e}"[:200]}
            continue
        expiry = cert.not_valid_after_utc
        out[Path(path).name] = {"expiry_date": expiry.isoformat(),
                                "status": "valid" if expiry > datetime.now(UTC) else "expired"}
    return out


