"""fem.core's ``mitogen_linear`` strategy plugin: Mitogen's import scans kept between runs,
and only where nobody else can write."""

from __future__ import annotations

import importlib.util
import marshal
import types
from pathlib import Path

import pytest

from fem_ansible.runner import data_dir

PLUGIN = (data_dir() / "collections/ansible_collections/fem/core/plugins/strategy/"
          "mitogen_linear.py")
SOURCE = "import json\nfrom os import path\n"


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.ModuleType:
    """The plugin, loaded afresh (no scans in memory), with a private cache dir."""
    spec = importlib.util.spec_from_file_location("fem_test_mitogen_linear", PLUGIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache = tmp_path / "scans"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv(module.CACHE_ENV, str(cache))
    return module


def _names(code: types.CodeType) -> tuple[str, ...]:
    return code.co_names


def test_a_scan_is_kept_and_read_back_by_the_next_run(plugin, tmp_path: Path):
    code = plugin.cached_compile(SOURCE, "m.py", "exec")
    assert _names(code) == _names(compile(SOURCE, "m.py", "exec"))
    [entry] = (tmp_path / "scans").iterdir()
    # The next run (nothing in memory) reads the entry instead of compiling.
    plugin._scans.clear()
    marker = compile("import marker_only_in_the_cache\n", "m.py", "exec")
    entry.write_bytes(marshal.dumps(marker))
    assert "marker_only_in_the_cache" in _names(plugin.cached_compile(SOURCE, "m.py", "exec"))
    # Another source or file name is another entry.
    plugin.cached_compile(SOURCE, "n.py", "exec")
    plugin.cached_compile(SOURCE.encode() + b"import sys\n", "m.py", "exec")
    assert len(list((tmp_path / "scans").iterdir())) == 3


def test_a_damaged_entry_is_compiled_again_and_replaced(plugin, tmp_path: Path):
    plugin.cached_compile(SOURCE, "m.py", "exec")
    [entry] = (tmp_path / "scans").iterdir()
    entry.write_bytes(b"\xffnot marshal")
    plugin._scans.clear()
    assert "json" in _names(plugin.cached_compile(SOURCE, "m.py", "exec"))
    assert "json" in _names(marshal.loads(entry.read_bytes()))


@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_a_dir_others_can_write_is_not_used(plugin, tmp_path: Path, mode: int):
    cache = tmp_path / "scans"
    marker = compile("import planted\n", "m.py", "exec")
    plugin.cached_compile(SOURCE, "m.py", "exec")
    [entry] = cache.iterdir()
    entry.write_bytes(marshal.dumps(marker))
    cache.chmod(mode)
    plugin._scans.clear()
    assert "planted" not in _names(plugin.cached_compile(SOURCE, "m.py", "exec"))


def test_other_compiles_pass_through_untouched(plugin, tmp_path: Path):
    assert plugin.cached_compile("1 + 1", "e", "eval").co_filename == "e"
    plugin.cached_compile(SOURCE, "m.py", "exec", 0, True)
    assert not list((tmp_path / "scans").iterdir())


def test_mitogen_uses_the_cached_scans_and_sends_modules_unminified(plugin):
    import ansible_mitogen.module_finder
    import mitogen.master
    import mitogen.minify

    assert mitogen.master.compile is plugin.cached_compile
    assert ansible_mitogen.module_finder.compile is plugin.cached_compile
    assert mitogen.minify.minimize_source(b"x = 1  # kept\n") == "x = 1  # kept\n"
