"""The command line as a sysadmin meets it on day two (issue 20): help, environment,
errors that say what to do."""

from __future__ import annotations

from click.testing import CliRunner

from fem_ansible.cli import main


def test_help_names_the_config_variable():
    runner = CliRunner()
    assert "FEM_ANSIBLE_CONFIG" in runner.invoke(main, ["--help"]).output
    for command in ("listen", "run", "doctor", "tasks", "submit", "cancel"):
        shown = runner.invoke(main, [command, "--help"])
        assert shown.exit_code == 0 and "FEM_ANSIBLE_CONFIG" in shown.output, command


def test_config_variable_chooses_the_config_and_other_fem_variables_do_not_matter(
        make_config, tmp_path):
    make_config()
    env = {"FEM_ANSIBLE_CONFIG": str(tmp_path / "config.yml"), "FEM_HOME": "/opt/fem"}
    done = CliRunner().invoke(main, ["tasks"], env=env)
    assert done.exit_code == 0, done.output
    bad = CliRunner().invoke(main, ["tasks"], env={**env, "FEM_ANSIBLE_HOME": "/x"})
    assert bad.exit_code == 2 and "FEM_ANSIBLE_HOME: unknown config key 'home'" in bad.output
