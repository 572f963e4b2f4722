"""The ``ansible-playbook`` the listener runs: Ansible's own command, started with
``python -P -m fem_ansible.playbook_cli <ansible-playbook arguments>``, or forked from the
resident Ansible (fem_ansible.resident_server), which calls :func:`prepare` once and
:func:`run` in each run.

Why not the installed ``ansible-playbook`` itself: on every start Ansible parses the routing
metadata of ansible.builtin (``ansible/config/ansible_builtin_runtime.yml``, 9000 lines of
YAML) and of each collection it imports, a tenth of a trivial task's controller CPU
(bench/RESULTS.md).  ``_meta_yml_to_dict`` is the hook Ansible's collection loader offers for
this (its docstring: "may be monkeypatched ... to allow other implementations to cache the
output"); here it keeps each result in fem.core's ``plugin_utils.derived_cache``, named by a
hash of the YAML text, so a changed file is parsed again.  It is replaced only if it still
has the shape it was written for (fem.core's ``plugin_utils.fastpath``, group ``routing``;
the listener warns at start if not), else Ansible parses as it always does.

Everything else is Ansible's own ``ansible-playbook``: same arguments, same exit code, and
``argv[0]`` is the installed ``ansible-playbook``, beside which Ansible's ssh connection finds
its ``ansible`` (for passwords through ``SSH_ASKPASS``).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from ansible.release import __version__ as ansible_version
from ansible.utils.collection_loader import _collection_finder

from fem_ansible import compiled_templates
from fem_ansible.fastpath import derived_cache, patches

_PARSER = f"ansible {ansible_version} PyYAML {yaml.__version__} {yaml.__with_libyaml__}".encode()

#: How the listener starts this command cold: the resident Ansible runs only commands that
#: start so (fem_ansible.runner.playbook_command).
MODULE = "fem_ansible.playbook_cli"


def cached_routing(parse: Callable[[bytes | str, Any], Mapping]) -> Callable[..., Mapping]:
    """Ansible's ``_meta_yml_to_dict`` (``parse``) with its results kept between runs: the
    entry's name holds the YAML text and what parses it (Ansible's and PyYAML's versions,
    libyaml or not), so another parser is another entry."""

    def meta_yml_to_dict(yaml_string_data: bytes | str, content_id: Any) -> Mapping:
        data = (yaml_string_data.encode("utf-8") if isinstance(yaml_string_data, str)
                else bytes(yaml_string_data))
        name = derived_cache.entry_name(b"routing", _PARSER, data)
        return derived_cache.cached(name, lambda: parse(yaml_string_data, content_id),
                                    lambda value: isinstance(value, dict))

    return meta_yml_to_dict


def prepare() -> None:
    """Patch what this process's runs share, once: the routing metadata cache and the
    compiled templates (fem_ansible.compiled_templates), each only where fem.core's check
    finds what it replaces in the shape it was written for."""
    finder: Any = _collection_finder
    if "routing" not in patches.off() and not patches.missing(["routing"]):
        finder._meta_yml_to_dict = cached_routing(finder._meta_yml_to_dict)
    if "compiled_templates" not in patches.off() and not patches.missing(["compiled_templates"]):
        compiled_templates.install()


def run(args: list[str]) -> int:
    """``ansible-playbook`` with ``args``; its exit code."""
    from ansible.cli.playbook import main as ansible_playbook

    sys.argv = [str(Path(sys.executable).parent / "ansible-playbook"), *args]
    try:
        ansible_playbook()  # exits: Ansible's cli_executor ends in sys.exit
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        # At exit CPython's finalization collects garbage over every object still alive
        # (Ansible's whole heap) only to free memory that the exit returns anyway, while
        # ansible-runner, and so the task, waits for the process to end.  Frozen objects
        # are skipped by collections; atexit handlers (Mitogen's shutdown, Ansible's
        # temporary files) and freeing by reference count run as before, and cycles left
        # at exit, the only thing not freed, are not promised their __del__ at exit.
        gc.freeze()


def main() -> None:
    """Run ``ansible-playbook`` with this process's arguments."""
    prepare()
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
