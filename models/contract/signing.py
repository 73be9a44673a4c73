"""Ed25519 signing of gallery manifests: the server holds the private key, every edge holds the public key.

`key_id` is the first 16 hex digits of the sha256 of the raw 32-byte public key. A manifest names the key that
signed it, so an edge can tell "signed by a key I do not trust" (a forged or misrouted gallery, or a key rotation
the edge was not told about) from "signature broken" (tampering).

Private keys are stored as unencrypted PKCS#8 PEM, mode 0600; public keys as SubjectPublicKeyInfo PEM or, for
config files, the base64 of the raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.cache import atomic_write_bytes, fsync_dir
from models.errors import ConfigError, SignatureError

log = logging.getLogger(__name__)

SIGNATURE_BYTES = 64


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Verifier:
    """A trusted public key: `verify(data, signature)` returns or raises SignatureError."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._key = public_key
        self.key_id = key_id_of(public_key)

    @classmethod
    def from_pem_file(cls, path: Path | str) -> Verifier:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read public key {path}: {exc}") from exc
        return cls.from_string(data.decode("ascii", errors="replace"), source=str(path))

    @classmethod
    def from_string(cls, text: str, *, source: str = "public key string") -> Verifier:
        """A PEM public key, or the base64 of the raw 32-byte key (the compact form for configs)."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            try:
                key = serialization.load_pem_public_key(text.encode("ascii"))
            except (ValueError, UnicodeEncodeError) as exc:
                raise ConfigError(f"{source}: not a PEM public key: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{source}: the PEM holds a {type(key).__name__}, not an Ed25519 public key")
            return cls(key)
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{source}: neither PEM nor base64: {exc}") from None
        if len(raw) != 32:
            raise ConfigError(f"{source}: an Ed25519 public key is 32 bytes, the base64 holds {len(raw)}")
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    def public_pem(self) -> str:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def public_b64(self) -> str:
        raw = self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def verify(self, data: bytes, signature: bytes) -> None:
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(f"an Ed25519 signature is {SIGNATURE_BYTES} bytes, got {len(signature)}")
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise SignatureError(f"signature does not verify under key {self.key_id}") from None

    def verify_b64(self, data: bytes, signature_b64: str) -> None:
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError("signature is not valid base64") from None
        self.verify(data, signature)


class Signer:
    """A private signing key (the enrollment server's)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.verifier = Verifier(private_key.public_key())
        self.key_id = self.verifier.key_id

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path | str) -> Signer:
        path = Path(path)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read signing key {path}: {exc}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # still usable, but anybody who can read it can sign galleries every edge will accept
            log.warning("signing key %s is readable by group/others (mode %o); chmod 600 it", path, mode & 0o777)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: the PEM holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path | str) -> tuple[Signer, bool]:
        """The key at `path`, generated there first when there is none; True when this call created it.

        Atomic against a concurrent first start (two server processes on an empty key volume): the new key is
        written whole to a temporary file and hard-linked to `path`, which fails when the name exists, so exactly
        one process creates the key and every other one loads it, never a key of its own that another overwrites.
        """
        path = Path(path)
        if path.is_file():
            return cls.load(path), False
        signer = cls.generate()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(signer._pem())
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, path)
                    created = True
                except FileExistsError:
                    created = False
            finally:
                Path(tmp).unlink(missing_ok=True)
            fsync_dir(path.parent)  # the new name must survive a power cut, or a restart makes another key
        except OSError as exc:
            raise ConfigError(f"cannot create signing key {path}: {exc}") from exc
        return (signer, True) if created else (cls.load(path), False)

    def _pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def save(self, path: Path | str) -> None:
        """Write the key as PEM, mode 0600 from creation (mkstemp), atomically replacing any previous file."""
        path = Path(path)
        # atomic_write_bytes writes through mkstemp, which creates the file 0600; the chmod makes that explicit
        # in case the helper ever changes, and happens after the rename so no other mode is ever visible
        atomic_write_bytes(path, self._pem())
        os.chmod(path, 0o600)

    def save_public(self, path: Path | str) -> None:
        atomic_write_bytes(Path(path), self.verifier.public_pem().encode("ascii"))
        os.chmod(path, 0o644)  # public by nature; mkstemp's 0600 would only get in the way of deployment

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def sign_b64(self, data: bytes) -> str:
        return base64.b64encode(self.sign(data)).decode("ascii")
