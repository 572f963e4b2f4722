"""Property-based intake (issues 4 and 18): whatever a message holds (bytes, headers, any
JSON tree), the one intake returns a task or raises the project's :class:`RejectedError`,
nothing else; and whatever it accepts stays inside the site policy."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fem_ansible import policy
from fem_ansible.config import Config, load_config
from fem_ansible.errors import RejectedError
from fem_ansible.intake import Intake, Task
from fem_ansible.refs import glob_match, normalise_url, normalise_url_pattern, parse_image
from fem_ansible.schema import MAX_DEPTH, parse_json
from fem_ansible.signatures import HEADER, sign_hmac
from tests.conftest import intake_of

JINJA = "{{ lookup('pipe','id') }}"
HOSTILE = [
    JINJA, "{% raw %}", "..", "../..", "/etc/shadow", "ext::sh -c id", "file:///etc/passwd",
    "http://u:p@127.0.0.1:8089/x", "\x00", "\n", " ", "-", "--upload-pack=id", "*", "**",
    "%2e%2e", "\udcff", "é", "ansible_connection", "$(id)", "`id`", ";id", "/", "//", "a" * 300,
]
IMAGES = [
    "127.0.0.1:5000/fem/busybox:1", "127.0.0.1:5000/fem/busybox", "127.0.0.1:5000/fem/a/b:1",
    "127.0.0.1:5000/FEM/busybox:1", "127.0.0.1:5000/fem/busybox@sha256:" + "a" * 64,
    "busybox", "busybox:1.36", "docker.io/library/busybox:1.36", "index.docker.io/busybox:1.1",
    "evil.example/fem/busybox:1", "127.0.0.1:5001/fem/busybox:1", "localhost:5000/fem/x:1",
    "127.0.0.1:5000/fem/../x:1",
]
URL_PREFIXES = [
    "git://127.0.0.1:9418/", "git://127.0.0.1/", "GIT://127.0.0.1:9418/", "ssh://git@127.0.0.1/",
    "https://git.example.org/lab/", "https://git.example.org:443/lab/", "file://localhost/",
    "http://127.0.0.1:8089/", "http://127.0.0.1:8089/n/out/", "HTTP://127.0.0.1:8089/n/out/",
    "https://data.example.org/pub/", "https://data.example.org:8443/pub/",
    "http://user@127.0.0.1:8089/n/out/", "ext::", "/srv/", "ftp://data.example.org/pub/",
]
SEGMENTS = ["fem", "data", "out", "x.git", "sample.git", "pub", "a", "..", ".", "", "proc",
            "tmp", "sys", "dev", "input", "src", "output", JINJA, "%2e%2e", "*"]
LIMITS = {"cpus": 2, "memory": 1024**3, "gpus": 1, "timeout_s": 600}


def site_config(tmp: Path, require_digest: bool) -> Config:
    data = {
        "node_id": "n1",
        "execution": {"work_dir": str(tmp / "work")},
        "policy": {
            "images": {"allow": ["127.0.0.1:5000/fem/*", "docker.io/library/busybox:1.*"],
                       "require_digest": require_digest},
            "sources": {"allow": ["git://127.0.0.1:9418/**", "https://git.example.org/lab/*"]},
            "downloads": {"allow": ["https://data.example.org/pub/**"]},
            "uploads": {"allow": ["http://127.0.0.1:8089/*/out/**"]},
            "networks": {"allow": ["labnet"]},
            "targets": {"allow": ["localhost", "node2"]},
            "datasets": {"cohort": {"path": str(tmp / "cohort")},
                         "images": {"path": str(tmp / "images")}},
            "limits": {**LIMITS, "memory": "1Gi"},
        },
    }
    path = tmp / f"config-{require_digest}.yml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ={})


@pytest.fixture(scope="module", params=[False, True], ids=["tags", "require_digest"])
def config(request, tmp_path_factory):
    return site_config(tmp_path_factory.mktemp("policy"), request.param)


@pytest.fixture(scope="module")
def intake(config, tmp_path_factory) -> Intake:
    return intake_of(config, tmp_path_factory.mktemp("intake"))


hostile = st.sampled_from(HOSTILE)
text = st.one_of(hostile, st.text(max_size=12), st.sampled_from(SEGMENTS))
ident = st.one_of(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,8}\Z"), hostile)
url = st.builds(lambda p, segs, q: p + "/".join(segs) + q, st.sampled_from(URL_PREFIXES),
                st.lists(st.sampled_from(SEGMENTS), max_size=4),
                st.sampled_from(["", "?X-Sig=s3cret", "#frag", "?a=" + JINJA]))
container_path = st.one_of(
    st.builds(lambda segs: "/" + "/".join(segs), st.lists(st.sampled_from(SEGMENTS),
                                                          max_size=3)),
    text,
)
headers = st.dictionaries(st.sampled_from(["Authorization", "X-A", "bad header", JINJA]),
                          text, max_size=2)
upload = st.fixed_dictionaries({"url": url}, optional={
    "method": st.sampled_from(["PUT", "POST", "GET"]), "headers": headers})
memory = st.one_of(st.integers(min_value=-1, max_value=4 * 1024**3),
                   st.sampled_from(["512Mi", "1Gi", "1g", "2Gi", "1.5Gi", "0", "1Ti", JINJA]))
resources = st.fixed_dictionaries({}, optional={
    "cpus": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 8)),
    "memory": memory,
    "gpus": st.integers(-1, 3),
    "timeout_s": st.integers(-1, 2000),
})
mounts = st.lists(st.fixed_dictionaries({
    "name": st.one_of(st.sampled_from(["cohort", "images", "etc", "..", "/etc"]), text),
    "mount": container_path}), max_size=3)
task = st.fixed_dictionaries(
    {"schema": st.sampled_from(["fem.task/v1", "fem.task/v1", "fem.task/v2"]),
     "task_id": ident,
     "image": st.fixed_dictionaries({"ref": st.one_of(st.sampled_from(IMAGES), text)},
                                    optional={"pull_policy": st.sampled_from(
                                        ["missing", "always", "never", "sometimes"])})},
    optional={
        "node_id": st.sampled_from(["n1", "n2", JINJA]),
        "experiment_id": ident,
        "not_after": st.sampled_from(["2999-01-01T00:00:00Z", "2000-01-01T00:00:00+00:00",
                                      "2999-01-01T00:00:00", JINJA]),
        "executor": st.sampled_from(["docker", "podman", "shell", JINJA]),
        "source": st.fixed_dictionaries({"repo": url}, optional={
            "version": st.one_of(st.sampled_from(["main", "v1.0", "-x", "a/../b"]), text),
            "mount": container_path}),
        "command": st.lists(text, max_size=3),
        "workdir": container_path,
        "env": st.dictionaries(st.one_of(st.sampled_from(["A", "PATH", "ANSIBLE_X"]), text),
                               text, max_size=3),
        "inputs": st.lists(st.fixed_dictionaries(
            {"url": url, "path": st.one_of(st.sampled_from(["a.csv", "d/a.csv", "./a"]), text)},
            optional={"sha256": st.sampled_from(["0" * 64, "XYZ"]), "headers": headers}),
            max_size=2),
        "datasets": mounts,
        "scratch": mounts,
        "outputs": st.fixed_dictionaries({}, optional={"path": container_path,
                                                       "upload": upload}),
        "logs": st.fixed_dictionaries({}, optional={"upload": upload}),
        "resources": resources,
        "network": st.sampled_from(["none", "labnet", "host", "bridge", JINJA]),
        "target": st.sampled_from(["localhost", "node2", "all", "*", JINJA]),
        "labels": st.dictionaries(text, text, max_size=2),
        "ansible_become": st.booleans(),
    },
)

# Tasks that mostly keep to the rules, so that many are accepted and the policy invariants
# are exercised, with one or two hostile values mixed in.
SAFE = ["a", "b", "x.git", "sample.git", "c.csv"]
plausible_url = st.builds(
    lambda p, segs: p + "/".join(segs),
    st.sampled_from(["git://127.0.0.1:9418/", "https://git.example.org/lab/",
                     "https://data.example.org/pub/", "http://127.0.0.1:8089/n/out/",
                     "HTTPS://Data.Example.org:443/pub/", "http://127.0.0.1:8089/n/in/"]),
    st.lists(st.one_of(st.sampled_from(SAFE), st.sampled_from(SEGMENTS)), min_size=1,
             max_size=3))
plausible_mounts = st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(["cohort", "images", "etc"]),
    "mount": st.one_of(st.sampled_from(["/fem/data", "/fem/img", "/data/a", "/data"]),
                       container_path)}), max_size=2)
plausible = st.fixed_dictionaries(
    {"schema": st.just("fem.task/v1"),
     "task_id": st.from_regex(r"\A[a-z][a-z0-9-]{0,8}\Z"),
     "image": st.fixed_dictionaries({"ref": st.sampled_from(IMAGES)})},
    optional={
        "node_id": st.sampled_from(["n1", "n2"]),
        "source": st.fixed_dictionaries({"repo": plausible_url}, optional={
            "mount": st.sampled_from(["/fem/src", "/src", "/fem/data/src"])}),
        "inputs": st.lists(st.fixed_dictionaries(
            {"url": plausible_url, "path": st.sampled_from(["a.csv", "d/b.csv", "../c"])}),
            max_size=2),
        "datasets": plausible_mounts,
        "scratch": st.lists(st.fixed_dictionaries({
            "name": st.sampled_from(["s1", "s2"]),
            "mount": st.sampled_from(["/scratch", "/fem/scratch", "/tmp/x"])}), max_size=2),
        "outputs": st.fixed_dictionaries({}, optional={
            "path": st.sampled_from(["/fem/output", "/out", "/fem/data/out"]),
            "upload": st.fixed_dictionaries({"url": plausible_url})}),
        "resources": resources,
        "network": st.sampled_from(["none", "labnet", "host"]),
        "target": st.sampled_from(["localhost", "node2", "all"]),
        "env": st.dictionaries(st.sampled_from(["A", "B_1"]), text, max_size=2),
        "command": st.lists(text, max_size=3),
    },
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def url_allowed(url: str, patterns: list[str], schemes: tuple[str, ...]) -> bool:
    norm = normalise_url(url)
    return (norm.split(":", 1)[0] in schemes
            and glob_match(norm, [normalise_url_pattern(p) for p in patterns]) is not None)


def assert_within_policy(accepted: dict, config: Config) -> None:
    """Every promise of DESIGN.md §3 and §7 about an accepted task."""
    pol = config.policy
    ref = accepted["image"]["ref"]
    assert str(parse_image(ref)) == ref  # normal form, and the form that was matched
    assert glob_match(ref, pol.images.allow)
    if pol.images.require_digest:
        assert parse_image(ref).digest is not None
    if accepted["source"]:
        assert url_allowed(accepted["source"]["repo"], pol.sources.allow, policy.GIT_SCHEMES)
    for item in accepted["inputs"]:
        assert url_allowed(item["url"], pol.downloads.allow, policy.HTTP_SCHEMES)
        path = item["path"]
        assert not path.startswith("/") and ".." not in path.split("/")
        assert posixpath.normpath(path) == path
    for kind in ("outputs", "logs"):
        up = accepted[kind]["upload"]
        if up:
            assert url_allowed(up["url"], pol.uploads.allow, policy.HTTP_SCHEMES)
            assert up["method"] in ("PUT", "POST")
    res = accepted["resources"]
    for name, limit in LIMITS.items():
        assert 0 < res[name] <= limit or (name == "gpus" and res[name] == 0), (name, res)
    assert accepted["network"] in ("none", *pol.networks.allow)
    assert accepted["target"] in pol.targets.allow
    assert accepted["executor"] in pol.executors.allow
    assert accepted["node_id"] in (None, config.node_id)
    decision = policy.decide(accepted, config)
    assert [d["name"] for d in decision.datasets] == [d["name"] for d in accepted["datasets"]]
    for d in decision.datasets:
        assert d["host_path"] == pol.datasets[d["name"]].path
    paths = [accepted["outputs"]["path"]]
    paths += [d["mount"] for d in accepted["datasets"] + accepted["scratch"]]
    if accepted["source"]:
        paths.append(accepted["source"]["mount"])
    if accepted["inputs"]:
        paths.append("/fem/input")
    for p in paths:
        assert p.startswith("/") and posixpath.normpath(p) == p and p != "/"
        assert not any(p == r or p.startswith(r + "/") for r in ("/proc", "/sys", "/dev", "/tmp"))
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            assert a != b and not a.startswith(b + "/") and not b.startswith(a + "/")
    if accepted["workdir"] is not None:
        assert posixpath.normpath(accepted["workdir"]) == accepted["workdir"]
    assert decision.policy["cap_drop"] == ["ALL"] and decision.policy["read_only"]
    assert decision.policy["no_new_privileges"] and decision.policy["pids"] > 0


@SETTINGS
@given(message=st.one_of(task, plausible))
def test_random_tasks_are_refused_cleanly_or_within_policy(config, intake, message):
    body = json.dumps(message).encode()
    try:
        accepted = intake.read(body, None, signed=False)
    except RejectedError as e:
        assert e.code in ("invalid_message", "policy_violation", "expired", "wrong_node")
        return
    event("accepted")
    assert_within_policy(accepted.to_dict(), config)
    assert accepted.decision == policy.decide(accepted.to_dict(), config)


@SETTINGS
@given(body=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n, inner: b"[" * n + inner + b"]" * n, st.integers(0, 3000),
              st.sampled_from([b"", b"1", b'{"a": 1}'])),
    st.builds(lambda n: b'{"a":' * n + b"1" + b"}" * n, st.integers(MAX_DEPTH - 2, 200)),
    st.builds(lambda s: s.encode("utf-8", "surrogatepass"), st.text(max_size=50)),
))
def test_random_bytes_never_crash_intake(intake, body):
    try:
        intake.read(body, None, signed=False)
    except RejectedError as e:
        assert e.code == "invalid_message"
        return
    raise AssertionError("random bytes were accepted as a task")


def test_depth_limit_is_exact():
    nested = b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH
    assert parse_json(nested, 1 << 20)
    with pytest.raises(RejectedError):
        parse_json(b'{"a":' + nested + b"}", 1 << 20)


# Messages to a node with hmac signatures on: any bytes, any headers, any JSON tree (signed
# or not), and task-shaped trees with any value anywhere.
KEY = b"property-key"
CODES = {"invalid_message", "signature_invalid", "expired", "wrong_node", "policy_violation"}
leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                 hostile)
tree = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), hostile),
                                                 inner, max_size=4)), max_leaves=24)
task_tree = st.builds(lambda t, path, value: _graft(t, path, value), task,
                      st.lists(st.sampled_from(["resources", "memory", "image", "ref",
                                                "inputs", "0", "headers", "outputs",
                                                "upload", "url", "cpus", "labels"]),
                               min_size=1, max_size=3), tree)
header_value = st.one_of(st.text(max_size=80), st.binary(max_size=80), st.integers(),
                         st.none(), st.lists(st.text(max_size=8), max_size=2),
                         st.builds(lambda s: "hmac-sha256=" + s, st.text(max_size=70)))
headers_of = st.one_of(st.none(), st.dictionaries(
    st.one_of(st.just(HEADER), st.text(max_size=12)), header_value, max_size=3))
# issue 18 "Crashes": each of these raised something else than a rejection.
NINES_T = {"schema": "fem.task/v1", "task_id": "nines", "node_id": "n1",
           "image": {"ref": "127.0.0.1:5000/fem/x:1"}, "resources": {"memory": "9" * 309 + "T"}}
LONG_IMAGE = {"schema": "fem.task/v1", "task_id": "long-image", "node_id": "n1",
              "image": {"ref": "a" * 510}}


def _graft(base: dict, path: list[str], value: object) -> dict:
    """``base`` with ``value`` put at ``path`` (made of dicts where missing)."""
    node = base
    for key in path[:-1]:
        nxt = node.get(key) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value
    return base


@pytest.fixture(scope="module")
def signed_intake(tmp_path_factory) -> Intake:
    """A node with hmac signatures on whose policy allows any image of two registries,
    however long its name."""
    tmp = tmp_path_factory.mktemp("signed")
    (tmp / "key").write_bytes(KEY)
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump({
        "node_id": "n1", "execution": {"work_dir": str(tmp / "work")},
        "security": {"signature": {"mode": "hmac", "key_file": str(tmp / "key")}},
        "policy": {"images": {"allow": ["docker.io/library/**", "127.0.0.1:5000/**"]},
                   "limits": {"memory": "1Gi"}}}))
    return intake_of(load_config(path, environ={}), tmp / "intake")


@SETTINGS
@given(body=st.one_of(st.binary(max_size=300),
                      st.builds(lambda v: json.dumps(v).encode(), st.one_of(tree, task_tree)),
                      st.builds(lambda v: json.dumps({**v, "node_id": "n1"}).encode(),
                                plausible)),
       headers=headers_of, sign=st.booleans())
@example(body=json.dumps(NINES_T).encode(), headers=None, sign=True)
@example(body=json.dumps(LONG_IMAGE).encode(), headers=None, sign=True)
@example(body=b'{"schema": "fem.task/v1"}', headers={HEADER: "hmac-sha256=\u00e9"}, sign=False)
@example(body=b"{}", headers={HEADER: "hmac-sha256=\u00e9".encode()}, sign=False)
def test_any_message_is_a_task_or_one_rejection(signed_intake, body, headers, sign):
    """Only :class:`Task` or :class:`RejectedError` (with a contract code) comes out of
    intake; the listener's catch-all is for bugs, not for messages."""
    if sign:
        headers = {**(headers or {}), HEADER: sign_hmac(body, KEY)}
    try:
        result = signed_intake.read(body, headers)
    except RejectedError as e:
        assert e.code in CODES and e.reasons and all(isinstance(r, str) for r in e.reasons)
        event(e.code)
        return
    assert isinstance(result, Task)
    event("accepted")


@SETTINGS
@given(body=st.one_of(st.binary(max_size=200),
                      st.builds(lambda v: json.dumps(v).encode(), tree)),
       headers=headers_of)
@example(body=b'{"schema": "fem.control/v1", "action": "cancel", "task_id": "x"}',
         headers={HEADER: "hmac-sha256=\u00e9"})
def test_any_control_message_is_read_or_rejected(signed_intake, body, headers):
    try:
        signed_intake.read_control(body, headers)
    except RejectedError as e:
        assert e.code in CODES
