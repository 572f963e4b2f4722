import json
from pathlib import Path

from click.testing import CliRunner

from fem_ansible.cli import main
from fem_ansible.schema import SCHEMAS

REPO = Path(__file__).resolve().parent.parent


def test_schema_prints_the_schemas_the_validator_uses():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == SCHEMAS


def test_repo_copy_of_the_schemas_is_current():
    for sid, doc in SCHEMAS.items():
        path = REPO / "schemas" / (sid.replace("/", ".") + ".json")
        assert json.loads(path.read_text()) == doc, f"regenerate {path.name}"


def test_validate_exit_codes(make_config, tmp_path):
    config = make_config()
    cfg_path = tmp_path / "config.yml"
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"schema": "fem.task/v1", "task_id": "t",
                                "image": {"ref": "127.0.0.1:5000/fem/busybox:1"}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "fem.task/v1", "task_id": "t",
                               "image": {"ref": "docker.io/library/busybox"}}))
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", "--config", str(cfg_path), str(good)])
    assert ok.exit_code == 0 and "valid" in ok.output and config.node_id in ok.output
    refused = runner.invoke(main, ["validate", "--config", str(cfg_path), str(bad)])
    assert refused.exit_code == 3 and "policy.images" in refused.output
    missing = runner.invoke(main, ["validate", "--config", str(tmp_path / "no.yml"), str(good)])
    assert missing.exit_code == 2 and "config error" in missing.output


def test_a_missing_collection_stops_listen_and_run_as_a_config_error(make_config, tmp_path):
    make_config(execution={"work_dir": str(tmp_path / "work"), "collections": ["nosuch.thing"]})
    cfg_path = tmp_path / "config.yml"
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"schema": "fem.task/v1", "task_id": "t",
                                "image": {"ref": "127.0.0.1:5000/fem/busybox:1"}}))
    runner = CliRunner()
    for args in (["listen"], ["run", str(task)]):
        result = runner.invoke(main, [*args, "--config", str(cfg_path)])
        assert result.exit_code == 2, (args, result.output)
        assert "config error: execution.collections: collection nosuch.thing" in result.output
