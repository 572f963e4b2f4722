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


def test_a_submit_run_delivered_with_no_free_slot_goes_back_to_the_queue(make_config, tmp_path):
    """Two consumers may each be delivered a message for the last slot: the legacy one puts
    its submit_run back (requeued) and stops consuming, rather than queue a run."""
    from types import SimpleNamespace

    from fem_ansible.legacy.adapter import LegacyAdapter
    from fem_ansible.legacy.message import parse_message

    calls = []

    class Channel:
        is_open = True

        def basic_nack(self, tag, requeue):
            calls.append(("nack", tag, requeue))

        def basic_cancel(self, tag):
            calls.append(("cancel", tag))

    config = make_config(legacy={"enabled": True, "sandbox_path": str(tmp_path / "sb")})
    host = SimpleNamespace(config=config, node=None, journal=None,
                           has_free_slot=lambda: False)
    adapter = LegacyAdapter(host)
    adapter._ch, adapter._consumer_tag, adapter._slot_free = Channel(), "ctag", False
    body = b"submit_run|t|{}|" + b'{"execution_id": "e1"}' + b"|{}|alice|None|submit_run|x"
    adapter._submit(adapter._ch, SimpleNamespace(delivery_tag=7), None,
                    parse_message(body, 1 << 20))
    assert calls == [("nack", 7, True), ("cancel", "ctag")]
    assert not (tmp_path / "sb").exists()  # nothing read, nothing made
