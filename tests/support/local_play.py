"""One playbook run on localhost through fem-ansible's runner (real ansible-runner, its
``ansible-playbook``, Mitogen's strategy), and what its tasks reported with ``set_stats``:
for tests of what a run's processes do, without a listener or broker."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fem_ansible.runner import (
    RunHooks,
    RunSpec,
    collections_view,
    run_playbook,
    scan_cache_dir,
)

REPO = Path(__file__).resolve().parents[2]


class _Reports(RunHooks):
    def __init__(self) -> None:
        self.reports: dict[str, Any] = {}

    def on_report(self, data: dict[str, Any]) -> None:
        self.reports.update(data)


def run_local_play(tmp_path: Path, playbook: str, plugins: dict[str, str],
                   off: str = "") -> dict[str, Any]:
    """Run ``playbook`` (its text) from ``tmp_path`` with the play-adjacent ``plugins``
    (``dir/file.py``: source), the fast path's groups ``off`` left out, and ``tmp_path/work``
    as the listener's work dir (its import-scan cache kept between calls); the run must
    succeed.  Returns what its tasks reported."""
    for name, source in plugins.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    (tmp_path / "play.yml").write_text(playbook)
    inventory = tmp_path / "hosts"
    inventory.write_text(f"localhost ansible_connection=local "
                         f"ansible_python_interpreter={sys.executable}\n")
    pdd = tmp_path / f"pdd-{off or 'all'}"
    pdd.mkdir(mode=0o700, exist_ok=True)
    work = tmp_path / "work"
    spec = RunSpec(
        private_data_dir=pdd, ident="local-play", playbook=tmp_path / "play.yml",
        inventory=inventory, limit="localhost", roles_path=[],
        collections=collections_view(work), scan_cache=scan_cache_dir(work),
        extravars={}, secrets={}, strategy="mitogen",
        env={"PYTHONPATH": str(REPO), "FEMCORE_FASTPATH_OFF": off})
    hooks = _Reports()
    result = run_playbook(spec, hooks, lambda: False)
    assert (result.status, result.rc) == ("successful", 0), result
    return hooks.reports
