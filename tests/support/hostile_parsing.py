"""The parsing-level hostile corpus of issue 18, written from the outside facts (RFC 3986,
RFC 9110, the Docker CLI's ``--mount`` CSV syntax, ECMA-262 and Python ``re``), not from
the code under test.

Each case is a valid sample task (tests/support/harness.py ``sample_task``) changed in one
place; it must end REJECTED with ``code`` and a reason containing ``reason``.  A case whose
``build`` returns bytes cannot be parsed, so its REJECTED event has no task id.  The unit
test (tests/test_hardening.py) reads every case with the intake function, the e2e test
(tests/test_e2e_hardening.py) sends every case, signed, to a real listener; SECURITY.md
counts them by ``item``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

Task = dict[str, Any]


class HostileCase(NamedTuple):
    name: str  # also the task id, where the case leaves the task id readable
    item: str  # the issue 18 item it belongs to (SECURITY.md)
    build: Callable[[Task, dict[str, str]], Task | bytes]
    code: str
    reason: str


def _set(path: str, value: Any) -> Callable[[Task, dict[str, str]], Task]:
    """A builder setting ``path`` (``a/b/0/c``) of the task to ``value``."""

    def build(task: Task, env: dict[str, str]) -> Task:
        *parents, last = path.split("/")
        node: Any = task
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value(env) if callable(value) else value
        return task

    return build


def _raw_cpus(literal: str) -> Callable[[Task, dict[str, str]], bytes]:
    """The task's bytes with ``cpus`` spelled as ``literal`` (what ``json.dumps`` cannot)."""

    def build(task: Task, env: dict[str, str]) -> bytes:
        task["resources"]["cpus"] = 0.5
        body = json.dumps(task).encode()
        assert b'"cpus": 0.5' in body
        return body.replace(b'"cpus": 0.5', b'"cpus": ' + literal.encode())

    return build


def _input(url_path: str = "in.txt", **fields: Any) -> Callable[[Task, dict[str, str]], Task]:
    """A builder adding one input (from the upload endpoint unless ``url`` is given)."""

    def build(task: Task, env: dict[str, str]) -> Task:
        item = {"url": f"{env['FEM_TEST_UPLOAD_URL']}/pub/{url_path}", "path": "in.txt",
                **fields}
        task["inputs"] = [item]
        return task

    return build


def _upload(kind: str, url_path: str | None = None, headers: dict[str, str] | None = None
            ) -> Callable[[Task, dict[str, str]], Task]:
    def build(task: Task, env: dict[str, str]) -> Task:
        up = task[kind]["upload"]
        if url_path is not None:
            up["url"] = f"{env['FEM_TEST_UPLOAD_URL']}/{url_path}"
        if headers is not None:
            up["headers"] = headers
        return task

    return build


def _repo(suffix: str) -> Callable[[Task, dict[str, str]], Task]:
    return _set("source/repo", lambda env: env["FEM_TEST_GIT_BASE_URL"] + suffix)


INVALID = "invalid_message"
# What a ``cpus`` of NaN, Infinity or 1e400 is refused as: not JSON the node reads.
NOT_JSON = "not valid JSON"
# The secret a source query would carry; it must appear in no event, log or audit line.
REPO_SECRET = "s3cret-in-the-query"

PARSING_CORPUS: list[HostileCase] = [
    # -- sizes: exact arithmetic, bounded ------------------------------------------------
    HostileCase("memory-309-nines", "sizes", _set("resources/memory", "9" * 309 + "T"),
                INVALID, "resources/memory"),
    HostileCase("memory-60-nines", "sizes", _set("resources/memory", "9" * 60 + "T"),
                INVALID, "is over 9223372036854775807 bytes"),
    HostileCase("memory-2-to-the-64", "sizes", _set("resources/memory", 2**64),
                INVALID, "is over 9223372036854775807 bytes"),
    # -- floors: no limit can be switched off ----------------------------------------------
    HostileCase("memory-zero-string", "floors", _set("resources/memory", "0"),
                INVALID, "floor"),
    HostileCase("memory-half-byte", "floors", _set("resources/memory", "0.5"),
                INVALID, "floor"),
    HostileCase("memory-under-4mi", "floors", _set("resources/memory", "4095Ki"),
                INVALID, "floor"),
    HostileCase("memory-zero-int", "floors", _set("resources/memory", 0),
                INVALID, "resources/memory"),
    HostileCase("memory-4mi-less-one", "floors", _set("resources/memory", 4 * 1024**2 - 1),
                INVALID, "resources/memory"),
    HostileCase("cpus-1e-10", "floors", _set("resources/cpus", 1e-10),
                INVALID, "resources/cpus"),
    HostileCase("cpus-zero", "floors", _set("resources/cpus", 0), INVALID, "resources/cpus"),
    HostileCase("cpus-negative", "floors", _set("resources/cpus", -1),
                INVALID, "resources/cpus"),
    # -- non-finite numbers never get past parsing -----------------------------------------
    HostileCase("cpus-nan", "non-finite", _raw_cpus("NaN"), INVALID, NOT_JSON),
    HostileCase("cpus-infinity", "non-finite", _raw_cpus("Infinity"), INVALID, NOT_JSON),
    HostileCase("cpus-minus-infinity", "non-finite", _raw_cpus("-Infinity"), INVALID, NOT_JSON),
    HostileCase("cpus-1e400", "non-finite", _raw_cpus("1e400"), INVALID, NOT_JSON),
    # -- image references the engine could not parse again -----------------------------------
    HostileCase("image-510-chars", "image-length",
                _set("image/ref", lambda env: f"{env['FEM_TEST_REGISTRY']}/fem/" + "a" * 490),
                INVALID, "longer than 255 characters"),
    HostileCase("image-256-chars", "image-length",
                _set("image/ref", lambda env: f"{env['FEM_TEST_REGISTRY']}/fem/"
                     + "b" * (256 - len(env["FEM_TEST_REGISTRY"]) - 5) + ":1"),
                INVALID, "longer than 255 characters"),
    # -- a trailing newline passes no pattern (Python's $ matches before it) ------------------
    HostileCase("nl-task-id", "trailing-newline", _set("task_id", "nl-task-id\n"),
                INVALID, "task_id"),
    HostileCase("nl-node-id", "trailing-newline", _set("node_id", "n1\n"), INVALID, "node_id"),
    HostileCase("nl-experiment-id", "trailing-newline", _set("experiment_id", "e1\n"),
                INVALID, "experiment_id"),
    HostileCase("nl-executor", "trailing-newline", _set("executor", "docker\n"),
                INVALID, "executor"),
    HostileCase("nl-network", "trailing-newline", _set("network", "labnet\n"),
                INVALID, "network"),
    HostileCase("nl-target", "trailing-newline", _set("target", "localhost\n"),
                INVALID, "target"),
    HostileCase("nl-env-key", "trailing-newline", _set("env", {"FEM_X\n": "1"}),
                INVALID, "env"),
    HostileCase("nl-source-version", "trailing-newline", _set("source/version", "master\n"),
                INVALID, "source/version"),
    HostileCase("nl-input-path", "trailing-newline", _input(path="in.txt\n"),
                INVALID, "inputs/0/path"),
    HostileCase("nl-input-sha256", "trailing-newline", _input(sha256="a" * 64 + "\n"),
                INVALID, "inputs/0/sha256"),
    HostileCase("nl-dataset-name", "trailing-newline",
                _set("datasets", [{"name": "cohort\n", "mount": "/fem/data"}]),
                INVALID, "datasets/0/name"),
    HostileCase("nl-header-name", "trailing-newline", _upload("outputs", headers={"X-A\n": "1"}),
                INVALID, "outputs/upload/headers"),
    HostileCase("nl-header-value", "trailing-newline",
                _upload("outputs", headers={"X-A": "1\n"}), INVALID, "outputs/upload/headers"),
    HostileCase("nl-memory", "trailing-newline", _set("resources/memory", "128Mi\n"),
                INVALID, "resources/memory"),
    HostileCase("nl-image-ref", "trailing-newline",
                _set("image/ref", lambda env: env["FEM_TEST_IMAGE"] + "\n"), INVALID, "image"),
    # -- container paths: one strict character class -----------------------------------------
    HostileCase("path-newline", "container-path",
                _set("datasets", [{"name": "cohort", "mount": "/data\n"}]),
                INVALID, "datasets/0/mount"),
    HostileCase("path-newline-inside", "container-path",
                _set("datasets", [{"name": "cohort", "mount": "/data\nreadonly=false"}]),
                INVALID, "datasets/0/mount"),
    HostileCase("path-comma", "container-path",
                _set("datasets", [{"name": "cohort", "mount": "/data,readonly=false"}]),
                INVALID, "datasets/0/mount"),
    HostileCase("path-equals", "container-path", _set("outputs/path", "/fem/out=x"),
                INVALID, "outputs/path"),
    HostileCase("path-quote", "container-path", _set("workdir", '/fem/"w'),
                INVALID, "workdir"),
    HostileCase("path-carriage-return", "container-path", _set("source/mount", "/fem/src\r"),
                INVALID, "source/mount"),
    HostileCase("path-tab", "container-path",
                _set("scratch", [{"name": "s", "mount": "/fem/s\tx"}]),
                INVALID, "scratch/0/mount"),
    HostileCase("path-del", "container-path", _set("workdir", "/fem/w\x7f"), INVALID, "workdir"),
    HostileCase("path-c1-nel", "container-path", _set("workdir", "/fem/w\x85"),
                INVALID, "workdir"),
    HostileCase("path-backslash", "container-path", _set("workdir", "/fem/w\\x"),
                INVALID, "workdir"),
    # -- URL allow-lists: what a decoding server would resolve elsewhere ----------------------
    HostileCase("url-pct-dotdot", "url-decoding", _input("%2e%2e/%2e%2e/etc/passwd"),
                INVALID, "dot segments"),
    HostileCase("url-mixed-dotdot", "url-decoding", _input(".%2E/secret"),
                INVALID, "dot segments"),
    HostileCase("url-encoded-slash", "url-decoding", _input("..%2Fsecret"),
                INVALID, "encoded '/'"),
    HostileCase("url-encoded-slash-alone", "url-decoding", _input("a%2Fb"),
                INVALID, "encoded '/'"),
    HostileCase("url-backslash", "url-decoding", _input("..\\secret"), INVALID, "backslash"),
    HostileCase("url-encoded-backslash", "url-decoding", _input("..%5Csecret"),
                INVALID, "backslash"),
    HostileCase("url-dotdot-semicolon", "url-decoding", _input("..;/secret"),
                INVALID, "dot segments"),
    HostileCase("url-double-encoded", "url-decoding", _input("%252e%252e/secret"),
                INVALID, "dot segments"),
    HostileCase("url-bad-percent", "url-decoding", _input("a%zz"),
                INVALID, "percent-encoding"),
    HostileCase("url-upload-dotdot", "url-decoding", _upload("outputs", "x/%2e%2e/y/o.tgz"),
                INVALID, "dot segments"),
    HostileCase("url-logs-semicolon", "url-decoding", _upload("logs", "x/..;/y/l.tgz"),
                INVALID, "dot segments"),
    HostileCase("url-source-dotdot", "url-decoding", _repo("/%2e%2e/sample.git"),
                INVALID, "dot segments"),
    # -- request headers that are the client's, not the task's --------------------------------
    *[HostileCase(f"header-{name.lower()}", "headers",
                  _input(headers={name: value}) if where == "inputs"
                  else _upload(where, headers={name: value}),
                  INVALID, "may not be set by a task")
      for name, value, where in [
          ("Host", "internal.example", "inputs"),
          ("content-length", "0", "outputs"),
          ("Transfer-Encoding", "chunked", "logs"),
          ("CONNECTION", "close", "inputs"),
          ("TE", "trailers", "outputs"),
          ("Upgrade", "h2c", "logs"),
          ("Expect", "100-continue", "outputs"),
          ("Proxy-Authorization", "Basic eDp5", "inputs"),
          ("proxy-connection", "keep-alive", "logs"),
      ]],
    HostileCase("header-value-control", "headers",
                _upload("logs", headers={"X-A": "a\x0bb"}), INVALID, "logs/upload/headers"),
    # -- source.repo: nothing secret can ride in the URL --------------------------------------
    HostileCase("source-query", "source-query", _repo(f"/sample.git?token={REPO_SECRET}"),
                INVALID, "query or fragment"),
    HostileCase("source-fragment", "source-query", _repo(f"/sample.git#{REPO_SECRET}"),
                INVALID, "query or fragment"),
    HostileCase("source-empty-query", "source-query", _repo("/sample.git?"),
                INVALID, "query or fragment"),
]

# ``x-fem-signature`` values no key signed, of every type an AMQP header can carry: each is
# ``signature_invalid`` (never a TypeError) for a task and for a control message alike.
HOSTILE_SIGNATURE_HEADERS: dict[str, Any] = {
    "hmac-non-ascii": "hmac-sha256=é",
    "hmac-non-ascii-hex": "hmac-sha256=" + "é" * 64,
    "hmac-non-ascii-bytes": "hmac-sha256=é".encode(),
    "ed25519-non-ascii": "ed25519=é",
    "int": 5,
    "list": ["hmac-sha256=00"],
    "table": {"hmac-sha256": "00"},
    "bool": True,
}


def case_message(case: HostileCase, task: Task, env: dict[str, str]) -> bytes:
    """The bytes of ``case`` built on ``task`` (a fresh sample task named ``case.name``)."""
    built = case.build(task, env)
    return built if isinstance(built, bytes) else json.dumps(built).encode()


def anonymous(case: HostileCase) -> bool:
    """Whether the REJECTED event of ``case`` has no task id (the body or the id itself is
    what cannot be read)."""
    return case.reason == NOT_JSON or case.name == "nl-task-id"
