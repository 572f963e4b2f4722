"""What Ansible runs derive from installed files, kept between runs: read back by the next
run, derived again when damaged, and only where nobody else can reach it."""

from __future__ import annotations

import marshal
import os
from pathlib import Path

import pytest

from fem_ansible.fastpath import derived_cache

NAME = derived_cache.entry_name(b"test", b"input")


@pytest.fixture
def cache(derived_cache_dir: Path) -> Path:
    return derived_cache_dir


def _get(value: object = None) -> object:
    return derived_cache.cached(NAME, lambda: {"derived": value},
                                lambda v: isinstance(v, dict))


def test_names_hold_every_input_and_their_boundaries():
    name = derived_cache.entry_name
    names = {name(b"k", b"ab", b"c"), name(b"k", b"a", b"bc"), name(b"k2", b"ab", b"c"),
             name(b"k", b"ab", b"c", b"")}
    assert len(names) == 4
    assert name(b"k", b"ab") == name(b"k", b"ab")


def test_a_value_is_kept_private_and_read_back_by_the_next_run(cache: Path, new_run):
    assert _get(1) == {"derived": 1}
    entry = cache / NAME
    assert entry.stat().st_mode & 0o777 == 0o600
    assert marshal.loads(entry.read_bytes()) == {"derived": 1}
    new_run()
    assert _get(2) == {"derived": 1}  # read, not derived
    _get()["derived"] = "changed by its caller"  # as Ansible canonicalises routing
    assert _get() == {"derived": 1}
    assert [p.name for p in cache.iterdir()] == [NAME]  # no temp file left


@pytest.mark.parametrize("content", [b"\xffnot marshal", marshal.dumps(["not", "a dict"])])
def test_a_damaged_or_invalid_entry_is_derived_again_and_replaced(cache: Path, content: bytes,
                                                                  new_run):
    _get(1)
    (cache / NAME).write_bytes(content)
    new_run()
    assert _get(2) == {"derived": 2}
    assert marshal.loads((cache / NAME).read_bytes()) == {"derived": 2}


def _plant(cache: Path, new_run) -> Path:
    """An entry that says ``planted``, written as the listener would."""
    _get("planted")
    new_run()
    return cache / NAME


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o755, 0o777])
def test_a_dir_others_may_enter_is_not_used(cache: Path, mode: int, new_run):
    _plant(cache, new_run)
    cache.chmod(mode)
    assert _get("fresh") == {"derived": "fresh"}
    assert marshal.loads((cache / NAME).read_bytes()) == {"derived": "planted"}  # unwritten


def test_a_dir_reached_through_a_symlink_is_not_used(cache: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, new_run):
    _plant(cache, new_run)
    (tmp_path / "link").symlink_to(cache)
    monkeypatch.setenv(derived_cache.CACHE_ENV, str(tmp_path / "link"))
    assert _get("fresh") == {"derived": "fresh"}


@pytest.mark.parametrize("spoil", ["mode", "owner", "symlink", "directory"])
def test_an_entry_others_could_have_written_is_not_used(cache: Path, tmp_path: Path,
                                                        spoil: str, new_run):
    entry = _plant(cache, new_run)
    if spoil == "mode":
        entry.chmod(0o644)
    elif spoil == "owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file away")  # CI runs as root
        os.chown(entry, 65534, 65534)
    elif spoil == "symlink":
        target = tmp_path / "elsewhere"
        target.write_bytes(entry.read_bytes())
        target.chmod(0o600)
        entry.unlink()
        entry.symlink_to(target)
    else:
        entry.unlink()
        entry.mkdir(mode=0o700)
    assert _get("fresh") == {"derived": "fresh"}


def test_without_a_dir_or_with_a_value_marshal_cannot_keep_nothing_is_kept(
        cache: Path, monkeypatch: pytest.MonkeyPatch, new_run):
    assert derived_cache.cached(NAME, object, lambda v: True) is not None
    assert not list(cache.iterdir())
    monkeypatch.delenv(derived_cache.CACHE_ENV)
    new_run()
    assert _get(3) == {"derived": 3}
    assert not list(cache.iterdir())
