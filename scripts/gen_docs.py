#!/usr/bin/env python3
"""Regenerate the documents made from the code: docs/configuration.md (config model),
docs/messages.md (JSON Schemas), examples/config.yml (every key, commented), the built-in
roles' meta/argument_specs.yml and docs/roles.md's fem_task table (role_contract.py).
tests/test_docs.py fails when they are stale."""

from pathlib import Path

from fem_ansible.docgen import write_all

if __name__ == "__main__":
    for path in write_all(Path(__file__).resolve().parent.parent):
        print(f"wrote {path}")
