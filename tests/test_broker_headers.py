"""Headers of a refused message, and headers pika could not read (review of issue 26)."""

from __future__ import annotations

import datetime
import struct

import pika.data
import pytest

from fem_ansible import broker, schema


def test_a_timestamp_past_datetimes_range_is_read_as_its_seconds():
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, {"ts": datetime.datetime(2000, 1, 1), "n": 1})
    encoded = bytearray(b"".join(pieces))
    at = encoded.index(b"T")
    encoded[at + 1:at + 9] = struct.pack(">Q", 2**62)
    table, _ = pika.data.decode_table(bytes(encoded), 0)
    assert table == {"ts": 2**62, "n": 1}


def test_dead_lettered_headers_stay_small_and_say_the_reason():
    small = broker.dead_letter_headers({"x-fem-signature": "hmac-sha256=00"}, "expired")
    assert small == {"x-fem-signature": "hmac-sha256=00", "x-fem-reject-reason": "expired"}
    big = broker.dead_letter_headers({"pad": "A" * 131000}, "signature_invalid")
    assert set(big) == {"x-fem-headers-dropped", "x-fem-reject-reason"}
    assert big["x-fem-headers-dropped"].startswith("131")
    assert broker.dead_letter_headers(None, "invalid_message") == {
        "x-fem-reject-reason": "invalid_message"}


@pytest.mark.parametrize("value", ["Bearer \u20ac", "\u0100", "\ud800"])
def test_header_values_no_http_client_can_send_are_refused(value):
    task = {"schema": "fem.task/v1", "task_id": "hdr", "image": {"ref": "busybox"},
            "outputs": {"upload": {"url": "http://127.0.0.1:8089/x", "headers": {"X-T": value}}}}
    errors = schema.schema_errors(schema.TASK_SCHEMA_ID, task)
    assert len(errors) == 1 and "outputs/upload/headers/X-T" in errors[0], errors
    ok = {**task, "outputs": {"upload": {"url": "http://127.0.0.1:8089/x",
                                         "headers": {"X-T": "Bearer abc\tcaf\u00e9"}}}}
    assert schema.schema_errors(schema.TASK_SCHEMA_ID, ok) == []
