"""The face gallery as published by the enrollment server: in-memory form, binary blob, signed manifest.

A gallery is one site's enrolled embeddings (`[count, dim]`, float32 or float16), a label per embedding indexing
the people table, and the people table itself. It is published as a signed JSON manifest (retained on
`.../gallery/manifest`) plus the blob cut into chunks (retained on `.../gallery/blob/{i}`); an edge rebuilds it
with `models.contract.assembler.GalleryAssembler`.

Blob layout, format version 1 (all integers and floats little-endian, no padding, no trailing bytes):

    offset  size                      field
    0       4                         magic b"FAGB"
    4       2   u16                   format version (1)
    6       1   u8                    dtype code: 1 = float32, 2 = float16 (IEEE-754 binary32 / binary16)
    7       2   u16                   dim, 1..4096
    9       4   u32                   count: number of embeddings
    13      4   u32                   n_people: entries in the people table
    17      count*dim*itemsize        embeddings, row-major
    ..      count*4   u32             labels: for each embedding, its person's index in the people table
    ..      variable                  people table, n_people times:
                                          u16 byte length + UTF-8 person_id (1..128 characters)
                                          u16 byte length + UTF-8 name (0..256 characters)

Every length is checked against the bytes actually present before anything is allocated, embeddings must be
finite, labels must index the table, person ids must be unique.

Releases (schema 1.1). A publication is identified by its release `(epoch, version)`, compared as a pair: the
version counts publications within an epoch, and the epoch (milliseconds since 1970 UTC when the server started
it) grows whenever a server can no longer prove that it continues the previous epoch's count, i.e. at every
server start and publisher change, which includes a database restored from a backup or moved to PostgreSQL. An
edge applies a release newer than the one it serves and refuses an older one (StaleGalleryError, acknowledged as
an error), so a replayed old manifest is refused while a restored server's `v41` of a new epoch supersedes `v57`
of the old one. A 1.0 manifest has no epoch and reads as epoch 0, below every epoch a 1.1 server writes; a 1.0
edge ignores the field (unknown fields are ignored and the signature covers them) and orders by version alone, so
it follows a 1.1 server as before except after a restore, where it keeps ignoring the lower versions until the
count passes the one it holds.

Manifest signature: Ed25519 over the canonical JSON (`models.contract.codec.canonical_json`: sorted keys, compact
separators `,` `:`, UTF-8, non-ASCII unescaped) of the manifest object *as received*, envelope and unknown
fields included, with only its `signature` key removed. Verifying the received object rather than our re-encoding
keeps a 1.x manifest with fields this reader does not know verifiable. Manifest values are strings, integers and
an array of strings only (no floats), so every language's canonical JSON agrees byte for byte.

The site's decision (schema 1.1, optional). `decision` carries the rule the site's edges apply when their own
config names none (`SiteDecision`: `enrollment-server calibrate` fits it on the site's own people and unknown
faces), with how it was calibrated. Its numbers are decimal strings (`"0.84"`, `"inf"` for no cap), keeping the
manifest free of floats for the signature's sake; the counts are integers. The rule belongs to the manifest's
encoder fingerprint. Absent: the edge applies its encoder's default. A 1.0 edge ignores the field (signed like
every other), a malformed one is refused (GalleryFormatError) and the edge keeps the gallery it serves.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from models.contract import limits, timestamps
from models.contract.codec import (
    Message,
    canonical_json,
    check_choice,
    check_id,
    check_min,
    check_text,
    decode_object,
    from_object,
    normalise_ts,
)
from models.contract.signing import SIGNATURE_BYTES, Signer, Verifier
from models.contract.topics import validate_id
from models.decision.rules import DecisionRule
from models.errors import ConfigError, GalleryFormatError, SignatureError, TopicError

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "faceattend.gallery_manifest"
MAGIC = b"FAGB"
FORMAT_VERSION = 1
METRICS = ("euclidean",)
DTYPES = ("float32", "float16")
_DTYPE_CODES = {"float32": 1, "float16": 2}
_CODE_DTYPES = {code: name for name, code in _DTYPE_CODES.items()}
_ITEMSIZE = {"float32": 4, "float16": 2}
_HEADER = struct.Struct("<4sHBHII")
HEADER_BYTES = _HEADER.size  # 17
_LEN = struct.Struct("<H")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
# a decimal number as Python's repr() writes a finite float, or "inf"; nothing else (no "nan", no spaces, no "+")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?(e[-+][0-9]+)?|inf")
_DECISION_COUNTS = ("people", "probes", "strangers")


def _decimal_text(value: float) -> str:
    return "inf" if value == float("inf") else repr(float(value))


def _decimal_value(obj: Mapping[str, Any], key: str) -> float:
    text = obj.get(key)
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise GalleryFormatError(f"gallery manifest: decision.{key} must be a decimal string, got {text!r}")
    return float(text)


@dataclass(frozen=True)
class SiteDecision:
    """A site's calibrated decision rule as the manifest carries it (module docstring, "The site's decision").

    `target_fpir`: the share of strangers the threshold was fitted to accept; `people`: gallery identities,
    `probes`: their genuine probes, `strangers`: stranger probes it was fitted on; `calibrated`: when (UTC).
    """

    rule: DecisionRule
    target_fpir: float
    people: int
    probes: int
    strangers: int
    calibrated: str

    def __post_init__(self) -> None:
        if not isinstance(self.rule, DecisionRule):
            raise GalleryFormatError("site decision: rule must be a DecisionRule")
        if isinstance(self.target_fpir, bool) or not 0.0 < float(self.target_fpir) < 1.0:
            raise GalleryFormatError(f"site decision: target_fpir must be in (0, 1), got {self.target_fpir!r}")
        for key in _DECISION_COUNTS:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
                raise GalleryFormatError(f"site decision: {key} must be an integer >= 0, got {value!r}")
        try:
            object.__setattr__(self, "calibrated", timestamps.normalise_utc(self.calibrated))
        except (TypeError, ValueError) as exc:
            raise GalleryFormatError(f"site decision: calibrated {self.calibrated!r}: {exc}") from None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rule": self.rule.rule,
            "threshold": _decimal_text(self.rule.threshold),
            "target_fpir": _decimal_text(self.target_fpir),
            "calibrated": self.calibrated,
        }
        if self.rule.max_distance is not None:
            out["max_distance"] = _decimal_text(self.rule.max_distance)
        for key in _DECISION_COUNTS:
            out[key] = getattr(self, key)
        return out

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> SiteDecision:
        """Strict: every value is checked; unknown keys are ignored like anywhere in the contract (a later minor
        may add some)."""
        if not isinstance(obj, Mapping):
            raise GalleryFormatError(f"gallery manifest: decision must be an object, got {type(obj).__name__}")
        rule: dict[str, Any] = {"rule": obj.get("rule"), "threshold": _decimal_value(obj, "threshold")}
        if "max_distance" in obj:
            rule["max_distance"] = _decimal_value(obj, "max_distance")
        try:
            decision_rule = DecisionRule.from_dict(rule)
        except ConfigError as exc:
            raise GalleryFormatError(f"gallery manifest: decision: {exc}") from None
        missing = [k for k in (*_DECISION_COUNTS, "calibrated") if k not in obj]
        if missing:
            raise GalleryFormatError(f"gallery manifest: decision lacks {', '.join(missing)}")
        return cls(
            decision_rule,
            _decimal_value(obj, "target_fpir"),
            obj["people"],
            obj["probes"],
            obj["strangers"],
            obj["calibrated"],
        )


@dataclass(frozen=True)
class GalleryPerson:
    person_id: str
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.person_id, str) or not 1 <= len(self.person_id) <= limits.MAX_PERSON_ID_CHARS:
            raise GalleryFormatError(f"person_id {self.person_id!r} must be 1-{limits.MAX_PERSON_ID_CHARS} characters")
        if not isinstance(self.name, str) or len(self.name) > limits.MAX_NAME_CHARS:
            raise GalleryFormatError(f"name of {self.person_id!r} must be a string of <= {limits.MAX_NAME_CHARS}")


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare galleries by (site, version, blob sha)
class Gallery:
    site: str
    version: int
    fingerprint: str
    metric: str
    dtype: str
    embeddings: np.ndarray = field(repr=False)  # [count, dim] of `dtype`, read-only
    labels: np.ndarray = field(repr=False)  # [count] int32, index into `people`, read-only
    people: tuple[GalleryPerson, ...]
    epoch: int = 0  # with `version`, the release (see the module docstring); 0 = a 1.0 publication
    decision: SiteDecision | None = None  # 1.1: the site's calibrated rule; None = the encoder's default

    def __post_init__(self) -> None:
        if self.decision is not None and not isinstance(self.decision, SiteDecision):
            raise GalleryFormatError("gallery decision must be a SiteDecision")
        try:
            validate_id(self.site, "site")
        except TopicError as exc:
            raise GalleryFormatError(str(exc)) from None
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise GalleryFormatError(f"gallery version must be an integer >= 1, got {self.version!r}")
        if not isinstance(self.epoch, int) or isinstance(self.epoch, bool) or not 0 <= self.epoch < 2**63:
            raise GalleryFormatError(f"gallery epoch must be an integer in [0, 2**63), got {self.epoch!r}")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise GalleryFormatError("gallery fingerprint must be a non-empty string")
        if self.metric not in METRICS:
            raise GalleryFormatError(f"gallery metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.dtype not in DTYPES:
            raise GalleryFormatError(f"gallery dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        people = tuple(self.people)
        if not all(isinstance(p, GalleryPerson) for p in people):
            raise GalleryFormatError("people must be GalleryPerson entries")
        ids = [p.person_id for p in people]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise GalleryFormatError(f"person_id {dup!r} appears twice in the people table")

        emb = np.asarray(self.embeddings)
        if emb.ndim != 2 or not 1 <= emb.shape[1] <= limits.MAX_DIM:
            raise GalleryFormatError(f"embeddings must be [count, dim], 1 <= dim <= {limits.MAX_DIM}, got {emb.shape}")
        with np.errstate(over="ignore"):  # float64 -> float16 overflow becomes inf, refused just below
            emb = np.array(emb, dtype=self.dtype, order="C")  # a private copy: nobody else can write to it
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad.size:
            raise GalleryFormatError(f"embedding row {int(bad[0])} is not finite (NaN or inf in {self.dtype})")
        labels = np.asarray(self.labels)
        if labels.shape != (emb.shape[0],) or (labels.size and labels.dtype.kind not in "iu"):
            raise GalleryFormatError(f"labels must be {emb.shape[0]} integers, got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(people)):
            raise GalleryFormatError(f"a label is outside the people table [0, {len(people)})")
        labels = labels.astype(np.int32)  # a copy
        emb.setflags(write=False)
        labels.setflags(write=False)
        object.__setattr__(self, "embeddings", emb)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "people", people)

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def release(self) -> tuple[int, int]:
        return (self.epoch, self.version)


def release_text(release: tuple[int, int]) -> str:
    """How logs, errors and acks name a release: `v41 (epoch 1767225600000)`."""
    epoch, version = release
    return f"v{version} (epoch {epoch})"


def encode_blob(gallery: Gallery) -> bytes:
    """The binary blob of the module docstring."""
    code = _DTYPE_CODES[gallery.dtype]
    parts = [
        _HEADER.pack(MAGIC, FORMAT_VERSION, code, gallery.dim, gallery.count, len(gallery.people)),
        gallery.embeddings.astype("<f4" if gallery.dtype == "float32" else "<f2").tobytes(),
        gallery.labels.astype("<u4").tobytes(),
    ]
    for person in gallery.people:
        for text in (person.person_id, person.name):
            raw = text.encode("utf-8")
            parts.append(_LEN.pack(len(raw)) + raw)
    blob = b"".join(parts)
    if len(blob) > limits.MAX_BLOB_BYTES:
        raise GalleryFormatError(f"gallery blob of {len(blob)} bytes exceeds the {limits.MAX_BLOB_BYTES} byte limit")
    return blob


def decode_blob(data: bytes, expected: GalleryManifest) -> Gallery:
    """Parse a blob whose sha256 already matched `expected`; every field is still bounds-checked."""
    size = len(data)
    if size > limits.MAX_BLOB_BYTES:
        raise GalleryFormatError(f"gallery blob of {size} bytes exceeds the {limits.MAX_BLOB_BYTES} byte limit")
    if size < HEADER_BYTES:
        raise GalleryFormatError(f"gallery blob truncated: {size} bytes, the header alone is {HEADER_BYTES}")
    magic, fmt, code, dim, count, n_people = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise GalleryFormatError(f"not a gallery blob (magic {magic!r}, expected {MAGIC!r})")
    if fmt != FORMAT_VERSION:
        raise GalleryFormatError(f"gallery blob format version {fmt} is not supported (this reader: {FORMAT_VERSION})")
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise GalleryFormatError(f"gallery blob dtype code {code} is unknown")
    if not 1 <= dim <= limits.MAX_DIM:
        raise GalleryFormatError(f"gallery blob dim {dim} is outside [1, {limits.MAX_DIM}]")
    # Python integers do not overflow: these are exact, and compared with the real size before any allocation
    emb_bytes = count * dim * _ITEMSIZE[dtype]
    label_bytes = count * 4
    minimum = HEADER_BYTES + emb_bytes + label_bytes + n_people * 2 * _LEN.size
    if minimum > size:
        raise GalleryFormatError(f"gallery blob truncated: its header needs at least {minimum} bytes, got {size}")
    header = {"dtype": dtype, "dim": dim, "count": count, "people": n_people}
    for key, value in header.items():
        announced = getattr(expected, key)
        if announced != value:
            raise GalleryFormatError(f"gallery blob {key} {value!r} differs from the manifest's {announced!r}")

    pos = HEADER_BYTES
    emb = np.frombuffer(data, dtype="<f4" if dtype == "float32" else "<f2", count=count * dim, offset=pos)
    pos += emb_bytes
    labels = np.frombuffer(data, dtype="<u4", count=count, offset=pos)
    pos += label_bytes
    if labels.size and int(labels.max()) >= n_people:
        raise GalleryFormatError(f"gallery blob label {int(labels.max())} is outside the people table [0, {n_people})")

    people = []
    for i in range(n_people):
        person_id, pos = _read_text(data, pos, f"person {i} id")
        name, pos = _read_text(data, pos, f"person {i} name")
        people.append(GalleryPerson(person_id, name))
    if pos != size:
        raise GalleryFormatError(f"gallery blob has {size - pos} trailing bytes after the people table")
    return Gallery(
        site=expected.site,
        version=expected.version,
        fingerprint=expected.fingerprint,
        metric=expected.metric,
        dtype=dtype,
        embeddings=emb.reshape(count, dim),
        labels=labels.astype(np.int32),
        people=tuple(people),
        epoch=expected.epoch,
        decision=expected.site_decision,
    )


def _read_text(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + _LEN.size > len(data):
        raise GalleryFormatError(f"gallery blob truncated in the people table ({what} length)")
    (length,) = _LEN.unpack_from(data, pos)
    pos += _LEN.size
    if pos + length > len(data):
        raise GalleryFormatError(f"gallery blob truncated in the people table ({what}: {length} bytes announced)")
    try:
        text = data[pos : pos + length].decode("utf-8")
    except UnicodeDecodeError:
        raise GalleryFormatError(f"gallery blob {what} is not UTF-8") from None
    return text, pos + length


@dataclass(frozen=True)
class GalleryManifest(Message):
    SCHEMA: ClassVar[str] = MANIFEST_SCHEMA
    MAX_BYTES: ClassVar[int] = limits.MAX_MANIFEST_BYTES

    site: str
    version: int
    fingerprint: str
    dim: int
    metric: str
    dtype: str
    count: int  # embeddings
    people: int  # entries in the people table
    blob_size: int
    chunk_count: int
    chunk_size: int  # every chunk is this long except the last, which holds the remainder
    blob_sha256: str
    chunk_sha256: tuple[str, ...]
    created: str
    key_id: str
    signature: str  # base64 Ed25519 signature; "" only on the unsigned draft inside build_publication
    epoch: int = 0  # 1.1: with `version`, the release (module docstring); absent from a 1.0 manifest
    decision: dict[str, Any] | None = None  # 1.1: `SiteDecision.to_wire()`; absent = the encoder's default

    def validate(self) -> None:
        check_id(self, "site")
        check_min(self, "version", 1)
        check_min(self, "epoch", 0)
        check_text(self, "fingerprint", limits.MAX_FINGERPRINT_CHARS)
        if not 1 <= self.dim <= limits.MAX_DIM:
            raise self.invalid("dim", f"must be in [1, {limits.MAX_DIM}], got {self.dim}")
        check_choice(self, "metric", METRICS)
        check_choice(self, "dtype", DTYPES)
        check_min(self, "count", 0)
        check_min(self, "people", 0)
        if not 1 <= self.chunk_size <= limits.MAX_CHUNK_SIZE:
            raise self.invalid("chunk_size", f"must be in [1, {limits.MAX_CHUNK_SIZE}], got {self.chunk_size}")
        least = HEADER_BYTES + self.count * (self.dim * _ITEMSIZE[self.dtype] + 4) + self.people * 2 * _LEN.size
        if not least <= self.blob_size <= limits.MAX_BLOB_BYTES:
            raise self.invalid("blob_size", f"must be in [{least}, {limits.MAX_BLOB_BYTES}], got {self.blob_size}")
        expected_chunks = -(-self.blob_size // self.chunk_size)
        if self.chunk_count != expected_chunks or self.chunk_count > limits.MAX_CHUNK_COUNT:
            raise self.invalid(
                "chunk_count",
                f"is {self.chunk_count}; blob_size / chunk_size needs {expected_chunks} "
                f"(at most {limits.MAX_CHUNK_COUNT})",
            )
        if len(self.chunk_sha256) != self.chunk_count:
            raise self.invalid("chunk_sha256", f"has {len(self.chunk_sha256)} entries for {self.chunk_count} chunks")
        for i, digest in enumerate(self.chunk_sha256):
            if not _HEX64.fullmatch(digest):
                raise self.invalid(f"chunk_sha256[{i}]", "is not 64 lower-case hex digits")
        if not _HEX64.fullmatch(self.blob_sha256):
            raise self.invalid("blob_sha256", "is not 64 lower-case hex digits")
        normalise_ts(self, "created")
        if not _HEX16.fullmatch(self.key_id):
            raise self.invalid("key_id", "is not 16 lower-case hex digits")
        if self.signature:
            try:
                raw = base64.b64decode(self.signature, validate=True)
            except (binascii.Error, ValueError):
                raise self.invalid("signature", "is not base64") from None
            if len(raw) != SIGNATURE_BYTES:
                raise self.invalid("signature", f"holds {len(raw)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}")
        if self.decision is not None:
            SiteDecision.from_wire(self.decision)  # a malformed rule is refused on decode, not when applied

    def to_object(self) -> dict[str, Any]:
        obj = super().to_object()
        if obj["decision"] is None:
            del obj["decision"]  # absent, not null: a manifest without a site rule stays what it was before 1.1
        return obj

    @property
    def site_decision(self) -> SiteDecision | None:
        return None if self.decision is None else SiteDecision.from_wire(self.decision)

    @property
    def release(self) -> tuple[int, int]:
        return (self.epoch, self.version)

    def chunk_length(self, i: int) -> int:
        """The exact length chunk `i` must have."""
        if i < self.chunk_count - 1:
            return self.chunk_size
        return self.blob_size - self.chunk_size * (self.chunk_count - 1)


def signed_bytes(manifest_object: Mapping[str, Any]) -> bytes:
    """What the signature covers: the canonical JSON of the whole object without its `signature` key."""
    return canonical_json({k: v for k, v in manifest_object.items() if k != "signature"})


def read_manifest(payload: bytes, verifier: Verifier) -> GalleryManifest:
    """Decode a manifest and verify that `verifier`'s key signed exactly what was received."""
    obj = decode_object(payload, MANIFEST_SCHEMA, limits.MAX_MANIFEST_BYTES)
    manifest = from_object(GalleryManifest, obj)
    if manifest.key_id != verifier.key_id:
        raise SignatureError(
            f"gallery manifest v{manifest.version} for site {manifest.site} is signed by key {manifest.key_id}; "
            f"this reader trusts key {verifier.key_id}"
        )
    if not manifest.signature:
        raise SignatureError(f"gallery manifest v{manifest.version} for site {manifest.site} is not signed")
    verifier.verify_b64(signed_bytes(obj), manifest.signature)
    return manifest


def build_publication(
    gallery: Gallery,
    signer: Signer,
    chunk_size: int = limits.DEFAULT_CHUNK_SIZE,
    *,
    created: str | None = None,
) -> tuple[GalleryManifest, list[bytes]]:
    """Encode, chunk and sign a gallery: publish the chunks (retained) first, then the manifest (retained)."""
    if not 1 <= chunk_size <= limits.MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk_size must be in [1, {limits.MAX_CHUNK_SIZE}], got {chunk_size}")
    blob = encode_blob(gallery)
    chunks = [blob[i : i + chunk_size] for i in range(0, len(blob), chunk_size)]
    if len(chunks) > limits.MAX_CHUNK_COUNT:
        raise ConfigError(
            f"a {len(blob)} byte gallery needs {len(chunks)} chunks of {chunk_size} bytes; "
            f"at most {limits.MAX_CHUNK_COUNT} are allowed, use a larger chunk_size"
        )
    draft = GalleryManifest(
        site=gallery.site,
        version=gallery.version,
        fingerprint=gallery.fingerprint,
        dim=gallery.dim,
        metric=gallery.metric,
        dtype=gallery.dtype,
        count=gallery.count,
        people=len(gallery.people),
        blob_size=len(blob),
        chunk_count=len(chunks),
        chunk_size=chunk_size,
        blob_sha256=hashlib.sha256(blob).hexdigest(),
        chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
        created=created if created is not None else timestamps.utc_now(),
        key_id=signer.key_id,
        signature="",
        epoch=gallery.epoch,
        decision=None if gallery.decision is None else gallery.decision.to_wire(),
    )
    signature = signer.sign_b64(signed_bytes(draft.to_object()))
    manifest = dataclasses.replace(draft, signature=signature)
    log.info(
        "gallery %s for site %s: %d embeddings, %d people, %d bytes in %d chunks, signed by %s, decision %s",
        release_text(manifest.release),
        manifest.site,
        manifest.count,
        manifest.people,
        manifest.blob_size,
        manifest.chunk_count,
        manifest.key_id,
        "the encoder's default" if gallery.decision is None else gallery.decision.rule.to_dict(),
    )
    return manifest, chunks
