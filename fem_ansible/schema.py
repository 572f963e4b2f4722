"""The message schemas (DESIGN.md §3, §4, §5) and the reading of a task message.

The JSON Schemas here are the documents the validator really uses; ``fem-ansible schema``
prints them and ``schemas/`` holds a copy for orchestrator authors.  What JSON Schema cannot
say (container paths disjoint, sizes with suffixes, an RFC 3339 time) is checked in
:func:`read_task`, which also brings the task to its normal form with the site's defaults.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import posixpath
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jsonschema
import jsonschema.validators

from .errors import RejectedError
from .refs import parse_image, redact_url, split_url
from .sizes import parse_bytes

TASK_SCHEMA_ID = "fem.task/v1"
EVENT_SCHEMA_ID = "fem.event/v1"
NODE_SCHEMA_ID = "fem.node/v1"
CONTROL_SCHEMA_ID = "fem.control/v1"

# Patterns are ECMA-262 regexes, as JSON Schema says and as orchestrators' validators read
# them: there ``$`` ends the string.  Python's ``$`` also matches before a final newline, so
# this module's validator reads ``$`` as ``\Z`` (:func:`_pattern`) and Python-side checks
# use ``fullmatch``: a trailing newline passes nowhere.
TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# A container path: no control characters (a newline ends a CSV record of ``--mount``), no
# ``,`` ``=`` ``"`` (its field and quote syntax), no backslash.
CONTAINER_PATH_PATTERN = r'^/[^\x00-\x1F\x7F-\x9F,="\\]*$'
MAX_DEPTH = 16
# Schema errors a rejection lists.  Every error would be unbounded: a 1 MiB body of
# ``"command": [1, 1, …]`` has 300 000, which took seconds to find on the connection thread
# and made a REJECTED event, journal row, audit and log line of megabytes.
MAX_SCHEMA_ERRORS = 20
# The least of each resource a task gets (issue 18): below these an engine reads the value
# as "no limit" (0 CPUs, 0 bytes) or the container cannot start; ceilings are the policy's.
RESOURCE_FLOORS: dict[str, int | float] = {"cpus": 0.01, "memory": 4 * 1024**2, "pids": 16}
# Request headers a task may not set: they are the HTTP client's framing and routing, and
# a task that sets them smuggles requests or reaches another virtual host (RFC 9110 §7.6.1).
FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                               "te", "upgrade", "expect", "trailer", "keep-alive"})
FORBIDDEN_HEADER_PREFIXES = ("proxy-",)

_STR = {"type": "string", "maxLength": 4096}
_PATH = {"type": "string", "pattern": CONTAINER_PATH_PATTERN, "maxLength": 1024}
_HEADERS = {
    "type": "object",
    "description": "Host, Content-Length, Transfer-Encoding, Connection, TE, Upgrade, Expect, "
                   "Trailer, Keep-Alive and Proxy-* are refused (any case).",
    "maxProperties": 32,
    "propertyNames": {"pattern": r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"},
    # A field value (RFC 9110 §5.5): visible ASCII, space, HTAB and obs-text, no control
    # character; nothing past U+00FF, which no HTTP client can send (http.client encodes
    # Latin-1: a Euro sign failed the upload outside its error handling, review of issue 26).
    "additionalProperties": {"type": "string", "maxLength": 8192,
                             "pattern": r"^[\t\x20-\x7E\x80-\xFF]*$"},
}
_UPLOAD = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "maxLength": 8192},
        "method": {"enum": ["PUT", "POST"]},
        "headers": _HEADERS,
    },
}
_MOUNT_LIST = {
    "type": "array",
    "maxItems": 32,
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "mount"],
        "properties": {"name": {"type": "string", "pattern": NAME_PATTERN}, "mount": _PATH},
    },
}

TASK_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": TASK_SCHEMA_ID,
    "title": "fem-ansible task message",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema", "task_id", "image"],
    "properties": {
        "schema": {"const": TASK_SCHEMA_ID},
        "task_id": {"type": "string", "pattern": TASK_ID_PATTERN},
        "node_id": {"type": "string", "pattern": NODE_ID_PATTERN},
        "experiment_id": {"type": "string", "pattern": TASK_ID_PATTERN},
        "not_after": {"type": "string", "maxLength": 64},
        "executor": {"type": "string", "pattern": r"^[a-z][a-z0-9_]{0,31}$"},
        "image": {
            "type": "object",
            "additionalProperties": False,
            "required": ["ref"],
            "properties": {
                "ref": {"type": "string", "maxLength": 512},
                "pull_policy": {"enum": ["missing", "always", "never"]},
            },
        },
        "source": {
            "type": "object",
            "additionalProperties": False,
            "required": ["repo"],
            "properties": {
                "repo": {"type": "string", "maxLength": 2048},
                "version": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}$"},
                "mount": _PATH,
            },
        },
        "command": {"type": "array", "maxItems": 1024, "items": _STR},
        "workdir": _PATH,
        "env": {
            "type": "object",
            "maxProperties": 256,
            "propertyNames": {"pattern": r"^[A-Z_][A-Z0-9_]*$", "maxLength": 128},
            "additionalProperties": {"type": "string", "maxLength": 65536},
        },
        "inputs": {
            "type": "array",
            "maxItems": 256,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["url", "path"],
                "properties": {
                    "url": {"type": "string", "maxLength": 8192},
                    "path": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}$"},
                    "sha256": {"type": "string", "pattern": r"^[a-f0-9]{64}$"},
                    "headers": _HEADERS,
                },
            },
        },
        "datasets": _MOUNT_LIST,
        "scratch": _MOUNT_LIST,
        "outputs": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"path": _PATH, "upload": _UPLOAD},
        },
        "logs": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"upload": _UPLOAD},
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cpus": {"type": "number", "minimum": RESOURCE_FLOORS["cpus"], "maximum": 1024},
                "memory": {
                    "oneOf": [
                        {"type": "integer", "minimum": RESOURCE_FLOORS["memory"]},
                        {"type": "string", "maxLength": 64,
                         "pattern": r"^[0-9]+(\.[0-9]+)?[kKmMgGtT]?i?[bB]?$"},
                    ]
                },
                "gpus": {"type": "integer", "minimum": 0, "maximum": 64},
                "timeout_s": {"type": "integer", "minimum": 1, "maximum": 31536000},
            },
        },
        "network": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        "target": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,253}$"},
        "labels": {
            "type": "object",
            "maxProperties": 64,
            "propertyNames": {"maxLength": 128},
            "additionalProperties": {"type": "string", "maxLength": 1024},
        },
    },
}

_ARCHIVE = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "required": ["url", "size", "sha256"],
    "properties": {
        "url": {"type": ["string", "null"]},
        "size": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string", "pattern": r"^[a-f0-9]{64}$"},
    },
}
STATES = [
    "RECEIVED",
    "STAGING_IN",
    "RUNNING",
    "STAGING_OUT",
    "COMPLETED",
    "FAILED",
    "TIMED_OUT",
    "CANCELLED",
    "REJECTED",
]
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED", "REJECTED"})
ERROR_CODES = [
    "invalid_message",
    "signature_invalid",
    "expired",
    "wrong_node",
    "policy_violation",
    "image_pull_failed",
    "source_checkout_failed",
    "input_failed",
    "execution_failed",
    "timeout",
    "cancelled",
    "stage_out_failed",
    "interrupted",
    # issue 18: a task stopped for passing a disk limit while it ran (output_bytes); an
    # addition to DESIGN.md §4's codes (docs/decisions.md)
    "limit_exceeded",
    # issue 28: the node's own resources failed under a task (DESIGN.md §4): its file
    # system filled, the engine went away with its container, the kernel killed it for
    # memory
    "disk_full",
    "engine_unavailable",
    "oom_killed",
]

EVENT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": EVENT_SCHEMA_ID,
    "title": "fem-ansible task event",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema", "node_id", "task_id", "state", "attempt", "seq", "ts", "message"],
    "properties": {
        "schema": {"const": EVENT_SCHEMA_ID},
        "node_id": {"type": "string"},
        "task_id": {"type": ["string", "null"]},
        "experiment_id": {"type": ["string", "null"]},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "state": {"enum": STATES},
        "attempt": {"type": "integer", "minimum": 1},
        "seq": {"type": "integer", "minimum": 1},
        "ts": {"type": "string"},
        "message": {"type": "string"},
        "host": {"type": ["string", "null"]},
        "image_digest": {"type": ["string", "null"]},
        "source_commit": {"type": ["string", "null"]},
        "exit_code": {"type": ["integer", "null"]},
        "outputs": _ARCHIVE,
        "logs": _ARCHIVE,
        "error": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "required": ["code", "stage", "message"],
            "properties": {
                "code": {"enum": ERROR_CODES},
                "stage": {"enum": ["intake", "stage_in", "run", "stage_out"]},
                "message": {"type": "string"},
            },
        },
    },
}

NODE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": NODE_SCHEMA_ID,
    "title": "fem-ansible node heartbeat",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema", "node_id", "listener_id", "version", "max_parallel", "running", "accepting", "ts"
    ],
    "properties": {
        "schema": {"const": NODE_SCHEMA_ID},
        "node_id": {"type": "string"},
        "listener_id": {"type": "string"},
        "version": {"type": "string"},
        "max_parallel": {"type": "integer"},
        "running": {"type": "integer"},
        "accepting": {"type": "boolean"},
        "reason": {"type": "string"},
        "ts": {"type": "string"},
    },
}

CONTROL_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": CONTROL_SCHEMA_ID,
    "title": "fem-ansible control message",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema", "action", "task_id"],
    "properties": {
        "schema": {"const": CONTROL_SCHEMA_ID},
        "action": {"enum": ["cancel"]},
        "task_id": {"type": "string", "pattern": TASK_ID_PATTERN},
        "node_id": {"type": "string", "pattern": NODE_ID_PATTERN},
        "not_after": {"type": "string", "maxLength": 64},
        "by": {"enum": ["orchestrator", "site"],
               "description": "Who asks: the orchestrator (the default) or the site "
                              "(`fem-ansible cancel`); the CANCELLED event's message says it."},
    },
}

SCHEMAS = {
    TASK_SCHEMA_ID: TASK_SCHEMA,
    EVENT_SCHEMA_ID: EVENT_SCHEMA,
    NODE_SCHEMA_ID: NODE_SCHEMA,
    CONTROL_SCHEMA_ID: CONTROL_SCHEMA,
}


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    r"""``pattern`` as ECMA-262 reads it: a final ``$`` ends the string (Python's ``\Z``)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any
             ) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                          {"pattern": _pattern})
_VALIDATORS = {k: _Validator(v) for k, v in SCHEMAS.items()}

# Container paths a task may never mount over: the engine's and the hardening's own.
_RESERVED_PATHS = ("/proc", "/sys", "/dev", "/tmp")
# Where a task's inputs are mounted, and its checkout and output dir unless it says.
INPUT_MOUNT = "/fem/input"
SOURCE_MOUNT = "/fem/src"
OUTPUT_PATH = "/fem/output"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _depth(value: Any, limit: int) -> int:
    """Depth of nested containers, stopping early past ``limit``."""
    if not isinstance(value, dict | list):
        return 0
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def check_size(body: bytes, max_bytes: int) -> None:
    """The first check of every message, before anything (a signature's hash included) is
    computed over the body."""
    if len(body) > max_bytes:
        raise RejectedError(f"message of {len(body)} bytes is over the {max_bytes}-byte limit")


def decode_body(body: bytes, max_bytes: int) -> str:
    """A message body as text, refused when over ``max_bytes`` or not UTF-8 (every wire
    format of the node, JSON or the legacy protocol's, starts here)."""
    check_size(body, max_bytes)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RejectedError(f"message is not UTF-8 ({e.reason} at byte {e.start})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of range")
    return value


def parse_json(body: bytes, max_bytes: int) -> Any:
    """Decode a message body cheaply and strictly: size, UTF-8, JSON, no duplicate keys,
    bounded nesting, finite numbers (``NaN``, ``Infinity`` and ``1e400`` pass every bound
    check later, so they never get that far).  Nothing here walks an attacker-sized
    structure more than once."""
    text = decode_body(body, max_bytes)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise RejectedError("message is nested too deeply") from None
    except ValueError as e:
        raise RejectedError(f"message is not valid JSON: {e}") from None
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise RejectedError(f"message is nested deeper than {MAX_DEPTH} levels")
    return value


# jsonschema messages that name keys only, never quote the value they judge.
_KEYS_ONLY = frozenset({"required", "additionalProperties"})


def _holds_secret(path: tuple[Any, ...]) -> bool:
    """A place of a task whose value may hold a secret: request headers and download/upload
    URLs (a presigned query string), and the lists and objects that hold them (an
    over-long ``inputs`` list's message quotes its first items)."""
    return bool(path) and path[0] in ("inputs", "outputs", "logs")


def schema_errors(schema_id: str, value: Any) -> list[str]:
    """Readable schema errors, ``path: problem``, sorted by path.

    A problem becomes the REJECTED event's message, a log line and an audit record, so at a
    place that may hold a secret (:func:`_holds_secret`) it names the rule broken, never the
    value: ``'Bearer <token>\\n' does not match ...`` would publish the token.

    At most :data:`MAX_SCHEMA_ERRORS` are listed (the first found, then sorted), and a last
    line says when there were more: the search stops there.
    """
    errors = []
    found = _VALIDATORS[schema_id].iter_errors(value)
    for err in itertools.islice(found, MAX_SCHEMA_ERRORS):
        path = tuple(err.absolute_path)
        where = "/".join(str(p) for p in path) or "(message)"
        problem = err.message
        if _holds_secret(path) and err.validator not in _KEYS_ONLY:
            problem = (f"fails {err.validator} {err.validator_value!r} (value not shown: it "
                       "may hold a secret)")
        errors.append(f"{where}: {problem[:300]}")
    more = next(found, None) is not None
    return sorted(errors) + ([f"(more schema errors: only the first {MAX_SCHEMA_ERRORS} "
                              "found are listed)"] if more else [])


def task_id_of(value: Any) -> str | None:
    """The message's ``task_id`` when it is a valid one, for the REJECTED event."""
    tid = value.get("task_id") if isinstance(value, dict) else None
    if isinstance(tid, str) and _compiled(TASK_ID_PATTERN).search(tid):
        return tid
    return None


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with an explicit offset, as an aware datetime."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 time: {text!r}") from None
    if when.tzinfo is None:
        raise ValueError(f"time without offset: {text!r}")
    return when


def _container_path(path: str, field: str) -> str:
    norm = posixpath.normpath(path)
    if norm != (path.rstrip("/") or "/") or "//" in path:
        raise ValueError(f"{field}: container path {path!r} is not normalised")
    if norm == "/" or any(norm == r or norm.startswith(r + "/") for r in _RESERVED_PATHS):
        raise ValueError(f"{field}: container path {path!r} is reserved")
    return norm


def _headers(headers: dict[str, str], field: str) -> dict[str, str]:
    """A task's request headers, refused when one is the client's to set
    (:data:`FORBIDDEN_HEADERS`)."""
    for name in headers:
        low = name.lower()
        if low in FORBIDDEN_HEADERS or low.startswith(FORBIDDEN_HEADER_PREFIXES):
            raise ValueError(f"{field}: header {name!r} may not be set by a task")
    return headers


def _source_repo(repo: str) -> str:
    """A task's git URL, refused with a query or fragment.

    git appends its own path and query to a repository URL (``/info/refs?service=…``), so a
    query never works for access; it could only carry a token into ``fem_task`` and the
    audit log.  Credentials for a git host are the site's (``sources``, ``fem_secrets.git``).
    """
    try:
        parts = split_url(repo)
    except ValueError as e:
        raise ValueError(f"source/repo: {e}") from None
    if parts.query or parts.fragment or repo.endswith(("?", "#")):
        raise ValueError("source/repo: a query or fragment is not allowed in a git URL "
                         "(credentials come from the site's sources config)")
    return repo


def _check_disjoint(mounts: dict[str, str]) -> None:
    items = list(mounts.items())
    for i, (f1, p1) in enumerate(items):
        for f2, p2 in items[i + 1 :]:
            if p1 == p2 or p2.startswith(p1 + "/") or p1.startswith(p2 + "/"):
                raise ValueError(f"container paths of {f1} and {f2} overlap ({p1}, {p2})")


def read_task(value: Any, *, default_executor: str, default_target: str,
              resource_defaults: dict[str, Any]) -> dict[str, Any]:
    """Validate a parsed task message and return its normal form.

    The normal form has every optional field present (defaults filled in, sizes in bytes,
    the image reference normalised), so roles never have to guess a default.

    :raises RejectedError: ``invalid_message`` listing every schema error, or the first
        problem of the checks after the schema.
    """
    tid = task_id_of(value)
    errors = schema_errors(TASK_SCHEMA_ID, value)
    if errors:
        raise RejectedError.of(errors, task_id=tid)
    try:
        return _normalise(value, default_executor, default_target, resource_defaults)
    except ValueError as e:
        raise RejectedError(str(e), task_id=tid) from None


def _normalise(msg: dict[str, Any], default_executor: str, default_target: str,
               resource_defaults: dict[str, Any]) -> dict[str, Any]:
    msg = copy.deepcopy(msg)
    try:
        image_ref = str(parse_image(msg["image"]["ref"]))
    except ValueError as e:
        raise ValueError(f"image/ref: {e}") from None
    mounts: dict[str, str] = {}
    source = None
    if "source" in msg:
        src = msg["source"]
        source = {
            "repo": _source_repo(src["repo"]),
            "version": src.get("version"),
            "mount": _container_path(src.get("mount", SOURCE_MOUNT), "source/mount"),
        }
        mounts["source/mount"] = source["mount"]
    inputs = []
    for i, item in enumerate(msg.get("inputs", [])):
        try:
            split_url(item["url"])
        except ValueError as e:
            raise ValueError(f"inputs/{i}/url: {e}") from None
        path = item["path"]
        if posixpath.normpath(path) != path or path.startswith("..") or "/../" in path:
            raise ValueError(f"inputs/{i}/path: {path!r} is not a normalised relative path")
        inputs.append({"url": item["url"], "path": path, "sha256": item.get("sha256"),
                       "headers": _headers(item.get("headers", {}), f"inputs/{i}/headers")})
    if len({i["path"] for i in inputs}) != len(inputs):
        raise ValueError("inputs: two inputs share a path")
    if inputs:
        mounts["inputs"] = INPUT_MOUNT
    for kind in ("datasets", "scratch"):
        names = [d["name"] for d in msg.get(kind, [])]
        if len(set(names)) != len(names):
            raise ValueError(f"{kind}: a name is used twice")
        for i, d in enumerate(msg.get(kind, [])):
            mounts[f"{kind}/{i}/mount"] = _container_path(d["mount"], f"{kind}/{i}/mount")
    outputs = msg.get("outputs", {})
    out_path = _container_path(outputs.get("path", OUTPUT_PATH), "outputs/path")
    mounts["outputs/path"] = out_path
    _check_disjoint(mounts)
    uploads = {}
    for kind, section in (("outputs", outputs), ("logs", msg.get("logs", {}))):
        up = section.get("upload")
        if up:
            try:
                split_url(up["url"])
            except ValueError as e:
                raise ValueError(f"{kind}/upload/url: {e}") from None
            uploads[kind] = {"url": up["url"], "method": up.get("method", "PUT"),
                             "headers": _headers(up.get("headers", {}),
                                                 f"{kind}/upload/headers")}
    res = dict(resource_defaults)
    res.update(msg.get("resources", {}))
    try:
        res["memory"] = parse_bytes(res["memory"])
    except ValueError as e:
        raise ValueError(f"resources/memory: {e}") from None
    if res["memory"] < RESOURCE_FLOORS["memory"]:
        raise ValueError(f"resources/memory: {res['memory']} bytes is under the "
                         f"{RESOURCE_FLOORS['memory']}-byte floor")
    res["cpus"] = float(res["cpus"])
    # A NaN passes every JSON Schema bound; parse_json refuses one, but a task built in
    # Python (the legacy protocol's task_info) did not come through it.
    if not (math.isfinite(res["cpus"]) and res["cpus"] >= RESOURCE_FLOORS["cpus"]):
        raise ValueError(f"resources/cpus: {res['cpus']} is not a number of at least "
                         f"{RESOURCE_FLOORS['cpus']}")
    workdir = msg.get("workdir")
    if workdir is not None:
        workdir = posixpath.normpath(workdir)
    return {
        "schema": TASK_SCHEMA_ID,
        "task_id": msg["task_id"],
        "node_id": msg.get("node_id"),
        "experiment_id": msg.get("experiment_id"),
        "not_after": msg.get("not_after"),
        "executor": msg.get("executor", default_executor),
        "image": {"ref": image_ref, "pull_policy": msg["image"].get("pull_policy", "missing")},
        "source": source,
        "command": msg.get("command"),
        "workdir": workdir,
        "env": msg.get("env", {}),
        "inputs": inputs,
        "datasets": [dict(d) for d in msg.get("datasets", [])],
        "scratch": [dict(d) for d in msg.get("scratch", [])],
        "outputs": {"path": out_path, "upload": uploads.get("outputs")},
        "logs": {"upload": uploads.get("logs")},
        "resources": res,
        "network": msg.get("network", "none"),
        "target": msg.get("target", default_target),
        "labels": msg.get("labels", {}),
    }


def public_task(task: dict[str, Any]) -> dict[str, Any]:
    """The task as roles see it: no header values, URLs without query or userinfo.

    Secrets go to roles through ``fem_secrets`` only (DESIGN.md §6)."""
    out = copy.deepcopy(task)
    out["inputs"] = [
        {"url": redact_url(i["url"]), "path": i["path"], "sha256": i["sha256"]}
        for i in task["inputs"]
    ]
    for kind in ("outputs", "logs"):
        up = task[kind]["upload"]
        if up:
            out[kind]["upload"] = {"url": redact_url(up["url"]), "method": up["method"]}
    return out


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_time(message: dict[str, Any]) -> float:
    """A message's ``ts`` (as :func:`now_rfc3339` writes it) in seconds since the epoch."""
    return datetime.fromisoformat(message["ts"].replace("Z", "+00:00")).timestamp()
