"""The helpers of tests/support/services.py that need no running service."""

from __future__ import annotations

import socket

from tests.support.services import load_env, rabbitmq_running


def test_load_env_reads_assignments_and_exports(tmp_path):
    env = tmp_path / "env"
    env.write_text(
        "# comment\n"
        "FEM_TEST_REGISTRY='127.0.0.1:5000'\n"
        "export FEM_TEST_GIT_URL='git://127.0.0.1:9418/sample.git'\n"
        "\n"
        "FEM_TEST_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2F'\n"
    )
    assert load_env(env) == {
        "FEM_TEST_REGISTRY": "127.0.0.1:5000",
        "FEM_TEST_GIT_URL": "git://127.0.0.1:9418/sample.git",
        "FEM_TEST_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
    }


def test_rabbitmq_running_needs_an_amqp_answer():
    # a port that accepts but never speaks AMQP is not a broker
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert rabbitmq_running(port=port, timeout=0.5) is False
    assert rabbitmq_running(port=port, timeout=0.5) is False  # closed
