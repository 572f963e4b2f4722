import pytest

from fem_ansible.config import field_docs, load_config
from fem_ansible.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def test_defaults_follow_the_contract(tmp_path):
    config = load_config(write(tmp_path, "node_id: site-a\n"), environ={})
    assert config.broker.url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert config.broker.heartbeat_s == 60
    assert config.execution.max_parallel == 1
    assert config.execution.max_attempts == 3
    assert config.execution.keep_runs == 20
    assert config.execution.container_uid == 65534
    assert config.policy.targets.allow == ["localhost"]
    assert config.policy.executors.allow == ["docker"]
    assert config.policy.limits.memory == 2 * 1024**3
    assert config.policy.limits.log_bytes == 100 * 1024**2
    assert config.security.max_message_bytes == 1048576
    assert config.audit_file == config.work_dir / "audit.jsonl"
    assert config.resource_defaults() == {
        "cpus": 1.0,
        "memory": 2 * 1024**3,
        "gpus": 0,
        "timeout_s": 3600,
    }


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"policy\.images\.alow"):
        load_config(write(tmp_path, "node_id: a\npolicy:\n  images:\n    alow: []\n"), environ={})


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"execution.max_parallel: expected an integer"):
        load_config(write(tmp_path, "node_id: a\nexecution:\n  max_parallel: two\n"), environ={})


def test_missing_node_id(tmp_path):
    with pytest.raises(ConfigError, match="node_id"):
        load_config(write(tmp_path, "{}\n"), environ={})


def test_env_overrides_parse_yaml_and_are_scrubbed(tmp_path, monkeypatch):
    path = write(tmp_path, "node_id: a\n")
    monkeypatch.setenv("FEM_ANSIBLE_EXECUTION__MAX_PARALLEL", "4")
    monkeypatch.setenv("FEM_ANSIBLE_BROKER__URL", "amqp://u:secret@127.0.0.1:5672/%2F")
    monkeypatch.setenv("FEM_ANSIBLE_POLICY__IMAGES__ALLOW", "['127.0.0.1:5000/**']")
    config = load_config(path, scrub_environ=True)
    assert config.execution.max_parallel == 4
    assert config.policy.images.allow == ["127.0.0.1:5000/**"]
    assert config.broker.url.endswith("@127.0.0.1:5672/%2F")
    import os

    assert "FEM_ANSIBLE_BROKER__URL" not in os.environ


def test_config_variable_is_the_cli_option_not_an_override(tmp_path):
    config = load_config(write(tmp_path, "node_id: a\n"),
                         environ={"FEM_ANSIBLE_CONFIG": "/x.yml"})
    assert config.node_id == "a"


def test_other_programs_fem_variables_are_ignored(tmp_path):
    """Issue 20 item 4: FEM_HOME (another program's) once failed every command."""
    config = load_config(write(tmp_path, "node_id: a\n"),
                         environ={"FEM_HOME": "/opt/fem", "FEM_EXECUTION__MAX_PARALLEL": "9",
                                  "FEM_CONFIG": "/x.yml"})
    assert config.node_id == "a" and config.execution.max_parallel != 9


def test_env_override_of_unknown_key_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"^FEM_ANSIBLE_EXECUTION__MAX_PARALEL: .*"
                                          r"execution\.max_paralel"):
        load_config(write(tmp_path, "node_id: a\n"),
                    environ={"FEM_ANSIBLE_EXECUTION__MAX_PARALEL": "2"})
    with pytest.raises(ConfigError, match=r"^FEM_ANSIBLE_HOME: unknown config key 'home'"):
        load_config(write(tmp_path, "node_id: a\n"), environ={"FEM_ANSIBLE_HOME": "/x"})


def test_env_override_of_a_bad_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"^FEM_ANSIBLE_EXECUTION__MAX_PARALLEL: "
                                          r"execution\.max_parallel: expected an integer"):
        load_config(write(tmp_path, "node_id: a\n"),
                    environ={"FEM_ANSIBLE_EXECUTION__MAX_PARALLEL": "two"})
    # a dataset name is the site's choice: a key under a mapping field is not "unknown"
    config = load_config(write(tmp_path, "node_id: a\n"),
                         environ={"FEM_ANSIBLE_POLICY__DATASETS__SCANS": "{path: /data/scans}"})
    assert config.policy.datasets["scans"].path == "/data/scans"


def test_sizes_and_cross_field_rules(tmp_path):
    config = load_config(
        write(tmp_path, "node_id: a\npolicy:\n  limits:\n    memory: 512Mi\n"), environ={}
    )
    assert config.policy.limits.memory == 512 * 1024**2
    with pytest.raises(ConfigError, match=r"policy\.defaults\.memory"):
        load_config(
            write(
                tmp_path,
                "node_id: a\npolicy:\n  limits: {memory: 1Gi}\n  defaults: {memory: 2Gi}\n",
            ),
            environ={},
        )
    with pytest.raises(ConfigError, match="key_file"):
        load_config(
            write(tmp_path, "node_id: a\nsecurity:\n  signature: {mode: hmac}\n"), environ={}
        )


def test_every_leaf_is_documented():
    rows = field_docs()
    keys = {k for k, _, _ in rows}
    assert {
        "node_id",
        "broker.url",
        "policy.limits.pids",
        "policy.datasets.<name>.path",
        "registries.<name>.password_file",
        "legacy.chunk_size",
    } <= keys
    assert all(doc for _, _, doc in rows)


def test_empty_section_keeps_its_defaults(tmp_path):
    config = load_config(write(tmp_path, "node_id: a\npolicy:\n  targets:\n  executors:\n"),
                         environ={})
    assert config.policy.targets.allow == ["localhost"]
    assert config.policy.executors.allow == ["docker"]
