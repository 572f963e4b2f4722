# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""What fem.core's ``mitogen_linear`` runs in a host interpreter that is the controller's
own, before anything else, so that it imports Ansible from the installed files only where
those are the controller's (docs/decisions.md, "the listener's own host imports Ansible
from its installed files").

It runs in the host, which starts with Mitogen's import policy (everything of Ansible's from
the multiplexer) and keeps it unless the check passes: the multiplexer cannot see the
host's import path (its first entry is the host's working directory), and only the host can
set what the contexts it connects to itself (``become``, ``mitogen_via``) are told.  The
host imports this module from the multiplexer (``ansible_collections`` is always served
from there), so nothing in the host's working directory can stand in for it.
"""

from __future__ import annotations

import importlib.machinery
import sys

import mitogen.core
import mitogen.parent


def import_from_disk(origins: dict[str, str]) -> bool:
    """Import the packages of ``origins`` (name: the controller's ``__init__.py``) from
    disk if each resolves here to the controller's file, instead of fetching them from the
    multiplexer; contexts this one starts are still sent them (they may run another
    interpreter, user or environment).  True if they are now imported from disk."""
    here = {name: importlib.machinery.PathFinder.find_spec(name) for name in origins}
    if not all(spec is not None and spec.origin == origins[name]
               for name, spec in here.items()):
        return False
    _send_to_children(tuple(origins))
    _importer().policy.overrides.difference_update(origins)
    return True


def _importer() -> mitogen.core.Importer:
    return next(f for f in sys.meta_path if isinstance(f, mitogen.core.Importer))


def _send_to_children(prefixes: tuple[str, ...]) -> None:
    config_of = mitogen.parent.Connection.get_econtext_config

    def get_econtext_config(self: mitogen.parent.Connection) -> dict:
        config = config_of(self)
        config["import_overrides"] = sorted({*config["import_overrides"], *prefixes})
        return config

    mitogen.parent.Connection.get_econtext_config = get_econtext_config
