"""RabbitMQ: connection parameters, the topology of DESIGN.md §2, and publishing.

Everything here runs on the thread that owns the connection (pika's BlockingConnection is
not thread-safe); other threads reach it only through ``add_callback_threadsafe``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.data
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from .config import Config

TASKS_EXCHANGE = "fem.tasks"
DLX_EXCHANGE = "fem.dlx"
CONTROL_EXCHANGE = "fem.control"
EVENTS_EXCHANGE = "fem.events"
REJECT_REASON_HEADER = "x-fem-reject-reason"
# Said instead of a refused message's own headers when they would not fit: the dead-lettered
# copy's header frame must fit in one frame (the broker's frame_max, 128 KiB by default) with
# ours added, or the broker closes the connection and the message, never acked, comes back
# after every reconnect (review of issue 26).
DROPPED_HEADERS_HEADER = "x-fem-headers-dropped"
DEAD_LETTER_HEADERS_MAX = 16 * 1024


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


@contextlib.contextmanager
def expecting_not_found() -> Iterator[None]:
    """Around a passive declare of what may be missing: pika logs the broker's 404 channel
    close as a warning, though the caller expects it and says what it means itself."""
    def keep(record: logging.LogRecord) -> bool:
        return "(404)" not in record.getMessage()

    logger = logging.getLogger("pika.channel")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def dead_letter_headers(headers: Any, code: str) -> dict[str, Any]:
    """The headers a refused message is dead-lettered with: its own (for the operator who
    looks at it) while they encode in :data:`DEAD_LETTER_HEADERS_MAX` bytes, else a note of
    their size; and the rejection's ``code``."""
    own = dict(headers) if isinstance(headers, dict) else {}
    try:
        size: int | None = pika.data.encode_table([], own)
    except Exception:  # what pika decoded may not encode again (a bare 2**64 timestamp)
        size = None
    if size is None or size > DEAD_LETTER_HEADERS_MAX:
        own = {DROPPED_HEADERS_HEADER: f"{size if size is not None else 'unencodable'} "
                                       "bytes of headers left out"}
    own[REJECT_REASON_HEADER] = code
    return own


def _decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's ``data.decode_value``, but a timestamp Python's datetime cannot hold (year past
    9999, or past what the platform's time functions take) is its integer of seconds: pika
    raises there while reading the frame, which tears the connection down, and the message,
    never delivered, never acked, comes back after every reconnect (review of issue 26)."""
    try:
        return _PIKA_DECODE_VALUE(encoded, offset)
    except (OverflowError, OSError, ValueError):
        if encoded[offset:offset + 1] != b"T":
            raise
        return struct.unpack_from(">Q", encoded, offset + 1)[0], offset + 9


_PIKA_DECODE_VALUE = pika.data.decode_value
# pika's decode_table and decode_value find decode_value as a module global at each call
# (a public name of pika's; tests/test_e2e_intake.py fails if it stops serving).
pika.data.decode_value = _decode_value
