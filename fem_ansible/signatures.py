"""Message signatures (DESIGN.md §3): ``x-fem-signature`` over the raw body.

``hmac-sha256=<hex>`` with the site's shared key, or ``ed25519=<base64>`` with one of the
orchestrator's public keys (several, for rotation).  Checked before the body is parsed, so
an unsigned or tampered message costs one hash and is never interpreted.

Whatever the header holds (any type, any bytes), the answer is a key id or
:class:`RejectedError`: a header nobody could have signed never reaches a comparison that
could raise.  The key id in the audit log names the key's *file*, never a digest of the
key: a hash of a shared secret is an offline oracle for a weak key (docs/decisions.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import SignatureConfig
from .errors import ConfigError, RejectedError

HEADER = "x-fem-signature"


@dataclass(frozen=True)
class Verifier:
    """Checks signatures for one configured mode; ``key_id`` names the key that matched."""

    mode: str
    hmac_key: bytes | None = None
    hmac_key_id: str = ""
    public_keys: tuple[tuple[str, Ed25519PublicKey], ...] = ()

    @classmethod
    def from_config(cls, cfg: SignatureConfig) -> Verifier:
        if cfg.mode == "hmac":
            try:
                key = Path(cfg.key_file or "").read_bytes().strip()
            except OSError as e:
                raise ConfigError(f"security.signature.key_file: {e.strerror}") from None
            if not key:
                raise ConfigError("security.signature.key_file: the key file is empty")
            return cls("hmac", hmac_key=key, hmac_key_id=Path(cfg.key_file or "").name)
        if cfg.mode == "ed25519":
            keys = []
            for path in cfg.key_files:
                try:
                    key = load_pem_public_key(Path(path).read_bytes())
                except (OSError, ValueError) as e:
                    raise ConfigError(f"security.signature.key_files: {path}: {e}") from None
                if not isinstance(key, Ed25519PublicKey):
                    raise ConfigError(f"security.signature.key_files: {path} is not ed25519")
                keys.append((Path(path).name, key))
            return cls("ed25519", public_keys=tuple(keys))
        return cls("none")

    def verify(self, body: bytes, header: object) -> str | None:
        """Return the id of the key that signed ``body`` (None when signatures are off).

        :raises RejectedError: ``signature_invalid``.
        """
        if self.mode == "none":
            return None
        if isinstance(header, bytes):
            header = header.decode("ascii", "replace")
        if not isinstance(header, str) or "=" not in header or not header.isascii():
            raise RejectedError(f"missing or malformed {HEADER} header", code="signature_invalid")
        algo, value = header.split("=", 1)
        if self.mode == "hmac":
            expected = hmac.new(self.hmac_key or b"", body, hashlib.sha256).hexdigest()
            if algo == "hmac-sha256" and hmac.compare_digest(value.lower(), expected):
                return f"hmac:{self.hmac_key_id}"
            raise RejectedError("hmac signature does not match", code="signature_invalid")
        if algo != "ed25519":
            raise RejectedError(f"expected an ed25519 signature, got {algo!r}",
                                code="signature_invalid")
        try:
            sig = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RejectedError("signature is not base64", code="signature_invalid") from None
        for key_id, key in self.public_keys:
            try:
                key.verify(sig, body)
                return f"ed25519:{key_id}"
            except InvalidSignature:
                continue
        raise RejectedError("no configured key verifies the signature",
                            code="signature_invalid")


def sign_hmac(body: bytes, key: bytes) -> str:
    """The header value an orchestrator sends (used by ``fem-ansible submit`` and tests)."""
    return "hmac-sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
