import pytest

from fem_ansible.errors import PolicyViolation, RejectedError
from fem_ansible.policy import check_addressing, decide
from fem_ansible.schema import read_task

IMAGE = "127.0.0.1:5000/fem/busybox:1"


def task_for(config, **extra):
    msg = {"schema": "fem.task/v1", "task_id": "t1", "image": {"ref": IMAGE}, **extra}
    return read_task(msg, default_executor=config.execution.default_executor,
                     default_target=config.execution.target,
                     resource_defaults=config.resource_defaults())


def test_allowed_task_gets_hardened_container_settings(make_config, tmp_path):
    config = make_config()
    d = decide(task_for(config, datasets=[{"name": "cohort", "mount": "/data"}]), config)
    assert d.datasets == [{"name": "cohort", "host_path": str(tmp_path / "data"),
                           "mount": "/data"}]
    p = d.policy
    assert p["user"] == "65534:65534" and p["network"] == "none"
    assert p["read_only"] is True and p["cap_drop"] == ["ALL"] and p["no_new_privileges"]
    assert p["pids"] == 256 and "mode=1777" in p["tmpfs"]["/tmp"]


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ({"image": {"ref": "docker.io/library/busybox"}}, "policy.images"),
        ({"source": {"repo": "https://github.com/x/y"}}, "policy.sources"),
        ({"inputs": [{"url": "http://10.0.0.1/x", "path": "x"}]}, "policy.downloads"),
        ({"outputs": {"upload": {"url": "http://127.0.0.1.evil.org:8089/x"}}}, "policy.uploads"),
        ({"datasets": [{"name": "other", "mount": "/d"}]}, "policy.datasets"),
        ({"network": "host"}, "policy.networks"),
        ({"target": "all"}, "policy.targets"),
        ({"executor": "podman"}, "policy.executors"),
        ({"resources": {"memory": "4Gi"}}, "policy.limits.memory"),
        ({"resources": {"gpus": 1}}, "policy.limits.gpus"),
        ({"resources": {"timeout_s": 999999}}, "policy.limits.timeout_s"),
    ],
)
def test_each_rule_refuses(make_config, extra, rule):
    config = make_config()
    with pytest.raises(PolicyViolation) as err:
        decide(task_for(config, **extra), config)
    assert err.value.rule == rule
    assert err.value.code == "policy_violation"


def test_require_digest(make_config):
    config = make_config(policy={"images": {"allow": ["127.0.0.1:5000/**"],
                                            "require_digest": True}})
    with pytest.raises(PolicyViolation, match="require_digest"):
        decide(task_for(config), config)
    pinned = f"127.0.0.1:5000/fem/busybox@sha256:{'b' * 64}"
    decide(task_for(config, image={"ref": pinned}), config)


def test_addressing(make_config):
    config = make_config()
    with pytest.raises(RejectedError) as err:
        check_addressing(task_for(config, node_id="site-b"), config)
    assert err.value.code == "wrong_node"
    with pytest.raises(RejectedError) as err:
        check_addressing(task_for(config, not_after="2020-01-01T00:00:00Z"), config)
    assert err.value.code == "expired"
    for not_after in ("tomorrow", ""):
        with pytest.raises(RejectedError) as err:
            check_addressing(task_for(config, not_after=not_after), config)
        assert err.value.code == "invalid_message"
        assert err.value.message.startswith("not_after: not an RFC 3339 time")
    check_addressing(task_for(config, node_id="site-a", not_after="2999-01-01T00:00:00Z"),
                     config)
