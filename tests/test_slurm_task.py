"""fem.core's Slurm pieces without a cluster: the container command line built from the
policy's settings, the env file, and the sbatch command line (issue 9)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "collections"))

from ansible_collections.fem.core.plugins.module_utils import container
from ansible_collections.fem.core.plugins.module_utils.slurm_job import JOB_SCRIPT
from ansible_collections.fem.core.plugins.modules import slurm_task


def params(**overrides):
    p = {k: v.get("default") for k, v in container.CONTAINER_OPTIONS.items()}
    p.update(name="fem-n1-t1", image="127.0.0.1:5000/fem/busybox:1", command=["sh", "-c", "x"],
             labels={"fem.node_id": "n1", "fem.task_id": "t1"},
             mounts=[{"type": "bind", "source": "/w/input", "target": "/fem/input",
                      "read_only": True},
                     {"type": "bind", "source": "/w/output", "target": "/fem/output",
                      "read_only": False}],
             tmpfs={"/tmp": "rw,size=64m,mode=1777"}, pids_limit=256, memory=128 << 20,
             cpus=1.5, log_bytes=1 << 20, env={"SECRET_LOOKING": "value"})
    p.update(overrides)
    return p


def test_run_argv_has_the_hardening_and_no_env_values():
    argv = container.run_argv("docker", params(), "65534:65534", env_file="/w/slurm/env")
    joined = " ".join(argv)
    for flag in ("--rm", "--read-only", "--cap-drop ALL", "--security-opt no-new-privileges",
                 "--pids-limit 256", f"--memory {128 << 20}b", f"--memory-swap {128 << 20}b",
                 "--cpus 1.500000000", "--network none", "--ipc private", "--user 65534:65534",
                 "--tmpfs /tmp:rw,size=64m,mode=1777", "--env-file /w/slurm/env",
                 "--label fem.node_id=n1", "--name fem-n1-t1",
                 "--mount type=bind,source=/w/input,target=/fem/input,readonly",
                 "--mount type=bind,source=/w/output,target=/fem/output "):
        assert flag in joined + " ", flag
    assert "value" not in joined and "--gpus" not in joined and "--privileged" not in joined
    # The image and its command come after "--": a command cannot add engine options.
    assert argv[argv.index("--") + 1:] == ["127.0.0.1:5000/fem/busybox:1", "sh", "-c", "x"]


def test_run_argv_gpus_and_podman():
    assert "--gpus" in container.run_argv("docker", params(gpus=2), "1:1")
    podman = container.run_argv("podman", params(gpus=1), "1:1")
    assert "nvidia.com/gpu=all" in podman and "nofile=1024:1024" in podman


def test_mount_paths_that_would_change_the_option_are_refused():
    bad = params(mounts=[{"type": "bind", "source": "/w/a,readonly=false", "target": "/x",
                          "read_only": True}])
    with pytest.raises(ValueError):
        container.run_argv("docker", bad, "1:1")


def test_env_file_is_private_and_refuses_line_breaks(tmp_path):
    path = tmp_path / "env"
    container.write_env_file(str(path), {"B": "2", "A": "x=y"})
    assert path.read_text() == "A=x=y\nB=2\n" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        container.write_env_file(str(path), {"A": "two\nlines"})


def sbatch(**overrides):
    p = {"name": "fem-n1-t1", "run_dir": "/w", "timeout": 3600, "stop_grace": 10, "cpus": 1.5,
         "memory": (1 << 30) + 1, "gpus": 0, "partition": None, "account": None, "qos": None}
    p.update(overrides)
    return slurm_task.SlurmTask(SimpleNamespace(params=p)).sbatch_argv()


def test_sbatch_maps_resources_and_site_settings():
    argv = sbatch()
    joined = " ".join(argv)
    assert "--job-name fem-n1-t1" in joined and "--cpus-per-task 2" in joined
    assert "--mem 1025M" in joined and "--time 63" in joined
    assert f"--export PATH={slurm_task.JOB_PATH}" in joined
    assert "--gres" not in joined and "--partition" not in joined and "--qos" not in joined
    assert argv[-2:] == ["/w/slurm/job.py", "/w/slurm"]
    site = " ".join(sbatch(gpus=2, partition="fem", account="acc", qos="high"))
    assert "--gres=gpu:2" in site and "--partition fem" in site
    assert "--account acc" in site and "--qos high" in site


def test_the_job_keeps_at_most_log_bytes_and_one_of_each_stream(tmp_path):
    """The job program itself (no cluster needed): a container writing far more than
    log_bytes leaves log_bytes + 1 bytes on the shared filesystem, the collection marks it."""
    (tmp_path / "job.py").write_text(JOB_SCRIPT)
    (tmp_path / "job.json").write_text(json.dumps({
        "run": ["sh", "-c", "yes | head -c 1000000; echo small >&2; exit 3"],
        "stop": ["true"], "env": {"PATH": slurm_task.JOB_PATH}, "log_bytes": 1000}))
    done = subprocess.run([sys.executable, str(tmp_path / "job.py"), str(tmp_path)],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 3
    assert (tmp_path / "stdout").read_bytes() == b"y\n" * 500 + b"y"
    assert (tmp_path / "stderr").read_bytes() == b"small\n"
    assert json.loads((tmp_path / "result.json").read_text())["exit_code"] == 3
    written, truncated = container.write_capped(
        container.file_chunks(str(tmp_path / "stdout")), str(tmp_path / "stdout.log"), 1000)
    assert truncated and written == 1000
