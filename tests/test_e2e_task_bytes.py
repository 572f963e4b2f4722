"""Isolation by construction, through a real listener, broker, engine, registry, git daemon
and upload endpoint (issue 26), one test per reproduction: an image cannot choose the task
user's groups; a source checkout, and directories in the output, count against the site's
limits in blocks; a tree of any depth is archived and leaves nothing on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support import slurm
from tests.support.archives import tar_entries, tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.services import upload_requests

pytestmark = pytest.mark.e2e

EXECUTORS = {"executors": {"allow": ["docker", "podman", "slurm"]}}


def run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def groups_image(fem_env, tmp_path_factory) -> str:
    """An image whose user ``app`` (1000:1000) its /etc/group also lists in ``root`` (0),
    ``disk`` (6) and ``shadow`` (42): the busybox root filesystem as scripts/services.sh
    seeds it (``docker import``), pushed to the local registry."""
    rootfs = tmp_path_factory.mktemp("groups") / "rootfs"
    for sub in ("bin", "etc", "tmp", "fem"):
        (rootfs / sub).mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in run("/bin/busybox", "--list").split():
        if not (rootfs / "bin" / applet).exists():
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n"
                                           "app:x:1000:1000::/tmp:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:app\ndisk:x:6:app\nshadow:x:42:app\n"
                                          "app:x:1000:\n")
    tar = rootfs.parent / "rootfs.tar"
    run("tar", "--numeric-owner", "--owner=0", "--group=0", "-C", str(rootfs), "-cf", str(tar),
        ".")
    ref = f"{fem_env['FEM_TEST_REGISTRY']}/fem-test/groups:{uuid.uuid4().hex[:8]}"
    run("docker", "import", "--change", "USER app", "--change", "ENV PATH=/bin", str(tar), ref)
    run("docker", "push", ref)
    yield ref
    subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, check=False)
    if shutil.which("podman"):
        subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, check=False)


@pytest.fixture(params=["docker", "podman", "slurm"])
def executor(request, site):
    if request.param == "slurm":
        slurm.acquire()
        request.addfinalizer(slurm.release)
    return request.param


def test_the_image_does_not_choose_the_task_users_groups(site, executor, groups_image,
                                                          tmp_path):
    """(3) ``id -G`` in the task is its one gid, and a dataset file of mode 0640
    root:root stays unreadable, on docker, podman and Slurm."""
    env, orch = site.env, site.orchestrator
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.csv").write_text("only root and its group\n")
    os.chmod(private / "secret.csv", 0o640)
    os.chown(private / "secret.csv", 0, 0)
    tid = f"groups-{executor}"
    site.listener(site.config(
        policy={"limits": {"memory": "512Mi", "timeout_s": 600}, **EXECUTORS,
                "datasets": {"private": {"path": str(private)}}},
        execution={"podman": {"insecure_registries": [env["FEM_TEST_REGISTRY"]]}}))
    orch.publish(site.task(
        tid, source=None, executor=executor, image={"ref": groups_image},
        datasets=[{"name": "private", "mount": "/fem/data"}],
        command=["sh", "-c", "id -u > /fem/output/uid; id -G > /fem/output/groups;"
                 " cat /fem/data/secret.csv > /fem/output/secret 2>/dev/null;"
                 " echo $? > /fem/output/cat-rc"]))
    final = orch.wait_terminal(tid, timeout=300)
    assert final["state"] == "COMPLETED", final
    out = tar_members(uploaded_file(env, final["outputs"]["url"]))
    assert out["uid"] == b"1000\n" and out["groups"] == b"1000\n", out
    assert out["secret"] == b"" and out["cat-rc"] != b"0\n", out
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


@pytest.fixture
def big_repo(fem_env, tmp_path) -> str:
    """A repository served by the git daemon that checks out to 100 MiB of one line
    repeated (10 files) and packs to a few hundred KiB."""
    work = tmp_path / "big-work"
    work.mkdir()
    run("git", "init", "-q", "-b", "main", cwd=work)
    line = b"AAAAAAAAAAAAAAA\n"
    for i in range(10):
        (work / f"part{i}.txt").write_bytes(line * ((10 << 20) // len(line)))
    run("git", "add", ".", cwd=work)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "big", cwd=work)
    name = f"big-{uuid.uuid4().hex[:8]}.git"
    bare = Path(fem_env["FEM_TEST_GIT_DIR"]) / name
    run("git", "clone", "-q", "--bare", str(work), str(bare))
    shutil.rmtree(work)
    yield f"{fem_env['FEM_TEST_GIT_BASE_URL']}/{name}"
    shutil.rmtree(bare, ignore_errors=True)


def test_a_checkout_past_source_bytes_fails_limit_exceeded(site, big_repo):
    """(4) A 100 MiB checkout with ``source_bytes: 20Mi``: FAILED ``limit_exceeded`` with
    the figure, the task never ran, nothing left on the host."""
    orch = site.orchestrator
    tid = "big-source"
    site.listener(site.config(policy={"limits": {"memory": "512Mi", "timeout_s": 600,
                                                 "source_bytes": "20Mi"}}))
    orch.publish(site.task(tid, source={"repo": big_repo}, datasets=None,
                           command=["sh", "-c", "du -s /fem/src"]))
    final = orch.wait_terminal(tid, timeout=300)
    assert final["state"] == "FAILED", final
    assert final["error"]["code"] == "limit_exceeded", final
    assert "policy.limits.source_bytes" in final["error"]["message"], final
    assert "RUNNING" not in [e["state"] for e in orch.events(tid)]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_directories_count_against_output_bytes(site):
    """(5) 9,000 empty directories (no byte of file content) with ``output_bytes: 20Mi``:
    FAILED ``limit_exceeded``, nothing uploaded, nothing left on the host."""
    env, orch = site.env, site.orchestrator
    tid = "many-dirs"
    site.listener(site.config(policy={"limits": {"memory": "512Mi", "timeout_s": 600,
                                                 "output_bytes": "20Mi"}}))
    orch.publish(site.task(tid, source=None, datasets=None, command=[
        "sh", "-c", "cd /fem/output && seq 9000 | xargs mkdir"]))
    final = orch.wait_terminal(tid, timeout=300)
    assert final["state"] == "FAILED", final
    assert final["error"]["code"] == "limit_exceeded", final
    assert "policy.limits.output_bytes" in final["error"]["message"], final
    assert not [r for r in upload_requests(env)
                if r["path"].startswith(f"/{site.node}/{tid}/outputs")]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_a_tree_1100_deep_is_archived_and_leaves_nothing(site):
    """(6) 1,100 nested directories in /fem/output (past Python's recursion limit): the
    task COMPLETED with the whole tree in its archive, and nothing of it on the host."""
    env, orch = site.env, site.orchestrator
    tid = "deep-tree"
    site.listener()
    orch.publish(site.task(tid, source=None, datasets=None, command=[
        "sh", "-c", "p=d; i=1; while [ $i -lt 1100 ]; do p=$p/d; i=$((i+1)); done;"
                    " mkdir -p /fem/output/$p && echo leaf > /fem/output/$p/leaf"]))
    final = orch.wait_terminal(tid, timeout=300)
    assert final["state"] == "COMPLETED", final
    entries = tar_entries(uploaded_file(env, final["outputs"]["url"]))
    deepest = "/".join(["d"] * 1100) + "/leaf"
    assert entries[deepest].isfile() and entries[deepest].size == 5
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
