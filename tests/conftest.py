"""Shared fixtures: a site config in a temp dir, built from keyword overrides."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from fem_ansible.config import Config, load_config
from fem_ansible.fastpath import derived_cache
from fem_ansible.intake import Intake
from fem_ansible.runner import collections_view
from fem_ansible.targets import Targets
from tests.support.harness import Listener, Orchestrator, new_node_id, sample_task, site_config
from tests.support.services import ensure_services


@pytest.fixture(scope="session")
def fem_env():
    """The local services (dockerd, registry, git daemon, upload endpoint, RabbitMQ), started
    by the project's own script, and what they hold (``.fem-dev/env``)."""
    return ensure_services()


@pytest.fixture
def make_config(tmp_path):
    """``make_config(**sections)`` writes a config with a temp work dir and loads it."""

    def make(**overrides):
        data = {
            "node_id": "site-a",
            "listener_id": "l1",
            "execution": {"work_dir": str(tmp_path / "work")},
            "policy": {
                "images": {"allow": ["127.0.0.1:5000/**"]},
                "sources": {"allow": ["git://127.0.0.1:9418/**"]},
                "downloads": {"allow": ["http://127.0.0.1:8089/**"]},
                "uploads": {"allow": ["http://127.0.0.1:8089/**"]},
                "datasets": {"cohort": {"path": str(tmp_path / "data")}},
            },
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, environ={})

    return make


def intake_of(config: Config, work: Path) -> Intake:
    """The intake ``listen`` builds for ``config`` (its inventory read on first use), with
    the collections view under ``work``; signatures as the config says."""
    return Intake(config, Targets(config, collections_view(work)))


@pytest.fixture
def make_intake(tmp_path):
    """``make_intake(config)``: :func:`intake_of` in the test's temp dir."""
    return lambda config: intake_of(config, tmp_path / "intake")


@pytest.fixture
def site(tmp_path, fem_env):
    """A node with its own id, config, listener process and test orchestrator."""
    node_id = new_node_id()
    orch = Orchestrator(node_id)
    created: list[Listener] = []

    class Site:
        env = fem_env
        node = node_id
        orchestrator = orch
        work_dir = tmp_path / "work"
        listeners = created  # started by listener(), stopped at the end

        def task(self, task_id, **overrides):
            """The sample task, uploading under ``/<node id>/<task id>/``."""
            return sample_task(fem_env, task_id, prefix=node_id, **overrides)

        def config(self, **overrides):
            return site_config(tmp_path, fem_env, node_id, **overrides)

        def listener(self, config=None, name="listener.log", **kw):
            lst = Listener(config or self.config(), tmp_path / name, **kw)
            created.append(lst)
            return lst.start()

    yield Site()
    for lst in created:
        lst.stop()
    orch.close()


def _forget_derived_cache_dir() -> None:
    if derived_cache._dir_fd >= 0:
        os.close(derived_cache._dir_fd)
    derived_cache._dir_fd = derived_cache._UNOPENED


@pytest.fixture
def derived_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[Path]:
    """A private directory for fem.core's plugin_utils.derived_cache, opened afresh by its
    next use."""
    path = tmp_path / "derived-cache"
    path.mkdir(mode=0o700)
    monkeypatch.setenv(derived_cache.CACHE_ENV, str(path))
    monkeypatch.setattr(derived_cache, "_dir_fd", derived_cache._UNOPENED)
    yield path
    _forget_derived_cache_dir()


@pytest.fixture
def new_run() -> Callable[[], None]:
    """Makes fem.core's plugin_utils.derived_cache open its directory again, as a new run would."""
    return _forget_derived_cache_dir
