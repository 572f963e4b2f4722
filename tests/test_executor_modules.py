"""fem.core's executor modules on the real engine, run as Ansible runs a module (arguments in
a JSON file): a limit not above 0 is refused, never dropped; root written as ``00``, ``+0``,
``0:0`` or a name the image maps to uid 0 runs as the site's ``container_uid``; the engine's
log is capped; a container that fills its output dir while it runs is stopped with
``fem_error_code: limit_exceeded`` (issue 18)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

COLLECTIONS = Path(__file__).resolve().parents[1] / "collections"
MODULES = COLLECTIONS / "ansible_collections" / "fem" / "core" / "plugins" / "modules"
sys.path.insert(0, str(COLLECTIONS))

from ansible_collections.fem.core.plugins.module_utils import container  # noqa: E402

FALLBACK = "65534:65534"
PASSWD = ("root:x:0:0:root:/root:/bin/sh\ntoor:x:0:0::/:/bin/sh\n"
          "app:x:1000:1000::/:/bin/sh\n")
GROUP = "root:x:0:\nstaff:x:50:\napp:x:1000:\n"
LIMITS = {"pids_limit": 64, "memory": 64 << 20, "cpus": 0.5}


def params(**overrides: Any) -> dict[str, Any]:
    p = {k: v.get("default") for k, v in container.CONTAINER_OPTIONS.items()}
    p.update(name="fem-n1-t1", image="127.0.0.1:5000/fem/busybox:1", command=["true"],
             log_bytes=1 << 20, **LIMITS)
    p.update(overrides)
    return p


# -- limits ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("memory", 0), ("memory", -1), ("cpus", 0.0), ("cpus", 1e-10), ("cpus", math.nan),
    ("cpus", -2.0), ("pids_limit", 0), ("pids_limit", -1), ("memory", None)])
def test_a_limit_not_above_zero_is_refused_not_dropped(key, value):
    with pytest.raises(ValueError, match=key):
        container.run_argv("docker", params(**{key: value}), "1:1")
    with pytest.raises(ValueError, match=key):
        container.check_limits(params(**{key: value}))


def test_every_limit_and_the_log_cap_reach_the_command_line():
    argv = container.run_argv("podman", params(cpus=0.01, log_bytes=4 << 20), "1:1")
    joined = " ".join(argv)
    for flag in ("--pids-limit 64", f"--memory {64 << 20}b", "--cpus 0.010000000",
                 "--log-driver k8s-file", f"--log-opt max-size={8 << 20}"):
        assert flag in joined, flag
    assert "--log-driver json-file" in " ".join(container.run_argv("docker", params(), "1:1"))


# -- the user --------------------------------------------------------------------------------

@pytest.mark.parametrize("image_user, expected", [
    ("", FALLBACK), ("0", FALLBACK), ("00", FALLBACK), ("+0", FALLBACK), ("-0", FALLBACK),
    ("0:0", FALLBACK), ("000:1000", FALLBACK), ("root", FALLBACK), ("toor", FALLBACK),
    ("toor:app", FALLBACK), ("ghost", FALLBACK), ("app:ghost", FALLBACK), ("-5", FALLBACK),
    ("1000", "1000:1000"), ("+1000", "1000:1000"), ("01000:050", "1000:50"),
    ("app", "1000:1000"), ("app:staff", "1000:50"), ("1000:staff", "1000:50"),
    # The root group is never the task's: the fallback's gid instead.
    ("1000:0", "1000:65534"), ("app:root", "1000:65534"),
    # A uid the image does not list has no primary group there: the fallback's.
    ("4242", "4242:65534")])
def test_root_however_written_runs_as_the_fallback(image_user, expected):
    files = {"/etc/passwd": PASSWD, "/etc/group": GROUP}
    assert container.effective_user(image_user, FALLBACK, files) == expected
    assert container.needs_accounts(image_user) == (
        image_user not in ("", "0", "00", "+0", "-0", "0:0", "000:1000", "-5", "01000:050",
                           "1000:0"))


def test_a_name_in_an_image_without_account_files_runs_as_the_fallback():
    assert container.effective_user("app", FALLBACK, {}) == FALLBACK
    assert container.effective_user("app", FALLBACK, None) == FALLBACK


# -- on the real engine ---------------------------------------------------------------------

def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def toor_image(fem_env, tmp_path_factory) -> str:
    """An image whose user is ``toor``, a name its /etc/passwd maps to uid 0."""
    ctx = tmp_path_factory.mktemp("toor")
    (ctx / "passwd").write_text(PASSWD)
    (ctx / "group").write_text(GROUP)
    (ctx / "Dockerfile").write_text(
        f"FROM {fem_env['FEM_TEST_IMAGE']}\nCOPY passwd group /etc/\nUSER toor\n")
    tag = f"fem-test/toor:{uuid.uuid4().hex[:8]}"
    docker("build", "-q", "-t", tag, str(ctx))
    yield tag
    docker("rmi", "-f", tag, check=False)


def run_module(module: str, tmp_path: Path, **args: Any) -> tuple[int, dict[str, Any]]:
    argfile = tmp_path / f"args-{uuid.uuid4().hex[:6]}.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = {**os.environ, "PYTHONPATH": str(COLLECTIONS)}
    done = subprocess.run([sys.executable, str(MODULES / f"{module}.py"), str(argfile)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
def task(tmp_path: Path):
    """Arguments of one docker_task run in ``tmp_path`` (output/ bound rw), removed after."""
    name = f"fem-test-{uuid.uuid4().hex[:10]}"
    # The caller names the accounts reader (fem-ansible: naming.object_name), no module
    # derives it from the task's name.
    reader = f"fem-test-{uuid.uuid4().hex[:10]}"
    (tmp_path / "logs").mkdir()
    output = tmp_path / "output"
    output.mkdir(mode=0o777)
    output.chmod(0o777)

    def args(**overrides: Any) -> dict[str, Any]:
        base = {"name": name, "accounts_name": reader, "image": "127.0.0.1:5000/fem/busybox:1",
                "fallback_user": FALLBACK, "timeout": 120, "stop_grace": 1,
                "log_dir": str(tmp_path / "logs"), "log_bytes": 1 << 20,
                "mounts": [{"source": str(output), "target": "/fem/output",
                            "read_only": False}], **LIMITS}
        base.update(overrides)
        return base

    yield args
    docker("rm", "-f", name, reader, check=False)


def test_docker_a_name_mapped_to_uid_0_runs_as_the_fallback(toor_image, task, tmp_path):
    rc, result = run_module("docker_task", tmp_path, **task(image=toor_image,
                                                             command=["id", "-u"]))
    assert rc == 0, result
    assert result["user"] == FALLBACK and result["exit_code"] == 0
    assert (tmp_path / "logs" / "stdout.log").read_text().strip() == "65534"
    # The engine caps its own log of the container.
    log_config = json.loads(docker("inspect", "--format", "{{json .HostConfig.LogConfig}}",
                                   result["container_id"]).stdout)
    assert log_config == {"Type": "json-file", "Config": {"max-size": str(2 << 20)}}


@pytest.mark.skipif(not shutil.which("podman"), reason="needs podman")
def test_podman_a_name_mapped_to_uid_0_runs_as_the_fallback(fem_env, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "passwd").write_text(PASSWD)
    (ctx / "group").write_text(GROUP)
    (ctx / "Dockerfile").write_text(
        f"FROM {fem_env['FEM_TEST_IMAGE']}\nCOPY passwd group /etc/\nUSER toor\n")
    tag = f"localhost/fem-test/toor:{uuid.uuid4().hex[:8]}"
    name, leftover = (f"fem-test-{uuid.uuid4().hex[:10]}" for _ in range(2))
    subprocess.run(["podman", "build", "--tls-verify=false", "-q", "-t", tag, str(ctx)],
                   capture_output=True, check=True, timeout=300)
    (tmp_path / "logs").mkdir()
    try:
        rc, result = run_module("podman_task", tmp_path, name=name, accounts_name=leftover,
                                image=tag, command=["id", "-u"], fallback_user=FALLBACK,
                                timeout=120, log_dir=str(tmp_path / "logs"), log_bytes=1 << 20,
                                **LIMITS)
        assert rc == 0 and result["user"] == FALLBACK, result
        assert (tmp_path / "logs" / "stdout.log").read_text().strip() == "65534"
        # A leftover reader of the accounts (a killed run's) goes with the task's cleanup.
        subprocess.run(["podman", "create", "--name", leftover, "--entrypoint",
                        container.NEVER_STARTED, tag], capture_output=True, check=True)
        rc, result = run_module("podman_task", tmp_path, name=name, accounts_name=leftover,
                                image=tag, state="absent", log_dir=str(tmp_path / "logs"))
        assert rc == 0 and set(result["removed"]) == {name, leftover}, result
    finally:
        subprocess.run(["podman", "rm", "-f", name, leftover],
                       capture_output=True, check=False)
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, check=False)


def test_cli_account_files_read_the_image_through_the_docker_cli(toor_image):
    def stdout_or_none(argv):
        done = subprocess.run(argv, capture_output=True, check=False)
        return done.stdout if done.returncode == 0 else None

    reader = f"fem-test-{uuid.uuid4().hex[:10]}"
    # One a killed module left behind (no label) is replaced, then removed.
    docker("create", "--name", reader, "--entrypoint", container.NEVER_STARTED, toor_image)
    made = []

    def recording(argv):
        if argv[1] == "create":
            made.append(argv)
        return stdout_or_none(argv)

    files = container.cli_account_files(recording, "docker", toor_image, reader,
                                        {"fem.task_id": "t1"})
    assert files == {"/etc/passwd": PASSWD, "/etc/group": GROUP}
    assert container.effective_user("toor", FALLBACK, files) == FALLBACK
    (argv,) = made
    assert argv[argv.index("--name") + 1] == reader
    labels = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--label"]
    assert labels == ["fem.purpose=accounts", "fem.task_id=t1"]
    assert docker("ps", "-aq", "--filter", f"name={reader}").stdout == ""


def test_docker_cleanup_removes_the_accounts_container_a_killed_run_left(
        toor_image, task, tmp_path):
    """The never-started container that reads the image's accounts has the name it is given
    (accounts_name): one a killed module left behind is replaced by the next run and removed
    by the task's cleanup (state=absent), never left on the engine."""
    args = task(image=toor_image, command=["id", "-u"])
    leftover = args["accounts_name"]
    docker("create", "--name", leftover, "--entrypoint", container.NEVER_STARTED, toor_image)
    rc, result = run_module("docker_task", tmp_path, **args)
    assert rc == 0 and result["user"] == FALLBACK, result
    assert docker("ps", "-aq", "--filter", f"name={leftover}").stdout == ""
    docker("create", "--name", leftover, "--entrypoint", container.NEVER_STARTED, toor_image)
    rc, result = run_module("docker_task", tmp_path, **{**args, "state": "absent"})
    assert rc == 0 and set(result["removed"]) == {args["name"], leftover}, result
    assert docker("ps", "-aq", "--filter", f"name={args['name']}").stdout == ""


@pytest.mark.parametrize("limit", [{"memory": 0}, {"cpus": 1e-10}, {"pids_limit": 0}])
def test_docker_a_limit_of_zero_fails_before_any_container(fem_env, task, tmp_path, limit):
    args = task(**limit)
    rc, result = run_module("docker_task", tmp_path, **args)
    assert rc != 0 and result["failed"] and next(iter(limit)) in result["msg"]
    assert docker("inspect", args["name"], check=False).returncode != 0


def test_docker_output_over_the_limit_stops_the_container(fem_env, task, tmp_path):
    args = task(command=["sh", "-c", "dd if=/dev/zero of=/fem/output/fill bs=1M count=8 "
                                     "&& sleep 300"],
                watch_dirs=[str(tmp_path / "output")], watch_bytes=1 << 20,
                watch_interval=0.5)
    rc, result = run_module("docker_task", tmp_path, **args)
    assert rc != 0 and result["fem_error_code"] == "limit_exceeded", result
    assert result["output_bytes"] > 1 << 20
    state = json.loads(docker("inspect", "--format", "{{json .State}}", args["name"]).stdout)
    assert not state["Running"]


# -- user-namespace remapping, the site's option (examples/site/userns) ---------------------

USERNS = Path(__file__).resolve().parents[1] / "examples" / "site" / "userns"


def dockerd_reads(config: Path, scratch: Path) -> str:
    """What dockerd says of ``config`` when also given ``--userns-remap`` as a flag: it reads
    the file, then stops at the flag given twice, before it creates or starts anything."""
    done = subprocess.run(["dockerd", "--config-file", str(config), "--userns-remap=default",
                           "-H", f"unix://{scratch}/never.sock",
                           "--data-root", str(scratch / "never-data"),
                           "--pidfile", str(scratch / "never.pid")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    return done.stderr


@pytest.mark.skipif(not shutil.which("dockerd") or not shutil.which("podman"),
                    reason="needs dockerd and podman")
def test_the_documented_userns_configs_are_accepted(tmp_path):
    daemon = json.loads((USERNS / "daemon.json").read_text())
    assert daemon == {"userns-remap": "default"}
    said = dockerd_reads(USERNS / "daemon.json", tmp_path)
    assert "specified both as a flag and in the configuration file: userns-remap" in said
    wrong = tmp_path / "daemon.json"
    wrong.write_text(json.dumps({**daemon, "userns-remapping": "default"}))
    said = dockerd_reads(wrong, tmp_path)
    assert "don't match any configuration option: userns-remapping" in said
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("never")]

    def podman_reads(conf: Path) -> tuple[int, str]:
        done = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "CONTAINERS_CONF": str(conf)})
        return done.returncode, done.stderr

    assert podman_reads(USERNS / "containers.conf") == (0, "")
    wrong = tmp_path / "containers.conf"
    wrong.write_text("[containers]\nuserns = 5\n")
    rc, said = podman_reads(wrong)
    assert rc != 0 and "containers.userns" in said
    # fem's containers never opt out of the engine's remapping.
    for runtime in ("docker", "podman"):
        assert not [a for a in container.run_argv(runtime, params(), "1:1")
                    if a.startswith("--userns")]
