"""The legacy FEM-client protocol, without a broker: parsing, mapping, argv, replies, files."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile

import pytest

from fem_ansible.errors import PolicyViolation, RejectedError
from fem_ansible.legacy import message, replies, sandbox, taskinfo

IMAGE = {"repository": "127.0.0.1:5000/fem", "name": "busybox", "tag": "1",
         "hash": "image_hash_value"}
DIGEST = "sha256:" + "ab" * 32


def body(task_info="{}", execution='{"execution_id": "e1", "process_info": []}',
         params="{}", user="alice", action="submit_run", tool="tool-1", public_ip="None",
         token="tok") -> bytes:
    return "|".join([action, tool, task_info, execution, params, user, public_ip, action,
                     token]).encode()


def info(**fields) -> str:
    base = {"_id": "task-def", "name": "t", "image": IMAGE,
            "command": {"base": "sh -c 'echo hi'", "args": []}}
    base.update(fields)
    return repr(base)


def mapped(task_info: str, params: str = "{}", site_vars=None) -> dict:
    msg = message.parse_message(body(task_info, params=params), 1 << 20)
    return taskinfo.to_task(msg, "node-a", site_vars or {})


def test_parse_the_nine_fields():
    msg = message.parse_message(body(info(), params="{'rounds': 3}"), 1 << 20)
    assert msg.action == "submit_run" and msg.tool_id == "tool-1"
    assert msg.task_info["_id"] == "task-def"
    assert msg.execution_id == "e1" and msg.task_id == "legacy-e1"
    assert msg.parametric_args == {"rounds": 3}
    assert msg.user_id == "alice" and msg.public_ip is None
    # Kept only to hand to a launch as a secret: never in a repr (logs, tracebacks).
    assert msg.token == "tok" and "tok" not in repr(msg)


@pytest.mark.parametrize("raw", [
    b"submit_run|a|b",
    body() + b"|extra",
    b"\xff" + body(),
    body(action="rm_rf"),
    body(execution="{not json"),
    body(execution="[1, 2]"),
])
def test_malformed_messages_are_refused(raw):
    with pytest.raises(RejectedError):
        message.parse_message(raw, 1 << 20)


def test_oversized_message_is_refused():
    with pytest.raises(RejectedError, match="over the"):
        message.parse_message(body(info()), 50)


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('touch /tmp/pwned')",
    "{'a': __import__('os').system('id')}",
    "{'a': (lambda: 1)()}",
    "{'a': open('/etc/passwd').read()}",
    "{'a': {1, 2}}",
    "{'a': b'bytes'}",
    "{1: 'int key'}",
    "['not', 'a', 'dict']",
    "{'a': 1j}",
    "[" * 200 + "]" * 200,
    "{'a': " * 40 + "1" + "}" * 40,
])
def test_literals_are_data_only(hostile, tmp_path):
    for raw in (body(task_info=hostile), body(info(), params=hostile)):
        with pytest.raises(RejectedError):
            message.parse_message(raw, 1 << 20)


def test_image_ref_rules():
    assert taskinfo.image_ref(IMAGE) == "127.0.0.1:5000/fem/busybox:1"
    assert taskinfo.image_ref({**IMAGE, "hash": DIGEST}) == f"127.0.0.1:5000/fem/busybox@{DIGEST}"
    assert taskinfo.image_ref({**IMAGE, "hash": "ab" * 32}).endswith(f"@{DIGEST}")
    assert taskinfo.image_ref({"name": "busybox", "repository": "", "tag": ""}) == "busybox:latest"
    with pytest.raises(RejectedError):
        taskinfo.image_ref({"repository": "x"})


def test_mapping_onto_fem_task():
    task = mapped(info(
        var_envs={"NODE_NAME": "$NODE_NAME", "MODE": "train", "N": 3},
        volumes=[{"host_path": "$SANDBOX_PATH/%%user_id%%/%%execution_id%%",
                  "container_path": "/sandbox"},
                 {"host_path": "$DATA_PATH", "container_path": "/data"}],
        cpus="1", memory="128Mi", gpus="",
        source_code={"url": "git://127.0.0.1:9418/sample.git --branch main"},
        outputs={"model_dir": "/x", "move_to": "/y"}, port_mappings=[{"host_port": 1}],
    ), site_vars={"NODE_NAME": "BSC"})
    assert task["task_id"] == "legacy-e1"
    assert task["image"] == {"ref": "127.0.0.1:5000/fem/busybox:1"}
    assert task["env"] == {"NODE_NAME": "BSC", "MODE": "train", "N": "3"}
    assert task["outputs"] == {"path": "/sandbox"}
    assert task["datasets"] == [{"name": "legacy-input", "mount": "/fem/received"},
                                {"name": "legacy-data", "mount": "/data"}]
    assert task["resources"] == {"cpus": 1.0, "memory": "128Mi"}
    assert task["source"] == {"repo": "git://127.0.0.1:9418/sample.git", "version": "main",
                              "mount": "/fem/src"}
    assert task["workdir"] == "/fem/src"
    assert task["command"] == ["sh", "-c", "echo hi"]
    assert task["labels"]["legacy.tool_id"] == "tool-1"


@pytest.mark.parametrize("volume", [
    {"host_path": "/etc", "container_path": "/etc2"},
    {"host_path": "$SANDBOX_PATH/../..", "container_path": "/x"},
    {"host_path": "$HOST_FEMC_PATH/config/rabbitmq-certificates", "container_path": "/c"},
    {"host_path": "$DATA_PATH/../etc", "container_path": "/x"},
    {"host_path": "$SANDBOX_PATH/%%user_id%%", "container_path": "/x"},
    {"host_path": "/var/run/docker.sock", "container_path": "/var/run/docker.sock"},
])
def test_only_sandbox_and_data_volumes(volume):
    with pytest.raises(PolicyViolation, match=r"legacy\.volumes") as e:
        mapped(info(volumes=[volume]))
    assert e.value.task_id == "legacy-e1"


def test_unknown_site_var_is_an_error_not_passed_through():
    with pytest.raises(PolicyViolation, match=r"\$SECRET_TOKEN"):
        mapped(info(var_envs={"X": "$SECRET_TOKEN"}), site_vars={"OTHER": "1"})
    # Not a placeholder: a literal value with a dollar in it stays as it is.
    assert mapped(info(var_envs={"X": "a$b"}))["env"] == {"X": "a$b"}


def test_argv_positions_prefixes_and_defaults():
    command = {"base": "python3 'run me.py' --node %%node_name%%", "args": [
        {"id": "rounds", "type": "int", "default_value": 1, "position": 2,
         "prefix": "--rounds", "separate": True, "required": True},
        {"id": "lr", "type": "float", "default_value": "0.1", "position": 1,
         "prefix": "--lr=", "separate": False, "required": False},
        {"id": "verbose", "type": "boolean", "default_value": False, "position": 3,
         "prefix": "-v"},
        {"id": "data", "type": "string", "default_value": None, "position": 4,
         "required": False},
        {"id": "last", "type": "string", "default_value": "x; rm -rf /", "prefix": ""},
    ]}
    params = {"rounds": 5, "verbose": "true", "other_node": {"rounds": 9},
              "node-a": {"lr": 0.5}}
    argv = taskinfo.build_argv(command, taskinfo.user_params(params, "node-a"),
                             {"node_name": "node-a"})
    assert argv == ["python3", "run me.py", "--node", "node-a", "--lr=0.5", "--rounds", "5",
                    "-v", "x; rm -rf /"]


def test_argv_errors():
    with pytest.raises(RejectedError, match="required"):
        taskinfo.build_argv({"base": "x", "args": [{"id": "a", "required": True}]}, {}, {})
    with pytest.raises(RejectedError, match="placeholder"):
        taskinfo.build_argv({"base": "x %%token%%"}, {}, {"node_name": "n"})
    with pytest.raises(RejectedError):
        taskinfo.build_argv({"base": "x 'unclosed"}, {}, {})
    with pytest.raises(RejectedError, match="string or number"):
        taskinfo.build_argv({"base": "x", "args": [{"id": "a"}]}, {"a": [1, 2]}, {})
    assert taskinfo.build_argv({"base": "", "args": []}, {}, {}) is None


@pytest.mark.parametrize("execution,user", [
    ('{"execution_id": "../../etc"}', "alice"),
    ('{"execution_id": "a.b"}', "alice"),
    ('{"execution_id": "' + "x" * 122 + '"}', "alice"),
    ('{"execution_id": 5}', "alice"),
    ('{"process_info": []}', "alice"),
    ('{"execution_id": "e1"}', "../root"),
    ('{"execution_id": "e1"}', ".hidden"),
    ('{"execution_id": "e1"}', "a/b"),
    ('{"execution_id": "e1"}', "None"),
])
def test_ids_must_be_safe_path_components(execution, user):
    msg = message.parse_message(body(info(), execution=execution, user=user), 1 << 20)
    with pytest.raises(RejectedError):
        taskinfo.to_task(msg, "node-a", {})


def test_source_url_forms():
    assert "source" not in mapped(info(source_code={"url": ""}))
    with pytest.raises(RejectedError):
        mapped(info(source_code={"url": "https://x/y.git --upload-pack=evil"}))


def reassemble(parts: list[dict]) -> bytes:
    """The orchestrator's way (docs/legacy.md, "Wire protocol"): chunks kept by index, the
    data strings joined in index order, base64-decoded once, sha256 checked."""
    start = parts[0]
    assert start["type"] == "chunk_start"
    chunks = {p["index"]: p["data"] for p in parts[1:] if p["type"] == "chunk"}
    assert len(chunks) == start["total"]
    raw = base64.b64decode("".join(chunks[i] for i in sorted(chunks)))
    if hashlib.sha256(raw).hexdigest() != start["checksum"]:
        raise RuntimeError("Checksum mismatch")
    return raw


@pytest.mark.parametrize("chunk_size", [1000, 4096, 65536, 65535, 7])
def test_reply_chunks_reassemble_the_orchestrators_way(chunk_size):
    result = {"big": "é" * 50000, "n": list(range(3000))}
    parts = replies.reply_messages(result, chunk_size)
    assert parts[0]["total"] > 1 and all(p["type"] == "chunk" for p in parts[1:])
    assert [p["index"] for p in parts[1:]] == list(range(parts[0]["total"]))
    assert all(len(p["data"]) <= chunk_size for p in parts[1:])
    assert json.loads(reassemble(parts)) == result
    # Out of order on the wire, still reassembled by index.
    assert json.loads(reassemble([parts[0], *reversed(parts[1:])])) == result
    assert json.loads(reassemble(replies.reply_messages({}, chunk_size))) == {}


def test_chunks_encoded_one_by_one_would_fail_the_orchestrator():
    """The check can fail: per-chunk base64 (each slice padded) is refused by reassemble."""
    raw = json.dumps({"x": "y" * 100000}).encode()
    bad = [{"type": "chunk_start", "total": 2, "checksum": hashlib.sha256(raw).hexdigest()},
           {"type": "chunk", "index": 0, "data": base64.b64encode(raw[:65536]).decode()},
           {"type": "chunk", "index": 1, "data": base64.b64encode(raw[65536:]).decode()}]
    with pytest.raises(RuntimeError, match="Checksum mismatch"):
        reassemble(bad)


def test_error_result_shapes():
    msg = message.parse_message(body(info()), 1 << 20)
    err = replies.error_result(msg, "n", RejectedError("boom"), record=True)
    assert err["status"] == "error" and err["return_code"] is None
    assert err["result"]["error"]["message"] == "boom"
    assert set(err) == {"execution_id", "action", "tool_id", "task_id", "user_id", "node",
                        "result", "status", "return_code", "starting_time", "finish_time"}
    # The default (legacy.reply: stdout): no process-info record, just the error.
    plain = replies.error_result(msg, "n", RejectedError("boom"))
    assert plain == {"action": "submit_run", "node": "n", "execution_id": "e1",
                     "status": "error",
                     "error": {"code": "invalid_message", "message": "boom"}}
    other = replies.error_result(None, "n", RejectedError("bad"))
    assert other["status"] == "error" and other["action"] is None


def make_tar(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in members:
            content = data.get(m.name)
            if content is not None:
                m.size = len(content)
                tar.addfile(m, io.BytesIO(content))
            else:
                tar.addfile(m)
    return buf.getvalue()


def test_extract_outputs_is_safe(tmp_path):
    def reg(name):
        return tarfile.TarInfo(name)

    link = tarfile.TarInfo("./link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("./hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    d = tarfile.TarInfo("./sub")
    d.type = tarfile.DIRTYPE
    dev = tarfile.TarInfo("./dev")
    dev.type = tarfile.CHRTYPE
    archive = tmp_path / "out.tar.gz"
    archive.write_bytes(make_tar(
        [d, reg("./sub/a.txt"), reg("./b.txt"), reg("../escape"), reg("/abs"), link, hard,
         dev, reg("./sub/../../up")],
        {"./sub/a.txt": b"A", "./b.txt": b"B", "../escape": b"E", "/abs": b"X",
         "./sub/../../up": b"U"}))
    dest = tmp_path / "sandbox" / "output"
    dest.parent.mkdir()
    assert sandbox.extract_outputs(archive, dest) == ["b.txt", "sub/a.txt"]
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "b.txt", "sub", "sub/a.txt"]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "up").exists()


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "", ".", "a//b",
                                  "a\\b", "x\x00y"])
def test_safe_relative_refuses(path):
    with pytest.raises(RejectedError):
        sandbox.safe_relative(path, "p")


def test_write_under_refuses_links(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "l").symlink_to(tmp_path)
    with pytest.raises(RejectedError):
        sandbox.write_under(root, "l/x", b"1")
    sandbox.write_under(root, "d/f.txt", b"1")
    assert (root / "d" / "f.txt").read_bytes() == b"1"


def test_enabled_without_sandbox_path_is_a_config_error(make_config):
    from fem_ansible.errors import ConfigError
    from fem_ansible.legacy import adapters
    from fem_ansible.listener import Listener

    def listener(config):
        return Listener(config, adapters=adapters(config))

    with pytest.raises(ConfigError, match=r"legacy\.sandbox_path"):
        listener(make_config(legacy={"enabled": True}))
    with pytest.raises(ConfigError, match=r"legacy\.data_path"):
        listener(make_config(legacy={"enabled": True, "sandbox_path": "/srv/sb",
                                     "data_path": "relative"}))


def test_streamed_reply_equals_the_whole_one_whatever_the_pieces():
    raw = json.dumps({"x": "é" * 7001, "n": list(range(999))}).encode()
    for cut in (1, 2, 5, 4096, 65537):
        pieces = [raw[i:i + cut] for i in range(0, len(raw), cut)]
        parts = list(replies.stream_reply(lambda p=pieces: iter(p), 1000))
        assert reassemble(parts) == raw
    assert reassemble(list(replies.stream_reply(lambda: iter(()), 10))) == b""


def test_files_json_streams_each_file(tmp_path):
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 1000)
    (root / "sub" / "b.txt").write_bytes(b"")
    (root / "link").symlink_to(root / "a.bin")
    raw = b"".join(sandbox.files_json({"status": "success"}, root, ["a.bin", "sub/b.txt"],
                                      block=3 * 7))
    doc = json.loads(raw)
    assert doc["status"] == "success" and [f["path"] for f in doc["files"]] == [
        "a.bin", "sub/b.txt"]
    a = doc["files"][0]
    assert base64.b64decode(a["data"]) == (root / "a.bin").read_bytes()
    assert a["size"] == 256000 and a["sha256"] == hashlib.sha256(
        (root / "a.bin").read_bytes()).hexdigest()
    with pytest.raises(RejectedError):
        b"".join(sandbox.files_json({}, root, ["link"]))
    assert sandbox.list_files(root) == ["a.bin", "sub/b.txt"]


def test_write_b64_under_decodes_in_blocks_and_caps(tmp_path):
    data = bytes(range(256)) * 3000
    size, digest = sandbox.write_b64_under(tmp_path, "d/x.bin",
                                           base64.b64encode(data).decode(), 1 << 20)
    assert (tmp_path / "d" / "x.bin").read_bytes() == data and size == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    with pytest.raises(RejectedError, match="limit"):
        sandbox.write_b64_under(tmp_path, "y.bin", base64.b64encode(data).decode(), 1000)
    assert not (tmp_path / "y.bin").exists() and not (tmp_path / ".y.bin.tmp").exists()
    with pytest.raises(RejectedError, match="base64"):
        sandbox.write_b64_under(tmp_path, "z.bin", "not base64!", 1000)
