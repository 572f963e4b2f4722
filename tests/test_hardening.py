"""Issue 18, parsing level: every case of the hostile corpus is refused by intake with the
project's rejection, and the pure functions behind each item refuse what they must.
The same corpus goes through a real listener in tests/test_e2e_hardening.py."""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fem_ansible import schema
from fem_ansible.config import SignatureConfig, load_config
from fem_ansible.errors import ConfigError, RejectedError
from fem_ansible.refs import check_url_path, parse_image, split_url
from fem_ansible.signatures import Verifier, sign_hmac
from fem_ansible.sizes import MAX_BYTES, parse_bytes
from tests.conftest import intake_of
from tests.support.harness import sample_task, site_config
from tests.support.hostile_parsing import (
    HOSTILE_SIGNATURE_HEADERS,
    PARSING_CORPUS,
    anonymous,
    case_message,
)

# The services' addresses as .fem-dev/env spells them; nothing here connects to them.
ENV = {
    "FEM_TEST_REGISTRY": "127.0.0.1:5000",
    "FEM_TEST_IMAGE": "127.0.0.1:5000/fem/busybox:1",
    "FEM_TEST_GIT_URL": "git://127.0.0.1:9418/sample.git",
    "FEM_TEST_GIT_BASE_URL": "git://127.0.0.1:9418",
    "FEM_TEST_UPLOAD_URL": "http://127.0.0.1:8089",
}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return load_config(site_config(tmp_path_factory.mktemp("hardening"), ENV, "n1"),
                       environ={})


@pytest.fixture(scope="module")
def read_message(config, tmp_path_factory):
    """The one intake, as ``run`` and ``validate`` read a file (no signature)."""
    intake = intake_of(config, tmp_path_factory.mktemp("intake"))
    return lambda body: intake.read(body, None, signed=False).to_dict()


def test_the_sample_task_is_accepted(read_message):
    task = read_message(json.dumps(sample_task(ENV, "fine")).encode())
    assert task["task_id"] == "fine"


def test_corpus_covers_every_item_once_named():
    names = [c.name for c in PARSING_CORPUS]
    assert len(names) == len(set(names))
    assert set(Counter(c.item for c in PARSING_CORPUS)) == {
        "sizes", "floors", "non-finite", "image-length", "trailing-newline", "container-path",
        "url-decoding", "headers", "source-query"}


@pytest.mark.parametrize("case", PARSING_CORPUS, ids=lambda c: c.name)
def test_every_hostile_case_is_rejected_by_intake(read_message, case):
    body = case_message(case, sample_task(ENV, case.name), ENV)
    with pytest.raises(RejectedError) as err:
        read_message(body)
    assert err.value.code == case.code
    assert case.reason in err.value.message, err.value.message
    assert err.value.task_id == (None if anonymous(case) else case.name)


# -- signatures --------------------------------------------------------------------------


@pytest.fixture
def hmac_verifier(tmp_path):
    key = tmp_path / "site-2026.key"
    key.write_bytes(b"shared-key\n")
    return Verifier.from_config(SignatureConfig(mode="hmac", key_file=str(key)))


@pytest.fixture
def ed25519_verifier(tmp_path):
    pub = tmp_path / "orchestrator-a.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Verifier.from_config(SignatureConfig(mode="ed25519", key_files=[str(pub)]))


@pytest.mark.parametrize("mode", ["hmac", "ed25519"])
@pytest.mark.parametrize("name", list(HOSTILE_SIGNATURE_HEADERS))
def test_hostile_signature_headers_are_signature_invalid(request, mode, name):
    verifier = request.getfixturevalue(f"{mode}_verifier")
    with pytest.raises(RejectedError) as err:
        verifier.verify(b"{}", HOSTILE_SIGNATURE_HEADERS[name])
    assert err.value.code == "signature_invalid"


def test_audit_key_id_names_the_key_file_not_the_key(hmac_verifier, ed25519_verifier):
    body = b"{}"
    key_id = hmac_verifier.verify(body, sign_hmac(body, b"shared-key"))
    assert key_id == "hmac:site-2026.key"
    assert ed25519_verifier.public_keys[0][0] == "orchestrator-a.pub"


# -- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["9" * 309 + "T", "9" * 309, 2**63, "8388608T", "1\n",
                                   "512Mi\n", "\n512Mi"])
def test_parse_bytes_refuses_huge_and_newline_sizes(value):
    with pytest.raises(ValueError):
        parse_bytes(value)


def test_parse_bytes_is_exact_up_to_the_bound():
    assert parse_bytes("1.5Gi") == 3 * 1024**3 // 2
    assert parse_bytes(" 2 g ") == 2 * 1024**3
    assert parse_bytes(MAX_BYTES) == MAX_BYTES
    assert parse_bytes("0.5") == 0  # the floor, not the parser, refuses it in a task


# -- image references ----------------------------------------------------------------------


def test_image_names_over_the_engines_limit_are_refused_and_the_rest_reparse():
    with pytest.raises(ValueError, match="longer than 255"):
        parse_image("127.0.0.1:5000/fem/" + "a" * 490)
    longest = "127.0.0.1:5000/fem/" + "a" * (255 - len("127.0.0.1:5000/fem/"))
    ref = str(parse_image(longest + ":" + "t" * 128))
    assert str(parse_image(ref)) == ref  # what policy.decide parses again


@pytest.mark.parametrize("ref", [
    "127.0.0.1:5000\n/fem/busybox:1", "127.0.0.1:5000/fem\n/busybox:1",
    "127.0.0.1:5000/fem/busybox\n:1", "127.0.0.1:5000/fem/busybox:1\n",
    "127.0.0.1:5000/fem/busybox@sha256:" + "a" * 64 + "\n",
    "127.0.0.1:5000/fem/busybox:1\n@sha256:" + "a" * 64,
])
def test_image_reference_parts_refuse_a_newline(ref):
    with pytest.raises(ValueError):
        parse_image(ref)


# -- patterns: $ is the end of the string ------------------------------------------------


@pytest.mark.parametrize("schema_id,message", [
    (schema.CONTROL_SCHEMA_ID, {"schema": "fem.control/v1", "action": "cancel",
                                "task_id": "t1\n"}),
    (schema.CONTROL_SCHEMA_ID, {"schema": "fem.control/v1", "action": "cancel",
                                "task_id": "t1", "node_id": "n1\n"}),
])
def test_control_patterns_refuse_a_trailing_newline(schema_id, message):
    assert schema.schema_errors(schema_id, message)
    message[next(k for k, v in message.items() if v.endswith("\n"))] = "ok"
    assert not schema.schema_errors(schema_id, message)


def test_every_schema_pattern_refuses_a_trailing_newline():
    """Each ``$``-anchored pattern of the published schemas, read by the validator, refuses
    a string that one of its matches followed by a newline; ECMA-262 reads them the same."""
    patterns = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                patterns.add(node["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema.SCHEMAS)
    samples = {"A", "a", "a1", "/fem/x", "1Gi", "a" * 64, "x.txt", "X-Header", "v"}
    for pattern in patterns:
        assert pattern.startswith("^") and pattern.endswith("$"), pattern
        validator = schema._Validator({"pattern": pattern})
        good = [s for s in samples if validator.is_valid(s)]
        assert good, pattern
        assert not any(validator.is_valid(s + "\n") for s in good), pattern
        assert re.search(pattern, good[0] + "\n"), "Python's $ would have let it pass"


def test_task_id_of_needs_the_whole_id():
    assert schema.task_id_of({"task_id": "t1"}) == "t1"
    assert schema.task_id_of({"task_id": "t1\n"}) is None


@pytest.mark.parametrize("section", [
    {"node_id": "n1\n"},
    {"listener_id": "l1\n"},
    {"execution": {"collections": ["a.b\n"]}},
    {"policy": {"datasets": {"cohort\n": {"path": "/srv"}}}},
])
def test_config_patterns_refuse_a_trailing_newline(make_config, section):
    with pytest.raises(ConfigError):
        make_config(**section)


@pytest.mark.parametrize("section,key", [
    ({"limits": {"cpus": 0.001}}, "policy.limits.cpus"),
    ({"limits": {"cpus": float("nan")}}, "policy.limits.cpus"),
    ({"limits": {"cpus": float("inf")}}, "policy.limits.cpus"),
    ({"limits": {"memory": "1Mi"}}, "policy.limits.memory"),
    ({"limits": {"memory": 0}}, "policy.limits.memory"),
    ({"limits": {"pids": 0}}, "policy.limits.pids"),
    ({"limits": {"pids": 15}}, "policy.limits.pids"),
    ({"defaults": {"cpus": 0.0}}, "policy.defaults.cpus"),
    ({"defaults": {"memory": "0.5"}}, "policy.defaults.memory"),
])
def test_config_limits_and_defaults_have_floors(make_config, section, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        make_config(policy=section)


def test_config_floors_themselves_are_accepted(make_config):
    config = make_config(policy={"limits": {"cpus": 0.01, "memory": "4Mi", "pids": 16}})
    assert config.policy.limits.pids == 16


# -- JSON numbers --------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_refused_at_parsing(literal):
    with pytest.raises(RejectedError, match="not valid JSON"):
        schema.parse_json(b'{"a": ' + literal.encode() + b"}", 1024)
    assert schema.parse_json(b'{"a": 1e300}', 1024) == {"a": 1e300}


def test_a_task_built_in_python_with_nan_cpus_is_refused(config):
    """The legacy protocol builds its task from task_info without parse_json: a NaN passes
    every JSON Schema bound, so read_task checks the number itself."""
    for cpus in (float("nan"), float("-nan")):
        with pytest.raises(RejectedError, match="resources/cpus"):
            schema.read_task(sample_task(ENV, "t", resources={"cpus": cpus}),
                             default_executor="docker", default_target="localhost",
                             resource_defaults=config.resource_defaults())


# -- URL paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/a/..", "/a/../b", "/a/%2e%2e/b", "/a/%2E%2E/b", "/a/.%2E/b", "/a/%2e./b", "/a/%2e/b",
    "/a/..%2Fb", "/a/%2F/b", "/a/%2f", "/a\\b", "/a/..\\b", "/a/%5C/b", "/a/..;/b",
    "/a/..;jsessionid=1/b", "/a/.;/b", "/a/%252e%252e/b", "/a/%25252e/b", "/a/%zz", "/a/%",
    "/a/%2",
])
def test_url_paths_a_server_could_resolve_elsewhere_are_refused(path):
    with pytest.raises(ValueError):
        check_url_path(path)
    with pytest.raises(ValueError):
        split_url("https://data.example.org" + path)


@pytest.mark.parametrize("path", ["", "/", "/a/b.tar.gz", "/a/%20b", "/a/..b", "/a/b..",
                                  "/a/.hidden", "/a/b;v=1", "/a/%41"])
def test_ordinary_url_paths_pass(path):
    check_url_path(path)


# -- where a source repo shows ---------------------------------------------------------------


def test_public_task_and_audit_never_hold_a_source_query(read_message):
    """Refused at intake: the repo roles and the audit log see has no query to redact."""
    task = read_message(json.dumps(sample_task(ENV, "ok")).encode())
    assert "?" not in schema.public_task(task)["source"]["repo"]


def test_security_md_counts_the_corpus():
    """SECURITY.md's table of issue 18's parsing items says how many corpus cases each has
    and which unit tests cover it: both stay true."""
    text = (Path(__file__).resolve().parent.parent / "SECURITY.md").read_text()
    rows = re.findall(r"^  \| ([a-z-]+) \| .+ \| (\d+|e2e) \| (.+) \|$", text, re.MULTILINE)
    counts = Counter(c.item for c in PARSING_CORPUS)
    counts["signature"] = len(HOSTILE_SIGNATURE_HEADERS)
    assert {item: int(n) for item, n, _ in rows if n != "e2e"} == counts
    for _, _, tests in rows:
        for name in re.findall(r"`(test_[a-z0-9_]+)`", tests):
            assert callable(globals().get(name)), name


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="%2eEfF5cC./\\;:@?#[]0123456789abc")))
def test_parsers_raise_only_value_error(text):
    """Whatever the string, the parsing functions behind these items answer or raise
    ValueError, which intake turns into a rejection (never another exception)."""
    for parse in (parse_bytes, parse_image, check_url_path, split_url,
                  lambda t: split_url("https://data.example.org/" + t),
                  lambda t: parse_image("127.0.0.1:5000/fem/" + t)):
        with contextlib.suppress(ValueError):
            parse(text)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.integers(), st.none(), st.booleans(),
                 st.lists(st.text(max_size=3), max_size=2),
                 st.builds(lambda v: "hmac-sha256=" + v, st.text()),
                 st.builds(lambda v: "ed25519=" + v, st.text())))
def test_any_signature_header_is_a_key_or_signature_invalid(header):
    key = Path(__file__)  # any readable file: its bytes are the key
    for verifier in (Verifier("hmac", hmac_key=key.read_bytes(), hmac_key_id=key.name),
                     Verifier("ed25519", public_keys=(("k", Ed25519PrivateKey.generate()
                                                       .public_key()),))):
        with pytest.raises(RejectedError):
            verifier.verify(b"{}", header)
