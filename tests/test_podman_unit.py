"""The podman executor's pieces without podman (issue 6): the engine and TLS setting the
listener decides, and the ``podman create`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fem_ansible.policy import decide
from tests.test_policy import task_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "collections"))

from ansible_collections.fem.core.plugins.module_utils import container


@pytest.mark.parametrize(
    ("executor", "runtime", "engine"),
    [("docker", "docker", "docker"), ("podman", "docker", "podman"),
     ("slurm", "podman", "podman"), ("slurm", "docker", "docker"), ("site", "podman", "docker")],
)
def test_engine_follows_the_executor(make_config, executor, runtime, engine):
    config = make_config(
        execution={"slurm": {"runtime": runtime}},
        policy={"images": {"allow": ["127.0.0.1:5000/**"]},
                "executors": {"allow": ["docker", "podman", "slurm", "site"]}})
    assert decide(task_for(config, executor=executor), config).policy["engine"] == engine


def test_tls_is_off_only_for_the_sites_insecure_registries(make_config):
    allow = {"images": {"allow": ["127.0.0.1:5000/**", "registry.example.org/**"]},
             "executors": {"allow": ["podman"]}}
    config = make_config(execution={"podman": {"insecure_registries": ["127.0.0.1:5000"]}},
                         policy=allow)
    local = decide(task_for(config, executor="podman"), config).policy
    other = decide(task_for(config, executor="podman",
                            image={"ref": "registry.example.org/lab/x:1"}), config).policy
    assert local["podman"] == {"tls_verify": False} and other["podman"] == {"tls_verify": True}
    plain = make_config(policy=allow)
    assert decide(task_for(plain, executor="podman"), plain).policy["podman"]["tls_verify"]


def test_create_argv_keeps_the_hardening_and_no_rm():
    p = {k: v.get("default") for k, v in container.CONTAINER_OPTIONS.items()}
    p.update(name="fem-n1-t1", image="127.0.0.1:5000/fem/busybox:1", command=["sh", "-c", "x"],
             env={"K": "v"}, pids_limit=128, memory=1 << 27, cpus=0.5, log_bytes=1 << 20)
    argv = container.run_argv("podman", p, "65534:65534", env_file="/w/logs/.env", create=True)
    assert argv[:2] == ["podman", "create"] and "--rm" not in argv
    for flag in ("--read-only", "--pids-limit", "--memory", "--env-file", "--ulimit"):
        assert flag in argv
    assert argv[argv.index("--user") + 1] == "65534:65534"
    assert "K=v" not in " ".join(argv)
    assert argv[-4:] == ["127.0.0.1:5000/fem/busybox:1", "sh", "-c", "x"]
