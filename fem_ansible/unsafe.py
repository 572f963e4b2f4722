"""YAML for Ansible in which every string is ``!unsafe``: data that is never templated.

A task message is untrusted: ``{{ lookup('pipe', 'id') }}`` in any of its strings must stay
literal text.  Ansible honours the ``!unsafe`` tag wherever a value comes from a YAML vars
file, mapping keys included, so everything the listener hands to roles is written this way.
"""

from __future__ import annotations

from typing import Any

import yaml


class _UnsafeDumper(yaml.SafeDumper):
    pass


def _represent_unsafe(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("!unsafe", value, style='"')


_UnsafeDumper.add_representer(str, _represent_unsafe)


def dump(variables: dict[str, Any]) -> str:
    """``variables`` as YAML with every string (keys too) tagged ``!unsafe``."""
    return yaml.dump(variables, Dumper=_UnsafeDumper, default_flow_style=False,
                     allow_unicode=False, sort_keys=False, width=1 << 30)
