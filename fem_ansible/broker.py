"""RabbitMQ: connection parameters, the topology of DESIGN.md §2, and publishing.

Everything here runs on the thread that owns the connection (pika's BlockingConnection is
not thread-safe); other threads reach it only through ``add_callback_threadsafe``.
"""

from __future__ import annotations

import json
import shlex
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from .config import Config

TASKS_EXCHANGE = "fem.tasks"
DLX_EXCHANGE = "fem.dlx"
CONTROL_EXCHANGE = "fem.control"
EVENTS_EXCHANGE = "fem.events"
REJECT_REASON_HEADER = "x-fem-reject-reason"


@dataclass(frozen=True)
class Names:
    """The node's queue names."""

    tasks: str
    dead: str
    control: str

    @classmethod
    def of(cls, config: Config) -> Names:
        node = config.node_id
        return cls(
            tasks=f"fem.tasks.{node}",
            dead=f"fem.tasks.{node}.dead",
            control=f"fem.control.{node}.{config.listener_id}",
        )


def connection_parameters(config: Config) -> pika.URLParameters:
    """Parameters from ``broker.url`` plus TLS and heartbeat settings."""
    params = pika.URLParameters(config.broker.url)
    params.heartbeat = config.broker.heartbeat_s
    params.blocked_connection_timeout = max(30, config.broker.heartbeat_s * 2)
    params.client_properties = {"connection_name": f"fem-ansible {config.node_id}/"
                                                   f"{config.listener_id}"}
    if config.broker.url.startswith("amqps://"):
        tls = config.broker.tls
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        params.ssl_options = pika.SSLOptions(context, params.host)
    return params


def connect(config: Config) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters(config))


def where(config: Config) -> str:
    """``user@host:port`` of ``broker.url``, for messages (never the password)."""
    url = urlsplit(config.broker.url)
    user = url.username or "guest"
    return f"{user}@{url.hostname}:{url.port or (5671 if url.scheme == 'amqps' else 5672)}"


def reason(e: BaseException) -> str:
    """What went wrong, from the innermost error pika wraps (a socket's ``Connection
    refused``, the broker's close reason): pika's own message is often empty."""
    for _ in range(5):
        inner = [*(getattr(e, "exceptions", None) or ()), getattr(e, "exception", None),
                 *e.args]
        inner = [x for x in inner if isinstance(x, BaseException)]
        if not inner:
            break
        e = inner[0]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if getattr(e, "reply_text", None):  # closed by the broker: its words
        return f"{e.reply_text} ({e.reply_code})"  # type: ignore[attr-defined]
    return str(e).strip() or type(e).__name__


def connect_failure(config: Config, e: BaseException) -> tuple[str, str]:
    """``(what, fix)`` when connecting failed: ``doctor``'s line and the listener's."""
    url = urlsplit(config.broker.url)
    if isinstance(e, pika.exceptions.ProbableAuthenticationError |
                  pika.exceptions.AuthenticationError):
        return (f"login refused for {where(config)}",
                "correct the user and password in broker.url "
                "(rabbitmqctl authenticate_user USER PASSWORD tells which is wrong)")
    if isinstance(e, pika.exceptions.ProbableAccessDeniedError):
        vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
        return (f"{where(config)}: no access to the virtual host {vhost!r}",
                f"rabbitmqctl set_permissions -p {shlex.quote(vhost)} "
                f"{shlex.quote(url.username or 'guest')} '^fem\\..*' '^fem\\..*' "
                "'^fem\\..*', or correct the virtual host in broker.url")
    return (f"could not connect to {where(config)}: {reason(e)}",
            "start RabbitMQ, open the port, or correct broker.url")


def declare_topology(channel: BlockingChannel, config: Config) -> Names:
    """Declare (or, with ``broker.declare: false``, passively check) the node's topology."""
    names = Names.of(config)
    node = config.node_id
    passive = not config.broker.declare
    queue_args: dict[str, Any] = {}
    if config.broker.queue_type == "quorum":
        queue_args["x-queue-type"] = "quorum"
    for exchange, kind in ((TASKS_EXCHANGE, "direct"), (DLX_EXCHANGE, "direct"),
                           (CONTROL_EXCHANGE, "direct"), (EVENTS_EXCHANGE, "topic")):
        channel.exchange_declare(exchange, kind, durable=True, passive=passive)
    channel.queue_declare(
        names.tasks, durable=True, passive=passive,
        arguments={**queue_args, "x-dead-letter-exchange": DLX_EXCHANGE,
                   "x-dead-letter-routing-key": node},
    )
    channel.queue_declare(names.dead, durable=True, passive=passive, arguments=queue_args)
    channel.queue_declare(names.control, durable=True, passive=passive, arguments=queue_args)
    if not passive:
        channel.queue_bind(names.tasks, TASKS_EXCHANGE, routing_key=node)
        channel.queue_bind(names.dead, DLX_EXCHANGE, routing_key=node)
        channel.queue_bind(names.control, CONTROL_EXCHANGE, routing_key=node)
    return names


def json_properties(**extra: Any) -> pika.BasicProperties:
    return pika.BasicProperties(content_type="application/json", delivery_mode=2, **extra)


def publish_json(channel: BlockingChannel, exchange: str, routing_key: str,
                 body: dict[str, Any], *, mandatory: bool = True) -> None:
    """Publish persistent JSON; on a confirming channel this returns once confirmed."""
    channel.basic_publish(exchange, routing_key, json.dumps(body).encode(),
                          json_properties(), mandatory=mandatory)
