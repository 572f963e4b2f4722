"""Names by construction (issue 26): naming.object_name is injective over the exact
``(node_id, task_id, purpose, item)`` within the schema's patterns, and every name it makes
is valid for Docker, podman, Slurm and the file system; fem_run lays out each executor's
mounts from those names; processes are selected by exact markers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fem_ansible import naming, runner
from fem_ansible.fastpath import data_dir
from fem_ansible.schema import NAME_PATTERN, NODE_ID_PATTERN, TASK_ID_PATTERN

sys.path.insert(0, str(data_dir() / "collections"))
from ansible_collections.fem.core.plugins.module_utils import container

ROLES = data_dir() / "roles"
# Docker's rule for container and volume names (daemon/names: RestrictedNamePattern);
# podman's is the same.
ENGINE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# Directory entries: at most 255 bytes, never "." or "..", no "/".
NAME_BYTES_MAX = 255


def ids(pattern: str) -> st.SearchStrategy[str]:
    r"""Ids matching the schema's ``pattern`` (its ``$`` read as ``\Z``, as the validator
    does)."""
    return st.from_regex(pattern.removesuffix("$") + r"\Z", fullmatch=True)


# Few letters, many separators: ids whose joins with "-" meet, as in the reproductions.
def joinable(first: str = "ab", rest: str = "ab_-") -> st.SearchStrategy[str]:
    return st.from_regex(rf"\A[{first}][{rest}]{{0,5}}\Z", fullmatch=True)


NODES = st.one_of(joinable(), ids(NODE_ID_PATTERN))
TASKS = st.one_of(joinable(), ids(TASK_ID_PATTERN))
ITEMS = st.one_of(joinable(rest="ab_.-"), ids(NAME_PATTERN))
OBJECTS = st.one_of(
    st.tuples(NODES, TASKS, st.sampled_from([naming.TASK, naming.ACCOUNTS]), st.none()),
    st.tuples(NODES, TASKS, st.just(naming.SCRATCH), ITEMS),
)


def old_name(node: str, task: str, purpose: str, item: str | None) -> str:
    """The rule before issue 26: ids and names joined with "-"."""
    return "-".join(["fem", node, task] + ({naming.TASK: [], naming.ACCOUNTS: ["accounts"]}
                                            [purpose] if item is None else [item]))


@settings(max_examples=300, deadline=None)
@given(st.lists(OBJECTS, unique=True, min_size=2, max_size=40))
@example([("n", "vic", naming.ACCOUNTS, None), ("n", "vic-accounts", naming.TASK, None)])
@example([("n", "s1", naming.SCRATCH, "x-y"), ("n", "s1-x", naming.SCRATCH, "y")])
# Two nodes sharing one engine (and one work dir on a host).
@example([("a", "b-c", naming.TASK, None), ("a-b", "c", naming.TASK, None)])
@example([("a", "b", naming.SCRATCH, "c"), ("a", "b-scratch", naming.SCRATCH, "c"),
          ("a", "b", naming.SCRATCH, "c.d"), ("a", "b", naming.SCRATCH, "c_d")])
def test_no_two_objects_share_a_name(objects):
    names = [naming.object_name(*o) for o in objects]
    assert len(set(names)) == len(objects)
    for name in names:
        assert naming.NAME_PATTERN.fullmatch(name) and ENGINE_NAME.fullmatch(name), name


def test_the_reproduced_collisions_are_the_old_rule_s():
    """The examples above do collide under the old rule (so the property test covers them)."""
    assert old_name("n", "vic", naming.ACCOUNTS, None) == old_name("n", "vic-accounts",
                                                                   naming.TASK, None)
    assert old_name("n", "s1", naming.SCRATCH, "x-y") == old_name("n", "s1-x", naming.SCRATCH,
                                                                  "y")
    assert old_name("a", "b-c", naming.TASK, None) == old_name("a-b", "c", naming.TASK, None)


@pytest.mark.parametrize("purpose, item", [(naming.TASK, None), (naming.ACCOUNTS, None),
                                           (naming.SCRATCH, "s" * 64)])
def test_the_longest_ids_make_a_name_every_engine_and_file_system_takes(purpose, item,
                                                                        tmp_path):
    name = naming.object_name("n" * 64, "t" * 128, purpose, item)
    assert len(name) <= naming.NAME_MAX <= NAME_BYTES_MAX
    assert ENGINE_NAME.fullmatch(name) and "." not in name and "/" not in name
    # Readable: it starts as the ids do, and ends in the fixed-length digest.
    assert name.startswith("fem-nnnn")
    assert re.fullmatch(rf"[0-9a-f]{{{naming.DIGEST_HEX}}}", name.rsplit("-", 1)[1])
    (tmp_path / name).mkdir()


def test_a_short_name_keeps_the_ids_readable():
    assert naming.object_name("node1", "task42", naming.TASK).startswith("fem-node1-task42-")
    assert naming.object_name("node1", "task42", naming.ACCOUNTS).startswith(
        "fem-node1-task42-accounts-")
    assert naming.object_name("node1", "t", naming.SCRATCH, "a.b").startswith(
        "fem-node1-t-scratch-a_b-")


def test_the_purpose_labels_are_the_purposes_of_the_names():
    """fem.core stamps fem.purpose on what it creates (it runs on hosts, without
    fem_ansible): the same words as the names'."""
    assert (container.TASK_PURPOSE, container.ACCOUNTS_PURPOSE) == (naming.TASK,
                                                                    naming.ACCOUNTS)
    scratch = yaml.safe_load((ROLES / "fem_volumes/tasks/scratch.yml").read_text())
    assert scratch[0]["community.docker.docker_volume"]["labels"][
        container.PURPOSE_LABEL] == naming.SCRATCH


def test_an_unknown_purpose_is_refused():
    with pytest.raises(ValueError, match="purpose"):
        naming.object_name("n", "t", "volume")


def test_the_engine_takes_the_longest_names(fem_env):
    """Docker creates a volume and a container under the longest names the rule makes."""
    node = "n" + uuid.uuid4().hex[:8] + "n" * 55
    volume = naming.object_name(node, "t" * 128, naming.SCRATCH, "s" * 64)
    container = naming.object_name(node, "t" * 128, naming.ACCOUNTS)
    try:
        subprocess.run(["docker", "volume", "create", volume], capture_output=True, check=True)
        subprocess.run(["docker", "create", "--name", container, "--network", "none",
                        fem_env["FEM_TEST_IMAGE"], "true"], capture_output=True, check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True,
                       check=False)


# -- fem_run ---------------------------------------------------------------------------------

def task(**overrides):
    base = {"task_id": "t1", "source": {"mount": "/fem/src"},
            "outputs": {"path": "/out"}, "scratch": [{"name": "x", "mount": "/x"}]}
    return {**base, **overrides}


DATASETS = [{"name": "cohort", "host_path": "/data/cohort", "mount": "/fem/data"}]


def fem_run(executor: str, engine: str, **overrides):
    return naming.fem_run("n1", task(**overrides), {"executor": executor, "engine": engine},
                          DATASETS, host_work_dir="/w", attempt=2, local_dir="/l")


def test_fem_run_names_and_mounts_on_docker():
    run = fem_run("docker", "docker")
    name = naming.object_name("n1", "t1", naming.TASK)
    volume = naming.object_name("n1", "t1", naming.SCRATCH, "x")
    assert run["name"] == name and run["dir"] == f"/w/tasks/{name}"
    assert run["accounts_container"] == naming.object_name("n1", "t1", naming.ACCOUNTS)
    assert (run["attempt"], run["local_dir"]) == (2, "/l")
    assert run["scratch"] == [{"name": "x", "mount": "/x", "dir": f"/w/tasks/{name}/scratch/x",
                               "volume": volume}]
    assert run["mounts"] == [
        {"type": "bind", "source": f"/w/tasks/{name}/input", "target": "/fem/input",
         "read_only": True},
        {"type": "bind", "source": f"/w/tasks/{name}/src", "target": "/fem/src",
         "read_only": True},
        {"type": "bind", "source": f"/w/tasks/{name}/output", "target": "/out",
         "read_only": False},
        {"type": "bind", "source": "/data/cohort", "target": "/fem/data", "read_only": True},
        {"type": "volume", "source": volume, "target": "/x", "read_only": False},
    ]


@pytest.mark.parametrize("executor, engine", [("podman", "podman"), ("slurm", "docker"),
                                              ("slurm", "podman")])
def test_podman_and_slurm_bind_the_scratch_dir(executor, engine):
    run = fem_run(executor, engine, source=None)
    (scratch,) = run["scratch"]
    assert scratch["volume"] is None
    assert run["mounts"][-1] == {"type": "bind", "source": scratch["dir"], "target": "/x",
                                 "read_only": False}
    assert "/fem/src" not in [m["target"] for m in run["mounts"]]  # no source, no mount


# -- process markers -------------------------------------------------------------------------

def marked(marker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env={**os.environ, "FEM_JOB_ID": marker})


def test_processes_are_selected_by_their_exact_marker():
    """A task's processes are those of its name's runs, never those of a task whose name
    starts like it; a run's are its own, never another attempt's."""
    tag = uuid.uuid4().hex[:8]
    procs = {m: marked(m) for m in (f"n-{tag}-vic.a1", f"n-{tag}-vic.a1-cleanup",
                                    f"n-{tag}-vic.a10", f"n-{tag}-vic-accounts.a1",
                                    f"n-{tag}-vicx.a1")}
    try:
        runner.kill_processes(f"n-{tag}-vic.a1")
        procs[f"n-{tag}-vic.a1"].wait(5)
        alive = {m for m, p in procs.items() if p.poll() is None}
        assert alive == set(procs) - {f"n-{tag}-vic.a1"}
        runner.kill_task_processes(f"n-{tag}-vic")
        procs[f"n-{tag}-vic.a1-cleanup"].wait(5)
        procs[f"n-{tag}-vic.a10"].wait(5)
        alive = {m for m, p in procs.items() if p.poll() is None}
        assert alive == {f"n-{tag}-vic-accounts.a1", f"n-{tag}-vicx.a1"}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()

