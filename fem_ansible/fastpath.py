"""Which strategy the listener's runs get: fem.core's ``mitogen_linear`` only where every
private name of Mitogen and Ansible it patches has the shape it was written for.

Why: the fast path (fem.core's ``mitogen_linear`` and :mod:`fem_ansible.playbook_cli`)
replaces functions that are no API of Mitogen's or Ansible's; pyproject.toml pins the
versions they were written for, but a site may install others.  The listener checks once,
at start, in a subprocess (fem.core's ``plugin_utils/fastpath.py`` run as a script: the
listener itself does not import Ansible or Mitogen), and on a mismatch logs one warning
and gives its runs Mitogen's own ``mitogen_linear`` (or stock ``linear`` if Mitogen cannot
run on the installed Ansible) instead of failing tasks (docs/decisions.md).

Also the one place that loads the collection's ``plugin_utils`` (and standard-library
``module_utils``) modules for fem-ansible's own code: the collection never imports this
package, this package may import it.

Standard library only at import: :mod:`fem_ansible.playbook_cli` imports this into every
``ansible-playbook`` the listener starts.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

#: fem.core's strategy plugin; Mitogen's own, from its plugin dir.
FEM_STRATEGY = "fem.core.mitogen_linear"
MITOGEN_STRATEGY = "mitogen_linear"
_PLUGINS = "collections/ansible_collections/fem/core/plugins"
_PLUGIN_UTILS = f"{_PLUGINS}/plugin_utils"
_PACKAGE = "ansible_collections.fem.core.plugins"


def data_dir() -> Path:
    """Where playbooks, roles, inventory and collections are: inside the installed package
    (wheel), else the source checkout this package sits in."""
    packaged = Path(__file__).resolve().parent / "_data"
    return packaged if (packaged / "playbooks").is_dir() else Path(__file__).resolve().parent.parent


def plugin_utils(name: str, kind: str = "plugin_utils") -> ModuleType:
    """fem.core's ``<kind>.<name>`` (``plugin_utils`` or ``module_utils``; modules of the
    standard library only), loaded by path under its collection name, so that a process
    holds one copy whether the plugin (through Ansible's collection loader, which finds it
    in ``sys.modules``) or fem-ansible loads it first."""
    fullname = f"{_PACKAGE}.{kind}.{name}"
    module = sys.modules.get(fullname)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            fullname, data_dir() / _PLUGINS / kind / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[fullname]
            raise
    return module


derived_cache = plugin_utils("derived_cache")
patches = plugin_utils("fastpath")


def _check() -> dict[str, str]:
    """Run the check, log what it found (one warning at most), and return the environment
    that selects the runs' strategy."""
    try:
        done = subprocess.run([sys.executable, "-P", str(data_dir() / _PLUGIN_UTILS /
                                                         "fastpath.py")],
                              capture_output=True, text=True, cwd="/", timeout=120,
                              check=True)
        report = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("fast path off: its start-up check did not run (%s); runs use stock "
                    "Ansible's linear strategy", exc)
        return {}
    if report["mitogen"] is None:
        log.warning("fast path off: Mitogen cannot run here (%s); runs use stock Ansible's "
                    "linear strategy%s", report["error"],
                    f"; also missing: {', '.join(report['missing'])}"
                    if report["missing"] else "")
        return {}
    if set(report["groups"]) & set(patches.STRATEGY):
        log.warning("%s; runs use Mitogen's own %s", patches.warning(report["missing"]),
                    MITOGEN_STRATEGY)
        return {"ANSIBLE_STRATEGY": MITOGEN_STRATEGY,
                "ANSIBLE_STRATEGY_PLUGINS": report["mitogen"]}
    if report["missing"]:
        log.warning("%s; runs go without %s (slower, not different)",
                    patches.warning(report["missing"]), ", ".join(report["groups"]))
    return {"ANSIBLE_STRATEGY": FEM_STRATEGY}


class _Check(threading.Thread):
    """The check, run once per process, beside the listener's start."""

    def __init__(self) -> None:
        super().__init__(name="fastpath-check", daemon=True)
        self.env: dict[str, str] = {}

    def run(self) -> None:
        self.env = _check()


@functools.cache
def start_check() -> _Check:
    """Start the check (once per process) without waiting for it: the listener calls this
    as it starts, so its one warning, if any, is logged then."""
    check = _Check()
    check.start()
    return check


def mitogen_env() -> dict[str, str]:
    """The environment that gives a run ``execution.strategy: mitogen``: fem.core's
    ``mitogen_linear`` if the check passed, else Mitogen's own, else none (``linear``)."""
    check = start_check()
    check.join()
    return dict(check.env)
