"""``legacy.tools``: the site's catalogue turns a submit_run into a task (DESIGN.md §9)."""

from __future__ import annotations

import pytest

from fem_ansible.errors import ConfigError, PolicyViolation, RejectedError
from fem_ansible.legacy import catalogue, message

IMAGE = "127.0.0.1:5000/fem/busybox:1"


def msg(task_info, tool="kaapana", params="{}", token="tok-123"):
    body = "|".join(["submit_run", tool, repr(task_info),
                     '{"execution_id": "e1", "process_info": []}', params, "alice", "None",
                     "submit_run", token])
    return message.parse_message(body.encode(), 1 << 20)


@pytest.fixture
def site(make_config, tmp_path):
    def make(tools, **legacy):
        return make_config(legacy={"enabled": True, "sandbox_path": str(tmp_path / "sb"),
                                   "data_path": str(tmp_path / "data"), "tools": tools,
                                   **legacy})
    return make


def launch(config, m):
    tool = catalogue.select(config, m.tool_id)
    return catalogue.to_launch(m, tool, config, "node-a", "/srv/sb/alice/e1")


def test_kaapana_submit_run_through_a_catalogue_entry(site):
    config = site({"kaapana": {
        "image": IMAGE,
        "command": ["run", "--exec", "%%execution_id%%", "--user", "%%user_id%%",
                    "--node=%%node_name%%", "--task", "%%task_id%%", "--",
                    "%%TASK_COMMAND%%"],
        "env": {"FEM_TOKEN": "%%token%%", "WORKFLOW": "%%workflow%%"},
        "mounts": [{"source": "sandbox", "mount": "/sandbox"},
                   {"source": "data", "mount": "/data"}],
    }})
    m = msg({"_id": "wf-1", "command": "python3 -m job --flag 'a b'", "workflow": "seg"})
    out = launch(config, m)
    assert out.task["command"] == ["run", "--exec", "e1", "--user", "alice", "--node=node-a",
                                   "--task", "wf-1", "--", "python3", "-m", "job", "--flag",
                                   "a b"]
    assert out.task["image"] == {"ref": IMAGE}
    assert out.task["env"] == {"WORKFLOW": "seg"}
    assert out.secret_env == {"FEM_TOKEN": "tok-123"}
    assert "tok-123" not in repr(out) and "tok-123" not in repr(out.task)
    assert out.task["outputs"] == {"path": "/sandbox"} and out.outputs_into == ""
    assert {"name": "legacy-data", "mount": "/data"} in out.task["datasets"]
    assert out.datasets["legacy-data"] == config.legacy.data_path


def test_placeholders_are_data_never_split_or_passed_through(site):
    config = site({"*": {"image": IMAGE, "command": ["sh", "-c", "echo %%TASK_COMMAND%%"]}})
    hostile = "x; rm -rf / $(id) `id`"
    out = launch(config, msg({"_id": "t", "command": hostile}, tool="other"))
    assert out.task["command"] == ["sh", "-c", f"echo {hostile}"]
    with pytest.raises(PolicyViolation, match="%%data_path%%"):
        launch(site({"*": {"image": IMAGE, "command": ["x", "%%data_path%%"]}}),
               msg({"_id": "t"}))
    with pytest.raises(PolicyViolation, match="%%nope%%"):
        launch(site({"*": {"image": IMAGE, "command": ["x", "%%nope%%"]}}), msg({"_id": "t"}))


def test_a_tool_not_in_the_catalogue_is_refused(site):
    with pytest.raises(PolicyViolation, match=r"legacy\.tools"):
        catalogue.select(site({"known": {"image": IMAGE}}), "unknown")


def test_a_missing_token_for_a_secret_env_is_refused(site):
    config = site({"*": {"image": IMAGE, "env": {"T": "%%token%%"}}})
    with pytest.raises(RejectedError, match="no token") as e:
        launch(config, msg({"_id": "t"}, token="None"))
    assert e.value.task_id == "legacy-e1"


@pytest.mark.parametrize("tool,match", [
    ({"command": ["x"]}, r"image: required"),
    ({"image": IMAGE, "command": ["x", "--token=%%token%%"]}, "never in argv"),
    ({"image": IMAGE, "env": {"T": "Bearer %%token%%"}}, "whole value"),
    ({"image": IMAGE, "env": {"bad-name": "x"}}, "env variable name"),
    ({"image": IMAGE, "mounts": [{"source": "sandbox", "mount": "/a"},
                                 {"source": "sandbox/b", "mount": "/b"}]}, "at most one"),
    ({"image": IMAGE, "mounts": [{"source": "sandbox/../x", "mount": "/a"}]}, "source"),
    ({"image": IMAGE, "mounts": [{"source": "relative/dir", "mount": "/a"}]}, "source"),
])
def test_catalogue_errors_are_config_errors(site, tool, match):
    with pytest.raises(ConfigError, match=match):
        catalogue.check_catalogue(site({"t": tool}))


def test_init_legacy_writes_a_catalogue_that_loads_once_uncommented(tmp_path):
    from fem_ansible.config import load_config
    from fem_ansible.init import LEGACY_CATALOGUE, init_site

    config_path = init_site(tmp_path / "etc", "site-a", legacy=True)[0]
    text = config_path.read_text()
    assert text.endswith(LEGACY_CATALOGUE)
    plain = load_config(config_path, environ={})
    assert plain.legacy.enabled and plain.legacy.tools == {}
    # The sysadmin uncomments the block from `tools:` on (its lines lose their "# ").
    start = text.rindex("  # tools:")
    config_path.write_text(text[:start] + "".join(
        line.replace("  # ", "  ", 1) + "\n" for line in text[start:].splitlines()))
    config = load_config(config_path, environ={})
    assert set(config.legacy.tools) == {"kaapana-fem-adapter", "flcore-client"}
    assert config.legacy.tools["kaapana-fem-adapter"].env["FEM_TOKEN"] == "%%token%%"
    catalogue.check_catalogue(config)


def test_health_has_the_real_records_keys_and_formats(make_config, tmp_path):
    """The real records' keys ([NB] DT4HDemo2025 cell 30; docs/legacy.md, "The other actions")."""
    import re

    from fem_ansible.legacy.health import health
    from tests.support.secure_services import _certificates

    certs = _certificates(tmp_path)
    (tmp_path / "sb").mkdir()
    config = make_config(broker={"url": "amqps://127.0.0.1:5671/%2F",
                                 "tls": {"ca_file": str(certs["ca"]),
                                         "cert_file": str(tmp_path / "missing.pem")}},
                         legacy={"enabled": True, "sandbox_path": str(tmp_path / "sb")})
    h = health(config)
    assert set(h) == {"installation_check", "gpu_check", "paths_check", "resources_check",
                      "docker_images_installed", "pem_certificates"}
    assert h["installation_check"]["docker_version"].startswith("Docker version ")
    assert set(h["gpu_check"]) == {"gpu_detected", "message"}
    assert set(h["paths_check"]) == {"sandbox_path_exists", "data_path_exists",
                                     "sandbox_contents", "data_path_contents"}
    assert h["paths_check"]["sandbox_path_exists"] is True
    res = h["resources_check"]
    assert set(res) == {"CPU Count", "CPU Percent", "Memory Available", "Memory Total",
                        "GPU Count", "Has Internet"}
    assert re.fullmatch(r"\d+\.\d\d GB", res["Memory Available"])
    assert re.fullmatch(r"\d+\.\d\d GB", res["Memory Total"])
    assert isinstance(res["CPU Percent"], float)
    images = h["docker_images_installed"]["docker_images"]
    assert images and set(images[0]) == {"repository", "tag", "image_id", "sha256_digest"}
    ca = h["pem_certificates"]["ca.pem"]
    assert ca["status"] == "Valid"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", ca["expiry_date"])
    assert "error" in h["pem_certificates"]["missing.pem"]


def test_times_are_written_as_the_real_records():
    import re

    from fem_ansible.legacy.replies import event_legacy_time, legacy_time

    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", legacy_time())
    assert event_legacy_time({"ts": "2025-03-23T09:40:56.123Z"}) == "2025-03-23 09:40:56"


def test_per_node_parameters_server_and_own_node(site):
    """``{"server": {…}, "BSC": {…}, "UB": {…}}`` [NB]: a tool reads its sections, then
    this node's own; other nodes' are ignored."""
    from fem_ansible.legacy.taskinfo import user_params

    params = {"rounds": 1, "server": {"rounds": 5, "port": 8080}, "node-a": {"lr": 0.1},
              "UB": {"lr": 9}}
    assert user_params(params, "node-a") == {"rounds": 1, "lr": 0.1}
    assert user_params(params, "node-a", ["server"]) == {"rounds": 5, "port": 8080, "lr": 0.1}
    config = site({"srv": {"image": IMAGE, "params": ["server"],
                           "command": ["serve", "%%TASK_COMMAND%%"]}})
    command = {"base": "python3 server.py", "args": [
        {"id": "rounds", "prefix": "--rounds", "default_value": 1},
        {"id": "port", "prefix": "--port"}]}
    out = launch(config, msg({"_id": "srv", "command": command}, tool="srv",
                             params=repr(params)))
    assert out.task["command"] == ["serve", "python3", "server.py", "--rounds", "5",
                                   "--port", "8080"]
