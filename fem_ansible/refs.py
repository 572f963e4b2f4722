"""Normal forms of what allow-lists are matched against: image references and URLs.

A policy is only as good as the comparison: ``busybox`` and ``docker.io/library/busybox:latest``
are one image, ``HTTPS://Host:443/a`` and ``https://host/a`` one URL.  Everything is brought to
its normal form first, then matched with globs where ``*`` stays inside one path segment.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

DEFAULT_REGISTRY = "docker.io"
# Every pattern here is matched with ``fullmatch``: ``$`` would let a trailing newline pass.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9-]+)*(?::\d+)?")
# The engine's own bound on a repository name (registry/path), distribution/reference's
# NameTotalLengthMax: the normal form of a longer one could not be parsed again.
MAX_NAME_LENGTH = 255
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference; ``str()`` gives the normal form."""

    registry: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        return f"{self.registry}/{self.path}"

    @property
    def repo_digest_names(self) -> list[str]:
        """The repository as engines spell it in an image's repo digests: the normal form
        (podman; Docker for other registries), then the short forms Docker lists for its
        own hub (``library/busybox``, ``busybox``), so that ``fem_image`` finds the digest
        of what it pulled without parsing the reference again."""
        names = [self.repository]
        if self.registry == DEFAULT_REGISTRY:
            names.append(self.path)
            if self.path.startswith("library/"):
                names.append(self.path.removeprefix("library/"))
        return names

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"


def parse_image(ref: str) -> ImageRef:
    """Parse and normalise an image reference the way the Docker engine resolves it.

    :raises ValueError: for anything the engine would not accept as a reference.
    """
    if not ref or ref != ref.strip():
        raise ValueError("empty or padded image reference")
    if len(ref) > 512:
        raise ValueError("image reference longer than 512 characters")
    name, digest = ref, None
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"bad digest {digest!r} (want sha256:<64 hex>)")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise ValueError(f"bad tag {tag!r}")
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, parts = parts[0].lower(), parts[1:]
        if not _HOST.fullmatch(registry):
            raise ValueError(f"bad registry host {registry!r}")
    else:
        registry = DEFAULT_REGISTRY
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and len(parts) == 1:
        parts = ["library", *parts]
    if not parts or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise ValueError(f"bad repository name {'/'.join(parts)!r}")
    if len(registry) + 1 + len("/".join(parts)) > MAX_NAME_LENGTH:
        raise ValueError(f"repository name longer than {MAX_NAME_LENGTH} characters "
                         "(the engine's limit)")
    if digest is None and tag is None:
        tag = "latest"
    return ImageRef(registry, "/".join(parts), None if digest else tag, digest)


def split_url(url: str) -> SplitResult:
    """Parse an absolute http(s)/git/ssh URL, refusing what must never pass a policy."""
    if not isinstance(url, str) or url != url.strip() or any(ord(c) < 33 for c in url):
        raise ValueError("URL has whitespace or control characters")
    if url.startswith("-"):
        raise ValueError("URL starts with '-'")
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError("not an absolute URL")
    if parts.password is not None or (parts.username is not None and parts.scheme != "ssh"):
        raise ValueError("credentials in the URL (userinfo) are not allowed")
    host = parts.hostname or ""
    if not _HOST.fullmatch(host.split(":")[0] if host else "x") or not host:
        raise ValueError("bad host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("bad port") from None
    check_url_path(parts.path)
    return parts


def check_url_path(path: str) -> None:
    """Refuse a URL path that a server could resolve outside what an allow-list matched.

    Allow-lists match the path as written; servers decode it (RFC 3986 §2.1) and some
    decode twice, read ``\\`` as ``/`` or drop ``;params`` (``..;/`` in Java servlet
    containers).  So the path is refused when any decoding of it has a dot segment
    (``..``, ``%2e%2e``, ``.%2E``, also before a ``;``), an encoded ``/`` or a backslash, or
    a ``%`` that is not a percent-encoding: what passes means one thing to every server.

    :raises ValueError: naming the problem.
    """
    seen = path
    for _ in range(3):  # the written form, decoded once, decoded twice
        if _PCT.search(seen):
            raise ValueError("malformed percent-encoding in the URL path")
        if "\\" in seen:
            raise ValueError("backslash in the URL path")
        if any(seg.split(";", 1)[0] in (".", "..") for seg in seen.split("/")):
            raise ValueError("dot segments in the URL path")
        decoded = unquote(seen)
        if decoded == seen:
            return
        if decoded.count("/") != seen.count("/"):
            raise ValueError("encoded '/' in the URL path")
        seen = decoded
    raise ValueError("URL path encoded more than twice")


_DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22, "git": 9418}


def normalise_url(url: str) -> str:
    """The URL as matched by allow-lists: lower-case scheme and host, no default port,
    no query or fragment (those carry credentials in presigned URLs, never routing)."""
    parts = split_url(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    netloc = host
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{host}:{parts.port}"
    if parts.username and scheme == "ssh":
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path or "/", "", ""))


def normalise_url_pattern(pattern: str) -> str:
    """An allow-list URL pattern in the normal form of :func:`normalise_url`, so that
    ``git://host:9418/**`` and ``HTTPS://Host/**`` match what they obviously mean."""
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)", pattern, re.DOTALL)
    if not match:
        return pattern
    scheme, netloc, rest = match.groups()
    scheme = scheme.lower()
    user, at, hostport = netloc.rpartition("@")
    host, colon, port = hostport.partition(":")
    if colon and port == str(_DEFAULT_PORTS.get(scheme)):
        colon = port = ""
    return f"{scheme}://{user}{at}{host.lower()}{colon}{port}{rest}"


def redact_url(url: str) -> str:
    """The URL safe to show in events and logs: no userinfo, query or fragment."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparseable url>"


@functools.lru_cache(maxsize=512)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def glob_match(value: str, patterns: list[str]) -> str | None:
    """The first pattern matching all of ``value`` (``*`` not crossing ``/``), else None."""
    for pattern in patterns:
        if _glob_regex(pattern).fullmatch(value):
            return pattern
    return None
