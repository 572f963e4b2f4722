"""Secrets for roles, in an Ansible Vault file whose password never touches disk.

ansible-runner writes extra-vars given as arguments into the artifacts dir and onto the
command line (``artifacts/<ident>/command``, SECURITY.md), so secrets go another way: a
vars file encrypted with a one-off password (Vault 1.2 format, AES256), answered to
ansible-playbook's prompt in memory.
Encryption is done here with ``cryptography`` rather than by importing Ansible, which would
cost the listener tens of MiB of memory for one function.
"""

from __future__ import annotations

import hmac
import os
import secrets
from binascii import hexlify

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from . import unsafe

VAULT_ID = "fem"
PROMPT = rf"Vault password \({VAULT_ID}\):\s*?$"
_ITERATIONS = 10000


def new_password() -> str:
    return secrets.token_urlsafe(32)


def encrypt(plaintext: bytes, password: str, vault_id: str = VAULT_ID) -> bytes:
    """``plaintext`` as an Ansible Vault 1.2 AES256 envelope."""
    salt = os.urandom(32)
    derived = PBKDF2HMAC(algorithm=hashes.SHA256(), length=80, salt=salt,
                         iterations=_ITERATIONS).derive(password.encode())
    key, hmac_key, iv = derived[:32], derived[32:64], derived[64:80]
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    mac = hmac.new(hmac_key, ciphertext, "sha256").hexdigest().encode()
    body = hexlify(b"\n".join([hexlify(salt), mac, hexlify(ciphertext)]))
    lines = [body[i : i + 80] for i in range(0, len(body), 80)]
    header = f"$ANSIBLE_VAULT;1.2;AES256;{vault_id}".encode()
    return b"\n".join([header, *lines]) + b"\n"


def write_vars_file(path: str | os.PathLike[str], variables: dict[str, object],
                    password: str) -> None:
    """Write ``variables`` as an encrypted vars file, mode 0600, every string ``!unsafe``."""
    plaintext = unsafe.dump(variables).encode()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(encrypt(plaintext, password))
