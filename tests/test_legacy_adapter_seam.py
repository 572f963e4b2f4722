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


def test_a_submit_run_waits_for_a_slot_held_and_control_actions_pass_it(make_config,
                                                                         tmp_path):
    """With no free slot a submit_run is held unacked (nothing read, journaled or made);
    a control action delivered after it is answered at once; the held run is submitted
    once a slot frees; before the broker's consumer timeout it is given back (requeued)."""
    from types import SimpleNamespace

    from fem_ansible.legacy.adapter import LegacyAdapter

    calls = []
    free = [False]

    class Channel:
        is_open = True

        def basic_nack(self, tag, requeue):
            calls.append(("nack", tag, requeue))

        def basic_ack(self, tag):
            calls.append(("ack", tag))

    class Conn:
        is_open = True

        def call_later(self, delay, fn):
            calls.append(("later", fn.__name__))

    audit = SimpleNamespace(record=lambda *a, **k: None)
    config = make_config(legacy={"enabled": True, "sandbox_path": str(tmp_path / "sb")})
    verifier = SimpleNamespace(verify=lambda body, header: None)
    node = SimpleNamespace(audit=audit, intake=SimpleNamespace(verifier=verifier))
    listener = SimpleNamespace(config=config, node=node, journal=None,
                               has_free_slot=lambda: free[0])
    adapter = LegacyAdapter(listener)
    ch = Channel()
    adapter._ch = ch
    adapter.held.attach(Conn())
    assert calls == [("later", "refresh")]
    calls.clear()
    adapter.runs = SimpleNamespace(submit=lambda c, m, p, msg: calls.append(
        ("submit", m.delivery_tag)))
    adapter.helper = SimpleNamespace(submit=lambda fn, c, tag, p, msg: calls.append(
        ("answer", tag, msg.action)))
    props = SimpleNamespace(headers=None, reply_to="r", correlation_id="c")
    run = b"submit_run|t|{}|" + b'{"execution_id": "e1"}' + b"|{}|alice|None|submit_run|x"
    cancel = b"cancel_run|t|{}|" + b'{"execution_id": "e1"}' + b"|{}|alice|None|None|x"
    adapter._on_message(ch, SimpleNamespace(delivery_tag=7), props, run)
    adapter._on_message(ch, SimpleNamespace(delivery_tag=8), props, cancel)
    assert calls == [("answer", 8, "cancel_run")]
    assert not (tmp_path / "sb").exists()  # nothing read, nothing made

    adapter.held.refresh()
    assert calls[1:] == [("nack", 7, True), ("later", "refresh")]
    adapter._on_message(ch, SimpleNamespace(delivery_tag=9), props, run)  # redelivered
    adapter.slots_changed(False)
    assert calls[3:] == []
    free[0] = True
    adapter.slots_changed(True)
    assert calls[3:] == [("submit", 9)]
