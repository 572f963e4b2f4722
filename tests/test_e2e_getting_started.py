"""docs/getting-started.md, followed line by line from a freshly built wheel (issue 20).

Every command of the guide's ``sh`` blocks is run, in order, as root, in a fresh venv made
with Debian's python3 and the wheel built from this checkout.  What the test changes, and
why, is the table below; a guide line it does not know is run as written, so a new step in
the guide is a new step here.  The only other deviation is the guide's prose "edit the
policy": the test writes a policy allowing the test services.

- Paths: every fixed path of the guide (/opt, /etc, /usr/local/bin, and through
  install-service's options /var/lib, /var/log and the unit and logrotate dirs) moves under a
  temp dir, and the user ``fem`` gets a name of its own: tests share this machine.
- Names: the node id and broker URL are the test's (the real broker on 127.0.0.1).
- ``apt-get install``: checked with dpkg, not run (no index in tests; bootstrap.sh installs
  them).
- ``pip install fem-ansible``: the wheel, as the guide's comment allows, ``--no-compile``
  (byte-compiling Ansible is most of the install time); pip's cache is reused.
- ``systemctl daemon-reload && systemctl enable --now``: systemd is not PID 1 here, so the
  unit install-service wrote is started as systemd would: its ExecStart as its User and
  Group with the user's groups (without --metrics-port: another test may hold the port).

The guide's prose edits are made as it says: the policy, signatures on (mode hmac, a key
readable by the service's group), a task.json naming its node, and a new ``task_id`` before
``submit``.  docs/operating.md's Upgrades step 3 (``init`` of a fresh example) is run too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from fem_ansible.signatures import HEADER, sign_hmac
from tests.support.dists import build, checkout_after_demo
from tests.support.harness import AMQP_URL, REPO, site_config

pytestmark = [pytest.mark.e2e, pytest.mark.guide]

GUIDE = REPO / "docs" / "getting-started.md"
OPERATING = REPO / "docs" / "operating.md"


def guide_commands() -> list[str]:
    """The commands of the guide's ``sh`` blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), flags=re.S):
        commands += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return commands


class Node:
    """The machine the guide is followed on: its dirs under ``base``."""

    def __init__(self, base: Path, user: str, node_id: str, wheel: Path):
        self.base, self.user, self.node_id, self.wheel = base, user, node_id, wheel
        self.home = base / "home"  # the sysadmin's cwd, where task.json is
        self.home.mkdir()
        self.listener: subprocess.Popen[bytes] | None = None
        self.env = {"PATH": f"{base}/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8", "HOME": "/root", "NO_PROXY": "127.0.0.1,localhost",
                    "no_proxy": "127.0.0.1,localhost",
                    **({"PIP_CACHE_DIR": os.environ["PIP_CACHE_DIR"]}
                       if "PIP_CACHE_DIR" in os.environ else {})}

    def path(self, guide_path: str) -> str:
        return f"{self.base}{guide_path}"

    def adapt(self, command: str) -> str:
        b = self.base
        command = command.replace(
            "amqps://hospital-a:PASSWORD@broker.federation.example:5671/fem", AMQP_URL)
        command = command.replace("hospital-a", self.node_id)
        command = command.replace("/usr/local/bin/fem-ansible", f"{b}/bin/fem-ansible")
        for fixed in ("/opt/fem-ansible", "/etc/fem-ansible"):
            command = command.replace(fixed, self.path(fixed))
        command = command.replace("-u fem ", f"-u {self.user} ").replace(
            "root:fem ", f"root:{self.user} ")
        command = command.replace("pip install fem-ansible",
                                  f"pip install --no-compile {self.wheel}")
        if command == "fem-ansible install-service":
            command += (f" --user {self.user} --work-dir {b}/var/lib/fem-ansible"
                        f" --config-dir {b}/etc/fem-ansible --log-dir {b}/var/log/fem-ansible"
                        f" --unit-dir {b}/systemd --logrotate-dir {b}/logrotate.d")
        return command

    def sh(self, command: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=self.home,
                              env=self.env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done

    def start_unit(self) -> None:
        unit = (self.base / "systemd" / "fem-ansible.service").read_text()
        service = dict(re.findall(r"(?m)^(User|Group|ExecStart)=(.*)$", unit))
        environment = dict(e.split("=", 1) for e in re.findall(r"(?m)^Environment=(.*)$", unit))
        argv = shlex.split(service["ExecStart"])
        if "--metrics-port" in argv:
            at = argv.index("--metrics-port")
            del argv[at:at + 2]
        self.listener = subprocess.Popen(
            ["setpriv", f"--reuid={service['User']}", f"--regid={service['Group']}",
             "--init-groups", "--", *argv],
            env={**self.env, **environment, "HOME": self.path("/var/lib/fem-ansible")},
            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        log = Path(argv[argv.index("--log-file") + 1])
        deadline = time.monotonic() + 90
        while not (log.exists() and "connected to the broker" in log.read_text()):
            assert self.listener.poll() is None, self.listener.communicate()[0].decode()
            assert time.monotonic() < deadline, "the service did not connect"
            time.sleep(0.2)

    KEY = b"the orchestrator's key"

    def edit_policy(self, fem_env: dict[str, str], task: dict) -> None:
        """The guide's "edit the policy" and "turn on signatures": the test services, a
        dataset, the work dir that install-service made (the guide's is the default), an
        hmac key readable by the service's group; the task names its node (§4)."""
        config_path = Path(self.path("/etc/fem-ansible/config.yml"))
        config = yaml.safe_load(config_path.read_text())
        allowed = yaml.safe_load(site_config(self.base, fem_env, self.node_id).read_text())
        config["policy"] = allowed["policy"]
        config.setdefault("execution", {})["work_dir"] = self.path("/var/lib/fem-ansible")
        key = Path(self.path("/etc/fem-ansible/orchestrator.key"))
        key.write_bytes(self.KEY)
        shutil.chown(key, "root", self.user)
        key.chmod(0o640)
        config["security"] = {"signature": {"mode": "hmac", "key_file": str(key)}}
        config_path.write_text(yaml.safe_dump(config))
        self.write_task({**task, "node_id": self.node_id})

    def write_task(self, task: dict) -> None:
        (self.home / "task.json").write_text(json.dumps(task))
        (self.home / "task.json").chmod(0o644)


@pytest.fixture
def node(tmp_path, site):
    source = checkout_after_demo(tmp_path / "checkout")
    out = tmp_path / "dist"
    out.mkdir()
    _sdist, wheel = build(source, out)
    base = Path(tempfile.mkdtemp(prefix="fem-guide-", dir="/tmp"))
    base.chmod(0o755)  # the service user reaches the venv and the dirs below
    wheel = Path(shutil.copy(wheel, base))
    wheel.chmod(0o644)
    (base / "bin").mkdir()
    n = Node(base, f"femg{uuid.uuid4().hex[:8]}", site.node, wheel)
    yield n
    if n.listener is not None and n.listener.poll() is None:
        os.killpg(n.listener.pid, signal.SIGKILL)
        n.listener.wait(10)
    subprocess.run(["userdel", n.user], capture_output=True, check=False)
    subprocess.run(["groupdel", n.user], capture_output=True, check=False)
    shutil.rmtree(base, ignore_errors=True)


def test_getting_started_runs_as_written(node, site):
    task = site.task("guide-run")
    outputs: dict[str, str] = {}
    for command in guide_commands():
        if command.startswith("apt-get install "):
            packages = shlex.split(command.split("#")[0])[2:]
            status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status} ",
                                     *packages], capture_output=True, text=True)
            assert status.stdout.split() == ["installed"] * len(packages), status
            continue
        if command == "systemctl daemon-reload && systemctl enable --now fem-ansible":
            node.start_unit()
            continue
        if " doctor " in command:
            node.edit_policy(site.env, task)
        if " submit " in command:  # "give task.json a new task_id first"
            node.write_task({**task, "node_id": site.node, "task_id": "guide-submit"})
        done = node.sh(node.adapt(command))
        verb = re.search(r"fem-ansible ([a-z-]+)", command)
        if verb:
            outputs[verb.group(1)] = done.stdout

    assert {"install-service", "init", "doctor", "validate", "run", "submit",
            "tasks"} <= set(outputs)
    doctor = outputs["doctor"]
    assert "✗" not in doctor and "✓ policy:" in doctor and "✓ signatures: mode hmac" in doctor
    assert "valid: task guide-run" in outputs["validate"]
    ran = outputs["run"].splitlines()
    assert ran[-1].split()[1] == "COMPLETED", ran
    assert outputs["submit"].splitlines()[-1].split()[1] == "COMPLETED", outputs["submit"]
    listed = outputs["tasks"]
    assert "guide-run" in listed and "guide-submit" in listed and "COMPLETED" in listed

    # docs/operating.md, Upgrades step 3: a fresh example config to compare with
    (upgrade,) = re.findall(r"`(fem-ansible init [^`]*)`", OPERATING.read_text())
    node.sh(node.adapt(upgrade.replace("/tmp/x", f"{node.base}/tmp-x")))
    assert (node.base / "tmp-x" / "config.yml").is_file()

    # the service the guide started takes the orchestrator's tasks, signed
    body = json.dumps(site.task("guide-service", node_id=site.node)).encode()
    site.orchestrator.publish(body, {HEADER: sign_hmac(body, node.KEY)})
    assert site.orchestrator.wait_terminal("guide-service", timeout=300)["state"] == \
        "COMPLETED"
    assert node.listener is not None
    node.listener.send_signal(signal.SIGTERM)
    assert node.listener.wait(120) == 0
