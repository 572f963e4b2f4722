"""contrib/fem-ansible.service is a valid unit whose command line the CLI accepts."""

from __future__ import annotations

import shlex
import shutil
import subprocess

from click.testing import CliRunner

from fem_ansible.cli import main
from tests.support.harness import FEM, REPO

UNIT = REPO / "contrib" / "fem-ansible.service"


def exec_start() -> list[str]:
    (line,) = [x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_unit_verifies(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze (package systemd) is needed"
    unit = tmp_path / "fem-ansible.service"
    unit.write_text(UNIT.read_text().replace(exec_start()[0], FEM))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_unit_command_line_is_one_the_cli_takes():
    argv = exec_start()
    assert argv[0].endswith("/bin/fem-ansible") and argv[1] == "listen"
    result = CliRunner().invoke(main, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert {"--config", "--log-format", "--metrics-port"} <= set(argv)
