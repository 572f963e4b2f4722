"""fem.core's plugin loaded through Ansible's collection loader in a process where unit tests
of the collection's modules imported its packages as plain Python first.

Those packages (``ansible_collections`` down to ``…plugins.module_utils``, from
``collections/`` on ``sys.path``) are namespace packages of the ordinary path finder;
Ansible's loader refuses to import beneath them ("this loader requires exactly one path to
search").  Leaving them out of ``sys.modules`` for the test lets Ansible's loader make its
own; modules already
loaded under the collection's names (fem_ansible.fastpath's plugin_utils) stay, one copy.
"""

from __future__ import annotations

import sys

import pytest

PACKAGES = ("ansible_collections", "ansible_collections.fem", "ansible_collections.fem.core",
            "ansible_collections.fem.core.plugins",
            "ansible_collections.fem.core.plugins.modules",
            "ansible_collections.fem.core.plugins.module_utils")


def forget_plain_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the plainly imported packages out of ``sys.modules`` until the test ends."""
    for name in PACKAGES:
        module = sys.modules.get(name)
        if module is not None and "_AnsibleCollection" not in type(
                getattr(module, "__loader__", None)).__name__:
            monkeypatch.delitem(sys.modules, name)
