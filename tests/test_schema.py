import json

import pytest

from fem_ansible.errors import RejectedError
from fem_ansible.schema import (
    EVENT_SCHEMA_ID,
    SCHEMAS,
    parse_json,
    public_task,
    read_task,
    schema_errors,
)

DEFAULTS = {"cpus": 1.0, "memory": 2**31, "gpus": 0, "timeout_s": 3600}


def read(msg):
    return read_task(msg, default_executor="docker", default_target="localhost",
                     resource_defaults=DEFAULTS)


def minimal(**extra):
    return {"schema": "fem.task/v1", "task_id": "t1", "image": {"ref": "busybox"}, **extra}


def test_normal_form_fills_every_default():
    task = read(minimal())
    assert task["image"] == {"ref": "docker.io/library/busybox:latest", "pull_policy": "missing"}
    assert task["outputs"] == {"path": "/fem/output", "upload": None}
    assert task["resources"] == {"cpus": 1.0, "memory": 2**31, "gpus": 0, "timeout_s": 3600}
    assert task["network"] == "none"
    assert task["target"] == "localhost"
    assert task["executor"] == "docker"
    assert task["source"] is None and task["env"] == {} and task["inputs"] == []


def test_memory_suffixes_are_binary():
    assert read(minimal(resources={"memory": "1g"}))["resources"]["memory"] == 1024**3
    assert read(minimal(resources={"memory": "512Mi"}))["resources"]["memory"] == 512 * 1024**2


@pytest.mark.parametrize(
    ("msg", "fragment"),
    [
        (minimal(extra=1), "Additional properties"),
        (minimal(task_id="a.b"), "task_id"),
        (minimal(command="rm -rf /"), "command"),
        (minimal(env={"lower": "x"}), "env"),
        (minimal(image={"ref": "busybox", "pull": "x"}), "image"),
        (minimal(outputs={"path": "relative"}), "outputs/path"),
        (minimal(outputs={"path": "/"}), "reserved"),
        (minimal(outputs={"path": "/proc/x"}), "reserved"),
        (minimal(outputs={"path": "/a/../etc"}), "normalised"),
        (minimal(datasets=[{"name": "d", "mount": "/data"}],
                 scratch=[{"name": "s", "mount": "/data/s"}]), "overlap"),
        (minimal(inputs=[{"url": "http://h/x", "path": "../x"}]), "inputs/0/path"),
        (minimal(source={"repo": "ext::sh -c id"}), "source/repo"),
        (minimal(source={"repo": "git://h/r", "version": "--upload-pack=x"}), "version"),
    ],
)
def test_invalid_messages_are_rejected(msg, fragment):
    with pytest.raises(RejectedError) as err:
        read(msg)
    assert fragment in err.value.message
    assert err.value.code == "invalid_message"


def test_rejection_names_task_id_only_when_valid():
    with pytest.raises(RejectedError) as err:
        read(minimal(extra=1))
    assert err.value.task_id == "t1"
    with pytest.raises(RejectedError) as err:
        read({**minimal(), "task_id": "../x"})
    assert err.value.task_id is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"x" * 2000, "over the 1000-byte limit"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 500 + b"]" * 500, "nested"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b"{", "not valid JSON"),
    ],
)
def test_parse_json_refuses_cheaply(body, fragment):
    with pytest.raises(RejectedError, match=fragment):
        parse_json(body, 1000)


def test_public_task_has_no_secrets():
    task = read(minimal(
        inputs=[{"url": "http://h/in?sig=SECRET", "path": "a", "headers": {"X-Token": "SECRET"}}],
        outputs={"upload": {"url": "http://h/out?sig=SECRET", "headers": {"A": "SECRET"}}},
    ))
    assert "SECRET" not in json.dumps(public_task(task))
    assert "SECRET" in json.dumps(task)


def test_schemas_are_valid_json_schema_documents():
    import jsonschema

    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert schema_errors(EVENT_SCHEMA_ID, {"schema": "fem.event/v1"})
