"""fem.core's ``run_dir`` module without Ansible: two runs making the same parent at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "collections"))

from ansible_collections.fem.core.plugins.modules import run_dir


class _Module:
    check_mode = False

    def fail_json(self, **kwargs):
        raise AssertionError(kwargs)


def test_a_parent_another_run_makes_meanwhile_is_taken_as_there(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """Seen in CI: two tasks starting at once on a new work dir, both making
    ``<work_dir>/tasks``; the loser failed with "File exists"."""
    parent, target = tmp_path / "tasks", tmp_path / "tasks" / "fem-n-t"
    mkdir = os.mkdir

    def other_run_first(path, mode=0o777):
        if path == str(parent):
            mkdir(path, 0o700)  # the other run, between this one's check and its mkdir
        mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", other_run_first)
    result = {"changed": False, "created": []}
    run_dir.ensure(_Module(), str(target), 0o750, result)
    assert target.is_dir() and result == {"changed": True, "created": [str(target)]}
    assert {p.stat().st_mode & 0o777 for p in (parent, target)} == {0o750}


def test_a_file_in_the_way_still_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "tasks"
    mkdir = os.mkdir

    def file_appears(path, mode=0o777):
        Path(path).write_text("not a dir")
        mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", file_appears)
    with pytest.raises(FileExistsError):
        run_dir.ensure(_Module(), str(target), 0o700, {"changed": False, "created": []})
