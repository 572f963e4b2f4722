"""Every built-in role says in its README what it takes, what it reports and what a site may
replace (issue 27), and names each of its settings, so a setting added to a role's defaults
is not missing from the page a site reads first."""

from __future__ import annotations

import pytest
import yaml

from tests.support.harness import REPO

ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if (p / "tasks").is_dir())


@pytest.mark.parametrize("role", ROLES)
def test_the_role_has_a_readme_naming_its_settings_and_reports(role):
    readme = REPO / "roles" / role / "README.md"
    assert readme.is_file(), f"roles/{role} has no README.md"
    text = readme.read_text(encoding="utf-8")
    for heading in ("## What it takes", "## What a site may replace"):
        assert heading in text, f"roles/{role}/README.md: no {heading!r}"
    defaults = yaml.safe_load((REPO / "roles" / role / "defaults/main.yml").read_text()) or {}
    missing = [name for name in defaults if f"`{name}`" not in text]
    assert not missing, f"roles/{role}/README.md does not name the settings {missing}"
    reports = {key for path in (REPO / "roles" / role / "tasks").glob("*.yml")
               for task in yaml.safe_load(path.read_text()) or []
               for key in task.get("ansible.builtin.set_stats", {}).get("data", {})}
    missing = sorted(name for name in reports if f"`{name}`" not in text)
    assert not missing, f"roles/{role}/README.md does not name the reports {missing}"
