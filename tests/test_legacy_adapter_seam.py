"""The legacy adapter sits on the listener's public surface (issue 17 item 3)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fem_ansible

PACKAGE = Path(fem_ansible.__file__).parent


def test_the_listener_does_not_import_the_legacy_package():
    code = ("import sys, fem_ansible.listener; "
            "print(any(m.startswith('fem_ansible.legacy') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_the_legacy_package_uses_no_private_name_of_the_listener_or_node():
    """No ``host._x``/``node._x``/``listener._x`` access and nothing assigned on them."""
    for path in sorted((PACKAGE / "legacy").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr in ("host", "node", "listener"):
                assert not node.attr.startswith("_"), f"{path.name}: {node.value.attr}.{node.attr}"
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute):
                        assert t.value.attr not in ("host", "node", "listener"), \
                            f"{path.name}: assigns {t.value.attr}.{t.attr}"
        assert "fem_ansible.listener" not in path.read_text()
        assert "from ..listener" not in path.read_text()
