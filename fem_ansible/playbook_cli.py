"""The ``ansible-playbook`` the listener runs: Ansible's own command, started with
``python -P -m fem_ansible.playbook_cli <ansible-playbook arguments>``.

Why not the installed ``ansible-playbook`` itself: once the play is over, CPython's
finalization would garbage-collect all of Ansible's heap before the process exits, which
the task waits for; this freezes it instead (:func:`main`).  Everything else is Ansible's
own ``ansible-playbook``: same arguments, same exit code, and ``argv[0]`` is the installed
``ansible-playbook``, beside which Ansible's ssh connection finds its ``ansible`` (for
passwords through ``SSH_ASKPASS``).  (It also cached the collections' routing metadata
until issue 17's interleaved pairs showed no gain: docs/decisions.md.)
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path


def main() -> None:
    """Run ``ansible-playbook`` with this process's arguments."""
    from ansible.cli.playbook import main as ansible_playbook

    sys.argv[0] = str(Path(sys.executable).parent / "ansible-playbook")
    try:
        sys.exit(ansible_playbook())
    finally:
        # At exit CPython's finalization collects garbage over every object still alive
        # (Ansible's whole heap) only to free memory that the exit returns anyway, while
        # ansible-runner, and so the task, waits for the process to end.  Frozen objects
        # are skipped by collections; atexit handlers (Mitogen's shutdown, Ansible's
        # temporary files) and freeing by reference count run as before, and cycles left
        # at exit, the only thing not freed, are not promised their __del__ at exit.
        gc.freeze()


if __name__ == "__main__":
    main()
