"""One description of what roles receive (fem_ansible/role_contract.py): the task's JSON
Schema, its normal form, ``fem_policy`` and the roles' argument specs all agree with it, so
a field added in one place and forgotten in another fails here (the generated specs and
docs/roles.md's table are held to it by tests/test_docs.py)."""

from __future__ import annotations

from typing import Any

from fem_ansible import role_contract
from fem_ansible.policy import decide
from fem_ansible.schema import TASK_SCHEMA, public_task, read_task

IMAGE = "127.0.0.1:5000/fem/busybox:1"
UPLOAD = "http://127.0.0.1:8089/up/x?sig=1"
# Every field of fem.task/v1 set, lists with one item.
FULL_MESSAGE = {
    "schema": "fem.task/v1",
    "task_id": "t-full",
    "node_id": "site-a",
    "experiment_id": "exp-1",
    "not_after": "2999-01-01T00:00:00Z",
    "executor": "docker",
    "image": {"ref": IMAGE, "pull_policy": "always"},
    "source": {"repo": "git://127.0.0.1:9418/sample.git", "version": "main", "mount": "/src"},
    "command": ["sh", "-c", "true"],
    "workdir": "/work",
    "env": {"A": "1"},
    "inputs": [{"url": "http://127.0.0.1:8089/in/x?sig=2", "path": "x", "sha256": "0" * 64,
                "headers": {"Authorization": "Bearer t"}}],
    "datasets": [{"name": "cohort", "mount": "/data"}],
    "scratch": [{"name": "s", "mount": "/scratch"}],
    "outputs": {"path": "/out", "upload": {"url": UPLOAD, "method": "POST",
                                           "headers": {"X-A": "1"}}},
    "logs": {"upload": {"url": UPLOAD, "method": "PUT", "headers": {"X-A": "1"}}},
    "resources": {"cpus": 0.5, "memory": "64Mi", "gpus": 0, "timeout_s": 60},
    "network": "none",
    "target": "localhost",
    "labels": {"k": "v"},
}
SPEC_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}
SCHEMA_TYPES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool",
                "object": "dict", "array": "list"}


def _schema_fields(schema: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every field of a JSON Schema object, by the same paths as role_contract's."""
    fields = {}
    for name, sub in schema.get("properties", {}).items():
        path = prefix + name
        fields[path] = sub
        if "properties" in sub:
            fields.update(_schema_fields(sub, f"{path}."))
        items = sub.get("items", {})
        if "properties" in items:
            fields.update(_schema_fields(items, f"{path}[]."))
    return fields


def test_the_task_schema_has_exactly_the_described_fields():
    described = dict(role_contract.fem_task_fields())
    in_schema = _schema_fields(TASK_SCHEMA)
    assert set(in_schema) - role_contract.SECRET_FIELDS == set(described)
    for path, sub in in_schema.items():
        if path in role_contract.SECRET_FIELDS:
            continue
        spec = described[path]
        if "enum" in sub:
            assert spec.get("choices") == sub["enum"], path
        elif "const" in sub:
            assert spec["type"] == "str", path
        elif isinstance(sub.get("type"), str):
            assert spec["type"] == SCHEMA_TYPES[sub["type"]], path
        if spec["type"] == "list" and "elements" in spec:
            items = sub["items"]
            want = SCHEMA_TYPES[items["type"]] if "type" in items else "dict"
            assert spec["elements"] == want, path


def _walk(value: Any, options: dict[str, Any], path: str, seen: set[str]) -> None:
    assert isinstance(value, dict), path
    assert set(value) == set(options), f"{path or 'fem_task'}: {sorted(value)} vs {sorted(options)}"
    for name, spec in options.items():
        sub, where = value[name], f"{path}{name}"
        seen.add(where)
        if sub is None:
            continue
        assert isinstance(sub, SPEC_TYPES[spec["type"]]), where
        if "choices" in spec:
            assert sub in spec["choices"], where
        if spec["type"] == "list":
            for item in sub:
                assert isinstance(item, SPEC_TYPES[spec.get("elements", "str")]), where
                if "options" in spec:
                    _walk(item, spec["options"], f"{where}[].", seen)
        elif "options" in spec:
            _walk(sub, spec["options"], f"{where}.", seen)


def test_the_normal_form_is_the_described_fem_task(make_config):
    config = make_config()
    task = read_task(FULL_MESSAGE, default_executor="docker", default_target="localhost",
                     resource_defaults=config.resource_defaults())
    seen: set[str] = set()
    _walk(public_task(task), role_contract.TASK_FULL, "", seen)
    assert seen == {path for path, _ in role_contract.fem_task_fields()}
    # the smallest message has every field too (null or empty), still of the described types
    small = read_task({"schema": "fem.task/v1", "task_id": "t", "image": {"ref": IMAGE}},
                      default_executor="docker", default_target="localhost",
                      resource_defaults=config.resource_defaults())
    _walk(public_task(small), role_contract.TASK_FULL, "", set())


def test_fem_policy_has_exactly_the_described_keys(make_config):
    config = make_config()
    task = read_task(FULL_MESSAGE, default_executor="docker", default_target="localhost",
                     resource_defaults=config.resource_defaults())
    policy = decide(task, config).policy
    _walk(policy, role_contract.FEM_POLICY["options"], "fem_policy.", set())

