"""fem.core's ``mitogen_linear`` strategy plugin: Mitogen's import scans kept between runs,
the same code objects ``compile`` gives, and only where nobody else can reach them."""

from __future__ import annotations

import builtins
import importlib.util
import marshal
import os
import types
from pathlib import Path

import ansible_mitogen.module_finder
import mitogen.master
import mitogen.minify
import pytest

from fem_ansible.runner import data_dir

PLUGIN = (data_dir() / "collections/ansible_collections/fem/core/plugins/strategy/"
          "mitogen_linear.py")
SOURCE = "import json\nfrom os import path\n"
# Valid Python that this test file (and the plugin: `from __future__ import annotations`)
# could not compile if its own future flags leaked into the compile.
WALRUS = "import json\ndef f(x: (y := 1)): pass\n"


def _compile(source: str | bytes, filename: str) -> types.CodeType:
    """What Mitogen's own ``compile(source, filename, "exec")`` gives (no future flags)."""
    return compile(source, filename, "exec", 0, True)


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.ModuleType:
    """The plugin, loaded afresh (no scans in memory), with a private cache dir; what it
    replaces in Mitogen is put back afterwards."""
    monkeypatch.setattr(mitogen.master, "compile", builtins.compile, raising=False)
    monkeypatch.setattr(ansible_mitogen.module_finder, "compile", builtins.compile,
                        raising=False)
    monkeypatch.setattr(mitogen.minify, "minimize_source", mitogen.minify.minimize_source)
    spec = importlib.util.spec_from_file_location("fem_test_mitogen_linear", PLUGIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache = tmp_path / "scans"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv(module.CACHE_ENV, str(cache))
    return module


def _reload(plugin: types.ModuleType) -> None:
    """As a new run: nothing in memory, the directory opened again."""
    plugin._scans.clear()
    plugin._dir_fd = plugin._UNOPENED


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.iterdir())


def test_the_code_is_what_compile_gives_and_is_read_back_by_the_next_run(plugin, tmp_path):
    cache = tmp_path / "scans"
    for source in (SOURCE, WALRUS, WALRUS.encode()):
        assert plugin.cached_compile(source, "m.py", "exec") == _compile(source, "m.py")
    # str and bytes of one text are two entries, as another file name would be
    assert len(_entries(cache)) == 3
    entry = next(p for p in _entries(cache)
                 if marshal.loads(p.read_bytes()) == _compile(SOURCE, "m.py"))
    assert entry.stat().st_mode & 0o777 == 0o600
    # The next run reads the entry instead of compiling.
    _reload(plugin)
    entry.write_bytes(marshal.dumps(_compile("import marker_only_in_the_cache\n", "m.py")))
    assert "marker_only_in_the_cache" in plugin.cached_compile(SOURCE, "m.py", "exec").co_names
    assert not [p for p in _entries(cache) if p.name.endswith(".tmp")]


def test_a_damaged_entry_is_compiled_again_and_replaced(plugin, tmp_path: Path):
    plugin.cached_compile(SOURCE, "m.py", "exec")
    [entry] = _entries(tmp_path / "scans")
    entry.write_bytes(b"\xffnot marshal")
    _reload(plugin)
    assert plugin.cached_compile(SOURCE, "m.py", "exec") == _compile(SOURCE, "m.py")
    assert marshal.loads(entry.read_bytes()) == _compile(SOURCE, "m.py")


def _plant(plugin, cache: Path) -> Path:
    """An entry for SOURCE that says it imports ``planted``."""
    plugin.cached_compile(SOURCE, "m.py", "exec")
    [entry] = _entries(cache)
    entry.write_bytes(marshal.dumps(_compile("import planted\n", "m.py")))
    _reload(plugin)
    return entry


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o755, 0o777])
def test_a_dir_others_may_enter_is_not_used(plugin, tmp_path: Path, mode: int):
    cache = tmp_path / "scans"
    _plant(plugin, cache)
    cache.chmod(mode)
    assert "planted" not in plugin.cached_compile(SOURCE, "m.py", "exec").co_names
    assert len(_entries(cache)) == 1  # and nothing is written there


def test_a_dir_reached_through_a_symlink_is_not_used(plugin, tmp_path: Path, monkeypatch):
    _plant(plugin, tmp_path / "scans")
    (tmp_path / "link").symlink_to(tmp_path / "scans")
    monkeypatch.setenv(plugin.CACHE_ENV, str(tmp_path / "link"))
    assert "planted" not in plugin.cached_compile(SOURCE, "m.py", "exec").co_names


@pytest.mark.parametrize("spoil", ["mode", "owner", "symlink"])
def test_an_entry_others_could_have_written_is_not_used(plugin, tmp_path: Path, spoil: str):
    entry = _plant(plugin, tmp_path / "scans")
    if spoil == "mode":
        entry.chmod(0o644)
    elif spoil == "owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file away")  # CI runs as root
        os.chown(entry, 65534, 65534)
    else:
        target = tmp_path / "elsewhere"
        target.write_bytes(entry.read_bytes())
        target.chmod(0o600)
        entry.unlink()
        entry.symlink_to(target)
    assert "planted" not in plugin.cached_compile(SOURCE, "m.py", "exec").co_names


def test_other_compiles_pass_through_untouched(plugin, tmp_path: Path):
    assert plugin.cached_compile("1 + 1", "e", "eval").co_filename == "e"
    plugin.cached_compile(SOURCE, "m.py", "exec", 0, True)
    assert not _entries(tmp_path / "scans")


def test_mitogen_uses_the_cached_scans_and_sends_modules_unminified(plugin):
    assert mitogen.master.compile is plugin.cached_compile
    assert ansible_mitogen.module_finder.compile is plugin.cached_compile
    assert mitogen.minify.minimize_source(b"x = 1  # kept\n") == "x = 1  # kept\n"
