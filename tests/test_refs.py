import pytest

from fem_ansible.refs import glob_match, normalise_url, parse_image, redact_url

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("ref", "normal"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("index.docker.io/org/img", "docker.io/org/img:latest"),
        ("127.0.0.1:5000/fem/busybox:1", "127.0.0.1:5000/fem/busybox:1"),
        ("localhost/x", "localhost/x:latest"),
        (f"ghcr.io/a/b:1@{DIGEST}", f"ghcr.io/a/b@{DIGEST}"),
        ("REG.Example.org/a/b", "reg.example.org/a/b:latest"),
    ],
)
def test_image_normal_form(ref, normal):
    assert str(parse_image(ref)) == normal


@pytest.mark.parametrize(
    ("ref", "names"),
    [
        ("busybox", ["docker.io/library/busybox", "library/busybox", "busybox"]),
        ("docker.io/org/app:1", ["docker.io/org/app", "org/app"]),
        (f"127.0.0.1:5000/fem/busybox@{DIGEST}", ["127.0.0.1:5000/fem/busybox"]),
        ("reg.example.org/library/x:1", ["reg.example.org/library/x"]),
    ],
)
def test_the_repository_as_engines_spell_it_in_repo_digests(ref, names):
    """What fem_image matches an image's repo digests against (fem_run.image_repositories):
    Docker lists its own hub's images by their short names, every other one in full."""
    assert parse_image(ref).repo_digest_names == names


@pytest.mark.parametrize(
    "ref", ["", " busybox", "Busybox", "a/b@sha256:12", "a:b:c", "-x", "a//b", "x@md5:" + "a" * 32]
)
def test_bad_image_refs(ref):
    with pytest.raises(ValueError):
        parse_image(ref)


def test_url_normal_form_and_refusals():
    assert normalise_url("HTTPS://Host.Example:443/a/b?X-Sig=1#f") == "https://host.example/a/b"
    assert normalise_url("http://127.0.0.1:8089/up") == "http://127.0.0.1:8089/up"
    assert normalise_url("ssh://git@h/r.git") == "ssh://git@h/r.git"
    for bad in (
        "https://u:p@h/x",
        "https://u@h/x",
        "file:///etc/passwd",
        "ext::sh -c id",
        "/local/path",
        "https://h/a/../b",
        "-https://h",
        "https://h/a b",
    ):
        with pytest.raises(ValueError):
            normalise_url(bad)


def test_url_patterns_are_normalised_like_urls():
    from fem_ansible.refs import normalise_url_pattern

    assert normalise_url_pattern("git://127.0.0.1:9418/**") == "git://127.0.0.1/**"
    assert normalise_url_pattern("HTTPS://Host:443/a/*") == "https://host/a/*"
    assert normalise_url_pattern("http://h:8089/**") == "http://h:8089/**"
    assert glob_match(normalise_url("git://127.0.0.1:9418/sample.git"),
                      [normalise_url_pattern("git://127.0.0.1:9418/**")])


def test_redact_keeps_no_credentials():
    assert redact_url("https://u:p@h:8443/a?sig=secret#x") == "https://h:8443/a"


def test_glob_star_does_not_cross_slash():
    assert glob_match("127.0.0.1:5000/fem/busybox:1", ["127.0.0.1:5000/fem/*"])
    assert not glob_match("127.0.0.1:5000/fem/x/busybox:1", ["127.0.0.1:5000/fem/*"])
    assert glob_match("127.0.0.1:5000/fem/x/busybox:1", ["127.0.0.1:5000/**"])
    assert not glob_match("127.0.0.1:50000/fem/a:1", ["127.0.0.1:5000/**"])
    assert not glob_match("evil.org/127.0.0.1:5000/a:1", ["127.0.0.1:5000/**"])
