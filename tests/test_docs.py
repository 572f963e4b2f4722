"""The documents made from the code are current (a change that forgets them fails here),
the example config loads, and ``init`` writes a loadable site and overwrites nothing."""

from __future__ import annotations

import re

import yaml
from click.testing import CliRunner

from fem_ansible.cli import main
from fem_ansible.config import field_docs, load_config
from fem_ansible.docgen import OUTPUTS, example_config
from tests.support.harness import REPO


def test_generated_documents_are_current():
    stale = []
    for rel, make in OUTPUTS.items():
        current = (REPO / rel).read_text(encoding="utf-8")
        if current != make(current):
            stale.append(rel)
    assert not stale, f"run scripts/gen_docs.py: {stale} are stale"


def test_example_config_names_every_key_and_loads(tmp_path):
    text = example_config(node_id="site-x")
    for key, _default, _doc in field_docs():
        assert f" {key.rsplit('.', 1)[-1]}:" in text or text.count(f"\n{key}:"), key
    path = tmp_path / "config.yml"
    path.write_text(text)
    config = load_config(path, environ={})
    assert config.node_id == "site-x" and config.policy.targets.allow == ["localhost"]
    # uncommenting every section and every key with a default gives the default config
    assert load_config(_uncommented(text, tmp_path), environ={}) == config


def _uncommented(text: str, tmp_path):
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)# ([a-z_]+):( .*)?$", line)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        section = m and not m.group(3) and nxt.startswith(m.group(1) + "  ")
        leaf = m and m.group(3) and "…" not in m.group(3)
        out.append(f"{m.group(1)}{m.group(2)}:{m.group(3) or ''}" if section or leaf else line)
    path = tmp_path / "uncommented.yml"
    path.write_text("\n".join(out))
    data = yaml.safe_load(path.read_text())
    assert data["broker"]["url"] == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert data["policy"]["limits"]["memory"] == "2Gi"
    return path


def test_init_writes_a_site_and_overwrites_nothing(tmp_path):
    site = tmp_path / "etc"
    runner = CliRunner()
    done = runner.invoke(main, ["init", "--node-id", "hosp-a", "--dir", str(site),
                                "--work-dir", str(tmp_path / "work")])
    assert done.exit_code == 0, done.output
    config = load_config(site / "config.yml", environ={})
    assert config.node_id == "hosp-a"
    assert config.execution.inventory == str(site / "inventory.yml")
    assert (site / "config.yml").stat().st_mode & 0o077 == 0
    hosts = yaml.safe_load((site / "inventory.yml").read_text())["all"]["hosts"]
    assert hosts["localhost"]["ansible_connection"] == "local"

    (site / "inventory.yml").write_text("# the site's own\n")
    again = runner.invoke(main, ["init", "--node-id", "other", "--dir", str(site)])
    assert again.exit_code == 2 and "overwrites nothing" in again.output
    assert (site / "inventory.yml").read_text() == "# the site's own\n"
    assert load_config(site / "config.yml", environ={}).node_id == "hosp-a"
