import base64
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fem_ansible import unsafe, vault
from fem_ansible.config import SignatureConfig
from fem_ansible.errors import RejectedError
from fem_ansible.signatures import Verifier, sign_hmac

VAULT_BIN = Path(sys.executable).parent / "ansible-vault"


def test_vault_file_opens_with_ansible_vault(tmp_path):
    secrets = {"fem_secrets": {"token": "s3cr3t {{ lookup('pipe','id') }}"}}
    vault.write_vars_file(tmp_path / "s.yml", secrets, "pw")
    assert b"s3cr3t" not in (tmp_path / "s.yml").read_bytes()
    (tmp_path / "pw").write_text("pw")
    out = subprocess.run([str(VAULT_BIN), "view", "--vault-id", f"fem@{tmp_path / 'pw'}",
                          str(tmp_path / "s.yml")], capture_output=True, text=True, check=True)
    assert "!unsafe" in out.stdout and "s3cr3t" in out.stdout


def test_unsafe_dump_tags_every_string():
    text = unsafe.dump({"a": {"{{ k }}": ["{{ v }}", 1, None, True]}})
    for line in text.splitlines():
        if "{{" in line:
            assert line.count("!unsafe") == line.count("{{")


def test_hmac(tmp_path):
    (tmp_path / "k").write_text("shared-key\n")
    v = Verifier.from_config(SignatureConfig(mode="hmac", key_file=str(tmp_path / "k")))
    body = b'{"x": 1}'
    assert v.verify(body, sign_hmac(body, b"shared-key")).startswith("hmac:")
    for header in (None, "hmac-sha256=00", sign_hmac(body + b" ", b"shared-key"),
                   sign_hmac(body, b"other")):
        with pytest.raises(RejectedError) as err:
            v.verify(body, header)
        assert err.value.code == "signature_invalid"


def test_ed25519_with_rotation(tmp_path):
    keys = [Ed25519PrivateKey.generate() for _ in range(2)]
    for i, key in enumerate(keys):
        (tmp_path / f"k{i}.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    v = Verifier.from_config(SignatureConfig(
        mode="ed25519", key_files=[str(tmp_path / "k0.pem"), str(tmp_path / "k1.pem")]))
    body = b'{"x": 1}'
    sig = "ed25519=" + base64.b64encode(keys[1].sign(body)).decode()
    assert v.verify(body, sig) == "ed25519:k1.pem"
    wrong = "ed25519=" + base64.b64encode(Ed25519PrivateKey.generate().sign(body)).decode()
    with pytest.raises(RejectedError):
        v.verify(body, wrong)
    with pytest.raises(RejectedError):
        v.verify(body + b"tampered", sig)
