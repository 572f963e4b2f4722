"""What ``fem.core.docker_task`` asks the engine for (issue 4): the hardening settings and
GPUs as device requests, checked on the module's pure settings builder (this machine has no
GPU; the running container's settings are checked by ``docker inspect`` in
tests/test_e2e_security.py)."""

from __future__ import annotations

import importlib
import sys

import pytest
from docker.types import HostConfig

from fem_ansible import policy
from fem_ansible.runner import data_dir

# The collection as Ansible finds it (ANSIBLE_COLLECTIONS_PATH): ``ansible_collections`` is a
# namespace package, so the repo's tree joins the one the ``ansible`` wheel installed.
sys.path.append(str(data_dir() / "collections"))
docker_task = importlib.import_module(
    "ansible_collections.fem.core.plugins.modules.docker_task")


def module_params(decided: dict, mounts: list[dict]) -> dict:
    """The parameters roles/fem_executor_docker/tasks/run.yml passes from ``fem_policy``."""
    return {"mounts": mounts, "read_only": decided["read_only"], "cap_drop": decided["cap_drop"],
            "no_new_privileges": decided["no_new_privileges"], "tmpfs": decided["tmpfs"],
            "pids_limit": decided["pids"], "memory": decided["memory"], "cpus": decided["cpus"],
            "gpus": decided["gpus"], "network_mode": decided["network"],
            "log_bytes": decided["log_bytes"]}


def engine_settings(params: dict) -> HostConfig:
    return HostConfig(version="1.41", **docker_task.host_config_kwargs(params))


@pytest.mark.parametrize("gpus", [0, 2])
def test_policy_gpus_become_device_requests(make_config, make_intake, gpus):
    config = make_config(policy={"limits": {"gpus": 2}})
    task = make_intake(config).read((
        '{"schema": "fem.task/v1", "task_id": "g", "image": {"ref": "127.0.0.1:5000/fem/x:1"},'
        f' "resources": {{"gpus": {gpus}, "memory": "1Gi", "cpus": 0.5}}}}').encode(), None)
    decided = task.decision.policy
    host = engine_settings(module_params(decided, []))
    if gpus:
        assert host["DeviceRequests"] == [{"Driver": "", "Count": 2, "DeviceIDs": [],
                                           "Capabilities": [["gpu"]], "Options": {}}]
    else:
        assert "DeviceRequests" not in host
    assert host["Memory"] == host["MemorySwap"] == 1024**3
    assert host["NanoCpus"] == 500_000_000


def test_every_hardening_setting_reaches_the_engine(make_config, make_intake):
    config = make_config()
    task = make_intake(config).read(b'{"schema": "fem.task/v1", "task_id": "h",'
                                    b' "image": {"ref": "127.0.0.1:5000/fem/x:1"}}', None)
    decided = task.decision.policy
    mounts = [{"type": "bind", "source": "/r/input", "target": "/fem/input", "read_only": True},
              {"type": "bind", "source": "/r/output", "target": "/fem/output",
               "read_only": False}]
    host = engine_settings(module_params(decided, mounts))
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert not host.get("Privileged") and host["IpcMode"] == "private"
    assert host["NetworkMode"] == "none" and host["PidsLimit"] == 256
    assert host["Tmpfs"] == {"/tmp": policy.TMPFS_OPTIONS}
    assert "PidMode" not in host and "UsernsMode" not in host and "Binds" not in host
    assert [(m["Target"], m["ReadOnly"]) for m in host["Mounts"]] == [
        ("/fem/input", True), ("/fem/output", False)]
    assert docker_task.effective_user("", decided["user"]) == "65534:65534"
    assert docker_task.effective_user("0:0", decided["user"]) == "65534:65534"
    assert docker_task.effective_user("1000", decided["user"]) == "1000:65534"
