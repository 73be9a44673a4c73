"""The JSON envelope shared by every contract payload, and one generic, strict decoder for all of them.

Envelope rules (DESIGN.md, "Wire contract"):

- every payload is a UTF-8 JSON object with `schema` (e.g. "faceattend.attendance_event") and `schema_version`
  ("MAJOR.MINOR", written as "1.1"; 1.1 added the server's `events_stored` confirmation, models/contract/events.py;
  the gallery epoch: `epoch` in the manifest and the ack, `gallery_epoch` in the edge status; and the unknown
  visitor's face, `models.contract.unknown_face`);
- a reader checks the size first (a per-kind limit, before any parsing), then UTF-8, JSON (no NaN / Infinity,
  no duplicate keys), object, `schema`;
- major version 1 is accepted with any minor (a 1.x writer may add optional fields); another major is refused
  with SchemaVersionError;
- unknown fields are ignored; known fields are type-checked and a missing or mistyped one is named in the error.

Payload types are frozen dataclasses deriving from `Message`: their annotations are the wire types (str, int,
float, bool, `X | None`, `tuple[X, ...]`, `dict`), checked and normalised by `__post_init__` whether the object
comes off the wire or is built in code, and a `validate()` override adds the semantic checks (ranges, ids,
timestamps). A field with a default may be absent on the wire (that is how a minor version adds a field); a
field without one is required, even when its value may be null.

Encoding is canonical: sorted keys, compact separators, UTF-8 (non-ASCII characters not escaped), no NaN.
The same encoding is what the gallery manifest signature covers (see `models.contract.gallery`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar, TypeVar

from models.contract import timestamps
from models.contract.topics import validate_id
from models.errors import PayloadError, SchemaVersionError, TopicError

SCHEMA_VERSION = "1.1"
SUPPORTED_MAJOR = 1

_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")
_INT64 = 2**63  # JSON integers are kept within int64 so SQL stores and other languages read them unchanged

M = TypeVar("M", bound="Message")


class Message:
    """Base of the payload dataclasses: wire type checks on construction, JSON encode / decode."""

    SCHEMA: ClassVar[str]
    MAX_BYTES: ClassVar[int]

    def __post_init__(self) -> None:
        _normalise_fields(self)
        self.validate()

    def validate(self) -> None:
        """Semantic checks beyond the wire types; raise via `self.invalid(field, why)`."""

    def invalid(self, name: str, why: str) -> PayloadError:
        return PayloadError(f"{self.SCHEMA}: field {name!r} {why}")

    def replace_field(self, name: str, value: object) -> None:
        # for normalisation in validate() only (frozen dataclass): the object is not yet visible to anybody
        object.__setattr__(self, name, value)

    def to_object(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"schema": self.SCHEMA, "schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            obj[f.name] = _plain(getattr(self, f.name))
        return obj

    def to_json(self) -> bytes:
        return canonical_json(self.to_object())

    @classmethod
    def from_json(cls: type[M], payload: bytes | bytearray | memoryview) -> M:
        return from_object(cls, decode_object(payload, cls.SCHEMA, cls.MAX_BYTES))


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Sorted keys, compact separators, UTF-8, NaN refused: one byte string per value."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise PayloadError(f"cannot encode a non-finite number: {exc}") from None


def decode_object(payload: bytes | bytearray | memoryview, schema: str, max_bytes: int) -> dict[str, Any]:
    """Envelope checks in order (size, UTF-8, JSON, object, schema, version); return the whole JSON object."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"{schema}: payload must be bytes, got {type(payload).__name__}")
    size = len(payload)  # memoryview of bytes: len is the byte count
    if size > max_bytes:
        raise PayloadError(f"{schema}: payload of {size} bytes exceeds the {max_bytes} byte limit")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"{schema}: payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except RecursionError:
        raise PayloadError(f"{schema}: payload nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, over-long integers
        raise PayloadError(f"{schema}: payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PayloadError(f"{schema}: payload must be a JSON object, got {_json_type(obj)}")
    got = obj.get("schema")
    if got != schema:
        raise PayloadError(f"{schema}: field 'schema' is {got!r}, expected {schema!r}")
    check_version(obj.get("schema_version"), schema)
    return obj


def check_version(version: object, schema: str) -> tuple[int, int]:
    """(major, minor) of a payload's `schema_version`; PayloadError when misspelt, SchemaVersionError for another
    major."""
    if not isinstance(version, str):
        raise PayloadError(f"{schema}: field 'schema_version' must be a string \"MAJOR.MINOR\", got {version!r}")
    m = _VERSION.fullmatch(version)
    if not m:
        raise PayloadError(f"{schema}: field 'schema_version' {version!r} is not \"MAJOR.MINOR\"")
    if int(m[1]) != SUPPORTED_MAJOR:
        raise SchemaVersionError(
            f"{schema}: schema_version {version!r} has major {m[1]}; this reader understands {SUPPORTED_MAJOR}.x"
        )
    return int(m[1]), int(m[2])


def from_object(cls: type[M], obj: Mapping[str, Any]) -> M:
    """Build a message from a decoded object: unknown keys ignored, required ones must be present."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in obj:
            kwargs[f.name] = obj[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise PayloadError(f"{cls.SCHEMA}: missing required field {f.name!r}")
    return cls(**kwargs)


# ---- semantic helpers used by the payload classes' validate() ----


def check_text(msg: Message, name: str, max_chars: int, *, allow_empty: bool = False) -> None:
    value = getattr(msg, name)
    if value is None:
        return
    if not allow_empty and not value:
        raise msg.invalid(name, "must not be empty")
    if len(value) > max_chars:
        raise msg.invalid(name, f"is {len(value)} characters long; the limit is {max_chars}")


def check_id(msg: Message, name: str) -> None:
    try:
        validate_id(getattr(msg, name), name)
    except TopicError as exc:
        raise msg.invalid(name, f"is not a valid id: {exc}") from None


def check_min(msg: Message, name: str, minimum: int) -> None:
    value = getattr(msg, name)
    if value is not None and value < minimum:
        raise msg.invalid(name, f"must be >= {minimum}, got {value}")


def check_choice(msg: Message, name: str, choices: tuple[str, ...]) -> None:
    if getattr(msg, name) not in choices:
        raise msg.invalid(name, f"must be one of {', '.join(choices)}, got {getattr(msg, name)!r}")


def normalise_ts(msg: Message, name: str) -> None:
    try:
        msg.replace_field(name, timestamps.normalise_utc(getattr(msg, name)))
    except ValueError as exc:
        raise msg.invalid(name, str(exc)) from None


# ---- generic wire-type checking ----


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _normalise_fields(msg: Message) -> None:
    hints = _hints(type(msg))
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        value = getattr(msg, f.name)
        checked = _coerce(value, hints[f.name], f.name, msg.SCHEMA)
        if checked is not value:
            object.__setattr__(msg, f.name, checked)


def _coerce(value: Any, hint: Any, where: str, schema: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported wire annotation {hint!r} on {where}")  # a programming error
        return _coerce(value, rest[0], where, schema)
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        if not -_INT64 <= value < _INT64:
            raise PayloadError(f"{schema}: field {where!r} is outside the 64-bit integer range")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        # JSON writers may drop ".0"; the value is the same number
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise PayloadError(f"{schema}: field {where!r} must be a finite number")
        return number
    if origin is tuple and isinstance(value, (list, tuple)):
        item_hint = typing.get_args(hint)[0]
        return tuple(_coerce(v, item_hint, f"{where}[{i}]", schema) for i, v in enumerate(value))
    if (hint is dict or origin is dict) and isinstance(value, Mapping):
        return value  # contents are checked by the message's validate(), which knows their shape
    raise PayloadError(f"{schema}: field {where!r} must be {_expected(hint)}, got {_json_type(value)}")


def _expected(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"an array of {_expected(typing.get_args(hint)[0])}"
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object"}
    return names.get(hint) or names.get(origin) or ("null" if hint is type(None) else str(hint))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # a duplicated key is read differently by different JSON parsers; refusing it keeps every reader (and the
    # manifest signature) seeing the same object
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
