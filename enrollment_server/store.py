"""The enrollment server's database: sites, people, face templates, gallery versions, devices and attendance.

SQLAlchemy Core on SQLite (embedded default) or PostgreSQL. Every public method is one short transaction and returns
frozen dataclasses, never driver rows. Timestamps go in and come out timezone-aware UTC on both backends.

Concurrency: several threads (MQTT ingest, admin API, gallery builder) share one Store. On PostgreSQL each method
relies on READ COMMITTED plus row locks taken by its own UPDATE / INSERT ... ON CONFLICT. On SQLite writers start
with BEGIN IMMEDIATE, so a write transaction holds the database's single write lock from its first statement: no
read-then-upgrade deadlocks (SQLITE_BUSY_SNAPSHOT, which the busy timeout cannot wait out), and readers keep
reading under WAL.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Engine, and_, bindparam, create_engine, event, func, or_, select
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DataError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.pool import StaticPool

from enrollment_server import schema
from enrollment_server.schema import (
    ACK_STATUSES,
    DEVICE_STATES,
    attendance_events,
    devices,
    gallery_acks,
    gallery_versions,
    people,
    site_decisions,
    sites,
    templates,
    unknown_faces,
)
from models.contract.gallery import SiteDecision
from models.contract.timestamps import format_utc, parse_utc
from models.decision.rules import DecisionRule
from models.errors import (
    ConflictError,
    DatabaseVersionError,
    NotFoundError,
    StoreDataError,
    StoreError,
    StoreValueError,
)

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
# RETURNING (used for atomic allocation and per-row insert results) arrived in SQLite 3.35.
_MIN_SQLITE = (3, 35, 0)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise StoreValueError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise StoreValueError(f"{what} {value.isoformat()} is naive: pass a timezone-aware datetime")
    return value.astimezone(timezone.utc)


def _sha256(value: str, what: str) -> str:
    digest = value.lower()
    if not _SHA256.fullmatch(digest):
        raise StoreValueError(f"{what} must be 64 hex digits, got {value!r}")
    return digest


def _nonempty(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StoreValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _ident(value: str, what: str) -> str:
    """An id or fingerprint: non-empty and within the columns' 128 characters (PostgreSQL enforces the limit,
    SQLite does not: checking here gives the same StoreValueError on both)."""
    _nonempty(value, what)
    if len(value) > schema.ID_LENGTH:
        raise StoreValueError(f"{what} is longer than {schema.ID_LENGTH} characters: {value[:40]!r}...")
    return value


def _epoch(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise StoreValueError(f"gallery epoch must be an integer in [0, 2**63), got {value!r}")
    return value


def _lag(
    version: int | None, epoch: int | None, recorded: bool, newest: GalleryVersion | None
) -> tuple[int | None, str]:
    """(lag, sync) of a device holding (epoch, version) against its site's newest recorded release."""
    if newest is None:
        return None, "unpublished"
    if version is None:
        return newest.version, "behind"  # no gallery at all: every version is still to come
    if epoch is not None and epoch != newest.epoch and not recorded:
        # a release this database never recorded: an older epoch (a database restored past it, or moved), or a
        # newer one (a restored or replaced database, another server): versions of two epochs do not subtract
        return None, "ahead" if epoch > newest.epoch else "other_epoch"
    # the same epoch, a recorded release of an earlier one (the version count runs on across epochs in one
    # database), or a 1.0 edge that does not say its epoch
    lag = newest.version - version
    return lag, "current" if lag == 0 else "behind" if lag > 0 else "ahead"


def _optional_ident(value: str | None, what: str) -> str | None:
    return None if value is None else _ident(value, what)


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError as exc:
        raise StoreValueError(f"event_id {value!r} is not a UUID") from exc


# --- records ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    site_id: str
    name: str
    created: datetime


@dataclass(frozen=True)
class Person:
    person_id: str
    site_id: str
    display_name: str
    active: bool
    created: datetime
    updated: datetime


@dataclass(frozen=True)
class TemplateQuality:
    """The enrolment quality figures measured on the photo a template came from (None where not measured)."""

    detector_score: float | None = None
    face_size_px: float | None = None
    blur: float | None = None  # variance of the Laplacian
    pose_score: float | None = None  # 1.0 = frontal


# eq=False: the generated __eq__ would compare numpy arrays, whose `==` is elementwise and cannot be a bool.
@dataclass(frozen=True, eq=False)
class Template:
    id: int
    person_id: str
    embedding: np.ndarray  # float32 (dim,), read-only
    encoder_fingerprint: str
    quality: TemplateQuality
    image_sha256: str
    has_photo: bool
    created: datetime
    has_thumbnail: bool = False

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[0])


# eq=False: the generated __eq__ would compare numpy arrays, whose `==` is elementwise and cannot be a bool.
@dataclass(frozen=True, eq=False)
class SiteEmbeddings:
    """Every template of a site's active people under one encoder fingerprint, ready for an index build.

    Rows are ordered by person_id (bytewise) then template id, so the same database gives the same gallery bytes.
    Unpacks as `embeddings, labels, names = store.site_embeddings(...)`.
    """

    embeddings: np.ndarray  # float32 (n, dim), read-only
    labels: tuple[str, ...]  # person_id of each row
    names: Mapping[str, str]  # person_id -> display name, for every label

    def __iter__(self) -> Iterator[Any]:
        return iter((self.embeddings, self.labels, self.names))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class GalleryVersion:
    site_id: str
    version: int
    fingerprint: str
    count: int
    people: int
    blob_sha256: str
    manifest_json: str
    created: datetime
    epoch: int = 0  # with `version`, the release the edges order by (models.contract.gallery); 0 before schema 2

    @property
    def release(self) -> tuple[int, int]:
        return (self.epoch, self.version)

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_json)


@dataclass(frozen=True)
class SiteRule:
    """A site's own calibrated decision rule (`Store.site_rule`): what the manifest carries, the encoder space it
    belongs to, and the figures it reached on the site's own faces."""

    site_id: str
    fingerprint: str
    decision: SiteDecision
    fpir: float
    dir: float | None


@dataclass(frozen=True)
class DeviceStatus:
    """One status message from an edge (retained `edge/{device}/status`)."""

    device_id: str
    site_id: str
    state: str  # one of DEVICE_STATES
    status_ts: datetime  # the device's timestamp: older statuses than the stored one are ignored
    agent_version: str | None = None
    gallery_version: int | None = None
    fingerprint: str | None = None
    health: Mapping[str, Any] | None = None
    gallery_epoch: int | None = None  # the epoch of gallery_version (None from a 1.0 edge)


# Device.sync: where a device's gallery stands against its site's newest recorded release
SYNC_STATES = (
    "current",  # the newest release
    "behind",  # an older release of this database: `lag` versions behind (a device with no gallery counts v0)
    "ahead",  # a newer release than this database recorded (negative `lag` within an epoch): a restored or
    # replaced database, or a second server publishing the site
    "other_epoch",  # an older epoch this database never recorded: no version count applies (`lag` None)
    "unpublished",  # the site has no recorded gallery
)


@dataclass(frozen=True)
class Device:
    device_id: str
    site_id: str
    state: str
    agent_version: str | None
    gallery_version: int | None
    fingerprint: str | None
    health_json: str | None
    last_seen: datetime | None
    last_status_ts: datetime | None
    latest_site_version: int | None  # the newest recorded gallery version of the device's site
    # latest_site_version - applied version, negative when the device is ahead; None where versions of different
    # epochs cannot be counted (see `sync`)
    lag: int | None
    gallery_epoch: int | None = None
    latest_site_epoch: int | None = None
    sync: str = "unpublished"  # one of SYNC_STATES

    def health(self) -> dict[str, Any] | None:
        return None if self.health_json is None else json.loads(self.health_json)


@dataclass(frozen=True)
class GalleryAck:
    id: int
    device_id: str
    site_id: str
    version: int
    status: str
    error: str | None
    received: datetime
    epoch: int | None = None


@dataclass(frozen=True)
class AttendanceEvent:
    """An attendance event as the edge published it (see DESIGN.md, wire contract)."""

    event_id: str
    seq: int
    device_id: str
    site_id: str
    ts: datetime
    camera: str | None = None
    track_id: int | None = None
    person_id: str | None = None  # None = stranger
    name: str | None = None
    distance: float | None = None
    margin: float | None = None
    threshold: float | None = None
    gallery_version: int | None = None
    fingerprint: str | None = None
    snapshot: str | None = None  # a reference, never image bytes


def _embedding_vector(embedding: np.ndarray) -> np.ndarray:
    """A template's embedding as stored: float32 little-endian; StoreValueError unless a finite 1-D vector."""
    vector = np.asarray(embedding)
    if vector.ndim != 1 or vector.shape[0] == 0 or not np.issubdtype(vector.dtype, np.number):
        raise StoreValueError(f"embedding must be a non-empty 1-D numeric vector, got shape {vector.shape}")
    vector = vector.astype("<f4")
    if not np.all(np.isfinite(vector)):
        raise StoreValueError("embedding holds NaN or infinite values")
    return vector


@dataclass(frozen=True)
class StoredEvent:
    event: AttendanceEvent
    received_at: datetime
    duplicates: int  # how many more times the same event_id arrived after the first


@dataclass(frozen=True)
class DailyAttendance:
    """One person's day at one site: the report row."""

    site_id: str
    person_id: str
    name: str | None
    day: date
    first_seen: datetime  # UTC
    last_seen: datetime  # UTC
    events: int
    device_id: str | None = None  # the door, in a report by door (daily_report(by_door=True)); None otherwise


# eq=False: the generated __eq__ would compare numpy arrays, whose `==` is elementwise and cannot be a bool.
@dataclass(frozen=True, eq=False)
class UnknownFace:
    """The face of a track an edge decided as unknown (models.contract.unknown_face), as stored; crop bytes apart."""

    face_id: str
    site_id: str
    device_id: str
    camera: str
    track_id: int
    ts: datetime
    embedding: np.ndarray  # float32 (dim,), read-only
    fingerprint: str
    gallery_version: int
    distance: float | None
    quality: float


@dataclass(frozen=True, eq=False)
class StoredUnknownFace:
    id: int
    face: UnknownFace
    received_at: datetime


@dataclass(frozen=True)
class LastEvent:
    """A device's most recent attendance event (the Doors page)."""

    device_id: str
    ts: datetime
    person_id: str | None
    name: str | None


# --- row converters ---------------------------------------------------------------------------------------------


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _site(row: Any) -> Site:
    return Site(site_id=row.site_id, name=row.name, created=row.created)


def _person(row: Any) -> Person:
    return Person(
        person_id=row.person_id,
        site_id=row.site_id,
        display_name=row.display_name,
        active=bool(row.active),
        created=row.created,
        updated=row.updated,
    )


def _template(row: Any) -> Template:
    embedding = np.frombuffer(bytes(row.embedding), dtype="<f4").astype(np.float32, copy=False)
    if embedding.shape[0] != row.dim:
        raise StoreError(f"template {row.id}: {embedding.shape[0]} stored values but dim {row.dim}")
    return Template(
        id=int(row.id),
        person_id=row.person_id,
        embedding=_readonly(embedding),
        encoder_fingerprint=row.encoder_fingerprint,
        quality=TemplateQuality(
            detector_score=row.detector_score,
            face_size_px=row.face_size_px,
            blur=row.blur,
            pose_score=row.pose_score,
        ),
        image_sha256=row.image_sha256,
        has_photo=bool(row.has_photo),
        created=row.created,
        has_thumbnail=bool(row.has_thumbnail),
    )


def _unknown_face(row: Any) -> StoredUnknownFace:
    embedding = np.frombuffer(bytes(row.embedding), dtype="<f4").astype(np.float32, copy=False)
    if embedding.shape[0] != row.dim:
        raise StoreError(f"unknown face {row.id}: {embedding.shape[0]} stored values but dim {row.dim}")
    face = UnknownFace(
        face_id=row.face_id,
        site_id=row.site_id,
        device_id=row.device_id,
        camera=row.camera,
        track_id=int(row.track_id),
        ts=row.ts,
        embedding=_readonly(embedding),
        fingerprint=row.fingerprint,
        gallery_version=int(row.gallery_version),
        distance=row.distance,
        quality=float(row.quality),
    )
    return StoredUnknownFace(id=int(row.id), face=face, received_at=row.received_at)


def _gallery_version(row: Any) -> GalleryVersion:
    return GalleryVersion(
        site_id=row.site_id,
        version=int(row.version),
        fingerprint=row.fingerprint,
        count=int(row.count),
        people=int(row.people),
        blob_sha256=row.blob_sha256,
        manifest_json=row.manifest,
        created=row.created,
        epoch=int(row.epoch),
    )


def _ack(row: Any) -> GalleryAck:
    return GalleryAck(
        id=int(row.id),
        device_id=row.device_id,
        site_id=row.site_id,
        version=int(row.version),
        status=row.status,
        error=row.error,
        received=row.received,
        epoch=None if row.epoch is None else int(row.epoch),
    )


_EVENT_FIELDS = tuple(f for f in AttendanceEvent.__dataclass_fields__)


def _stored_event(row: Any) -> StoredEvent:
    mapping = row._mapping
    return StoredEvent(
        event=AttendanceEvent(**{name: mapping[name] for name in _EVENT_FIELDS}),
        received_at=row.received_at,
        duplicates=int(row.duplicates),
    )


def _event_values(event_: AttendanceEvent, received_at: datetime) -> dict[str, Any]:
    """The row for one event, validated: the de-duplication key is the canonical UUID text."""
    values = {name: getattr(event_, name) for name in _EVENT_FIELDS}
    values["event_id"] = _canonical_uuid(event_.event_id)
    values["device_id"] = _ident(event_.device_id, "device_id")
    values["site_id"] = _ident(event_.site_id, "site_id")
    values["person_id"] = _optional_ident(event_.person_id, "person_id")
    values["camera"] = _optional_ident(event_.camera, "camera")
    values["fingerprint"] = _optional_ident(event_.fingerprint, "fingerprint")
    values["ts"] = _utc(event_.ts, "event ts")
    values["received_at"] = received_at
    values["duplicates"] = 0
    return values


# --- the store --------------------------------------------------------------------------------------------------


@contextmanager
def _store_errors() -> Iterator[None]:
    """Driver and SQLAlchemy failures leave the store as StoreError, so callers handle one exception family."""
    try:
        yield
    except (IntegrityError, DataError) as exc:
        # the data, not the database: a retry gets the same refusal (callers that retry tell the two apart)
        raise StoreDataError(f"database refused the data: {exc.orig or exc}") from exc
    except StatementError as exc:
        if isinstance(exc.orig, StoreError):
            raise exc.orig from None  # our own check (e.g. UTCDateTime refusing a naive value), wrapped by SQLAlchemy
        raise StoreError(f"database error: {exc.orig or exc}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"database error: {exc}") from exc


_EVENT_COLUMNS = tuple(c.name for c in attendance_events.c)


def _pg_batch_insert() -> Any:
    """INSERT ... SELECT FROM unnest(one array per column) ON CONFLICT DO NOTHING RETURNING event_id.

    unnest() yields the rows in array order, and the caller sorts them by event_id, which keeps the lock order.
    """
    source = (
        func.unnest(*(bindparam(f"a_{c.name}", type_=pg_dialect.ARRAY(c.type)) for c in attendance_events.c))
        .table_valued(*_EVENT_COLUMNS)
        .render_derived()
    )
    return (
        pg_dialect.insert(attendance_events)
        .from_select(list(_EVENT_COLUMNS), select(*(source.c[name] for name in _EVENT_COLUMNS)))
        .on_conflict_do_nothing(index_elements=[attendance_events.c.event_id])
        .returning(attendance_events.c.event_id)
    )


_PG_BATCH_INSERT = _pg_batch_insert()


@dataclass(frozen=True)
class _Options:
    keep_photos: bool
    busy_timeout_s: float


def _resolve_url(target: str | Path) -> URL:
    """A SQLite file path, or an SQLAlchemy URL for SQLite or PostgreSQL (psycopg 3 driver)."""
    text_target = str(target)
    if isinstance(target, Path) or "://" not in text_target:
        return URL.create("sqlite", database=str(Path(text_target).expanduser().resolve()))
    try:
        url = make_url(text_target)
    except ArgumentError as exc:
        raise StoreValueError(f"not a database URL: {text_target!r}") from exc
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.get_driver_name() not in ("pysqlite", ""):
            raise StoreValueError(f"SQLite is supported through the standard sqlite3 module only, not {url.drivername}")
        return url.set(drivername="sqlite")
    if backend in ("postgresql", "postgres"):
        if "+" in url.drivername and url.get_driver_name() != "psycopg":
            raise StoreValueError(f"PostgreSQL is supported through psycopg 3 only, not {url.drivername}")
        # A bare postgresql:// would pick psycopg2, which is not a dependency.
        return url.set(drivername="postgresql+psycopg")
    raise StoreValueError(f"unsupported database {url.drivername!r}: use a SQLite path or postgresql+psycopg://")


def _create_engine(url: URL, options: _Options) -> Engine:
    if url.get_backend_name() == "postgresql":
        # pre_ping: a server-side restart must not turn into errors on the next request.
        return create_engine(
            url, pool_pre_ping=True, pool_size=8, max_overflow=16, connect_args={"connect_timeout": 10}
        )

    if sqlite3.sqlite_version_info < _MIN_SQLITE:
        raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old: need {'.'.join(map(str, _MIN_SQLITE))}")
    in_memory = url.database in (None, "", ":memory:")
    if in_memory:
        # One shared connection, or every pooled connection would see its own empty database.
        engine = create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False, "timeout": options.busy_timeout_s}
        )
    else:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        engine = create_engine(url, connect_args={"timeout": options.busy_timeout_s}, pool_size=8, max_overflow=16)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (its legacy mode starts no transaction for SELECT
        # or DDL) and emit BEGIN ourselves in _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
                # FULL, not WAL's usual NORMAL: the MQTT ingest acknowledges an event once it is committed, and the
                # edge then drops it from its outbox, so a commit must survive a power cut too.
                cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")  # off by default, per connection: cascades need it
            cursor.execute(f"PRAGMA busy_timeout={int(options.busy_timeout_s * 1000)}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("faceattend_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class Store:
    """The server's persistent state. Thread-safe: share one instance; call close() (or use `with`) at the end."""

    def __init__(self, engine: Engine, options: _Options) -> None:
        self._engine = engine
        self._options = options
        self._dialect = engine.dialect.name
        self._insert = pg_dialect.insert if self._dialect == "postgresql" else sqlite_dialect.insert

    @classmethod
    def open(
        cls, url: str | Path, *, keep_photos: bool = False, busy_timeout_s: float = 30.0, echo: bool = False
    ) -> Store:
        """Open (creating or upgrading its schema) a SQLite file / `sqlite:///` URL or a `postgresql+psycopg://` URL.

        keep_photos: store enrolment photo bytes with templates (off by default: embeddings are enough to rebuild a
        gallery, and photos are the most sensitive data the server could hold).
        Raises DatabaseVersionError for a database from a newer program, StoreError when it cannot be opened.
        """
        resolved = _resolve_url(url)
        options = _Options(keep_photos=keep_photos, busy_timeout_s=busy_timeout_s)
        engine = _create_engine(resolved, options)
        if echo:
            engine.echo = True
        store = cls(engine, options)
        try:
            with store._write() as conn:
                found = schema.migrate(conn, now=_now())
        except DatabaseVersionError:
            engine.dispose()
            raise
        except StoreError as exc:
            engine.dispose()
            raise StoreError(f"cannot open {resolved.render_as_string(hide_password=True)}: {exc}") from exc
        if found != schema.LATEST_VERSION:
            log.info("database schema upgraded from version %d to %d", found, schema.LATEST_VERSION)
        return store

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> URL:
        """The database's resolved URL (with its password: never log it, render with hide_password=True)."""
        return self._engine.url

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        return self._dialect

    def schema_version(self) -> int:
        with self._read() as conn:
            return schema.current_version(conn)

    # -- transactions ---------------------------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with _store_errors(), self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with _store_errors(), self._engine.connect() as conn:
            conn = conn.execution_options(faceattend_write=True)
            with conn.begin():
                yield conn

    def _bytewise(self, column: ColumnElement[str]) -> ColumnElement[str]:
        # PostgreSQL sorts text by the database's locale collation, SQLite bytewise: "C" makes both agree, so an
        # ordered result (and a gallery blob built from it) is the same on either backend.
        return column.collate("C") if self._dialect == "postgresql" else column

    # -- sites ----------------------------------------------------------------------------------------------------

    def ensure_site(self, site_id: str, name: str | None = None) -> Site:
        """The site, created (named `name`, else its id) if it does not exist; an existing site is not renamed."""
        _ident(site_id, "site_id")
        with self._write() as conn:
            conn.execute(
                self._insert(sites)
                .values(site_id=site_id, name=name or site_id, created=_now())
                .on_conflict_do_nothing(index_elements=[sites.c.site_id])
            )
            row = conn.execute(select(sites).where(sites.c.site_id == site_id)).one()
        return _site(row)

    def get_site(self, site_id: str) -> Site:
        with self._read() as conn:
            row = conn.execute(select(sites).where(sites.c.site_id == site_id)).one_or_none()
        if row is None:
            raise NotFoundError(f"no site {site_id!r}")
        return _site(row)

    def list_sites(self) -> list[Site]:
        with self._read() as conn:
            rows = conn.execute(select(sites).order_by(self._bytewise(sites.c.site_id))).all()
        return [_site(row) for row in rows]

    # -- people ---------------------------------------------------------------------------------------------------

    def add_person(self, person_id: str, site_id: str, display_name: str, *, active: bool = True) -> Person:
        """Raises ConflictError if the person id exists (at any site), NotFoundError if the site does not."""
        _ident(person_id, "person_id")
        _nonempty(display_name, "display_name")
        now = _now()
        with self._write() as conn:
            if conn.execute(select(sites.c.site_id).where(sites.c.site_id == site_id)).first() is None:
                raise NotFoundError(f"no site {site_id!r}: create it first (ensure_site)")
            # ON CONFLICT DO NOTHING instead of catching IntegrityError: no returned row means a duplicate, with no
            # driver messages to parse and no way to mistake another constraint's failure for one.
            inserted = conn.execute(
                self._insert(people)
                .values(
                    person_id=person_id,
                    site_id=site_id,
                    display_name=display_name,
                    active=active,
                    created=now,
                    updated=now,
                )
                .on_conflict_do_nothing(index_elements=[people.c.person_id])
                .returning(people)
            ).one_or_none()
        if inserted is None:
            raise ConflictError(f"person {person_id!r} already exists")
        return _person(inserted)

    def get_person(self, person_id: str) -> Person:
        with self._read() as conn:
            row = conn.execute(select(people).where(people.c.person_id == person_id)).one_or_none()
        if row is None:
            raise NotFoundError(f"no person {person_id!r}")
        return _person(row)

    def list_people(self, site_id: str, *, active_only: bool = False) -> list[Person]:
        query = select(people).where(people.c.site_id == site_id)
        if active_only:
            query = query.where(people.c.active.is_(True))
        with self._read() as conn:
            rows = conn.execute(query.order_by(self._bytewise(people.c.person_id))).all()
        return [_person(row) for row in rows]

    def _update_person(self, person_id: str, **values: Any) -> Person:
        with self._write() as conn:
            row = conn.execute(
                people.update()
                .where(people.c.person_id == person_id)
                .values(**values, updated=_now())
                .returning(people)
            ).one_or_none()
        if row is None:
            raise NotFoundError(f"no person {person_id!r}")
        return _person(row)

    def rename_person(self, person_id: str, display_name: str) -> Person:
        return self._update_person(person_id, display_name=_nonempty(display_name, "display_name"))

    def set_active(self, person_id: str, active: bool) -> Person:
        """An inactive person keeps their templates but is left out of galleries built from now on."""
        return self._update_person(person_id, active=bool(active))

    def remove_person(self, person_id: str) -> int:
        """Delete the person and (ON DELETE CASCADE) their templates; returns how many templates went with them.

        Their attendance events stay: they are history. The edges forget the person at the next gallery version.
        """
        with self._write() as conn:
            # FOR UPDATE (PostgreSQL; SQLite's write lock already excludes everyone): an add_template racing with
            # the removal waits or fails on the person's row, so the count below is exactly what the cascade deletes.
            locked = conn.execute(
                select(people.c.person_id).where(people.c.person_id == person_id).with_for_update()
            ).first()
            if locked is None:
                raise NotFoundError(f"no person {person_id!r}")
            removed = conn.execute(
                select(func.count()).select_from(templates).where(templates.c.person_id == person_id)
            ).scalar_one()
            conn.execute(people.delete().where(people.c.person_id == person_id))
        log.info("removed person %s and %d templates", person_id, removed)
        return int(removed)

    # -- templates ------------------------------------------------------------------------------------------------

    def add_template(
        self,
        person_id: str,
        embedding: np.ndarray,
        *,
        encoder_fingerprint: str,
        image_sha256: str,
        quality: TemplateQuality | None = None,
        photo: bytes | None = None,
        thumbnail: bytes | None = None,
    ) -> Template:
        """Store one face embedding of a person (`thumbnail`: a small JPEG of the aligned face, for the console).

        Raises ConflictError when this person already has a template from the same image (sha256), NotFoundError
        for an unknown person, StoreValueError for an embedding that is not a finite 1-D vector.
        """
        vector = _embedding_vector(embedding)
        digest = _sha256(image_sha256, "image_sha256")
        _ident(encoder_fingerprint, "encoder_fingerprint")
        quality = quality or TemplateQuality()
        if photo is not None and not self._options.keep_photos:
            log.debug("photo for %s not stored: keep_photos is off", person_id)
            photo = None
        with self._write() as conn:
            # FOR SHARE: a concurrent remove_person cannot delete the person between this check and the insert (which
            # would surface as a foreign-key error instead of NotFoundError).
            person = select(people.c.person_id).where(people.c.person_id == person_id).with_for_update(read=True)
            if conn.execute(person).first() is None:
                raise NotFoundError(f"no person {person_id!r}")
            template_id = conn.execute(
                self._insert(templates)
                .values(
                    person_id=person_id,
                    embedding=vector.tobytes(),
                    dim=int(vector.shape[0]),
                    encoder_fingerprint=encoder_fingerprint,
                    detector_score=quality.detector_score,
                    face_size_px=quality.face_size_px,
                    blur=quality.blur,
                    pose_score=quality.pose_score,
                    image_sha256=digest,
                    photo=photo,
                    thumbnail=thumbnail,
                    created=_now(),
                )
                .on_conflict_do_nothing(index_elements=[templates.c.person_id, templates.c.image_sha256])
                .returning(templates.c.id)
            ).scalar_one_or_none()
            if template_id is None:
                raise ConflictError(f"person {person_id!r} already has a template from image {digest}")
            # Read back with a plain SELECT: SQLite 3.40 evaluates `photo IS NOT NULL` wrongly inside RETURNING
            # (it said true for a NULL photo), so only bare columns are ever returned from a write.
            row = conn.execute(select(*self._template_columns()).where(templates.c.id == template_id)).one()
        return _template(row)

    @staticmethod
    def _template_columns() -> list[ColumnElement[Any]]:
        # Everything but the image bytes, which only template_photo() and template_thumbnail() read.
        return [
            *(c for c in templates.c if c.name not in ("photo", "thumbnail")),
            templates.c.photo.is_not(None).label("has_photo"),
            templates.c.thumbnail.is_not(None).label("has_thumbnail"),
        ]

    def _template_filter(
        self, person_id: str | None, site_id: str | None, fingerprint: str | None
    ) -> list[ColumnElement[bool]]:
        if (person_id is None) == (site_id is None):
            raise StoreValueError("give exactly one of person_id or site_id")
        where: list[ColumnElement[bool]] = []
        if person_id is not None:
            where.append(templates.c.person_id == person_id)
        else:
            where.append(templates.c.person_id.in_(select(people.c.person_id).where(people.c.site_id == site_id)))
        if fingerprint is not None:
            where.append(templates.c.encoder_fingerprint == fingerprint)
        return where

    def list_templates(
        self, *, person_id: str | None = None, site_id: str | None = None, fingerprint: str | None = None
    ) -> list[Template]:
        """Templates of one person or of every person of a site (active or not), optionally under one encoder."""
        query = (
            select(*self._template_columns())
            .where(*self._template_filter(person_id, site_id, fingerprint))
            .order_by(self._bytewise(templates.c.person_id), templates.c.id)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [_template(row) for row in rows]

    def count_templates(
        self, *, person_id: str | None = None, site_id: str | None = None, fingerprint: str | None = None
    ) -> int:
        where = self._template_filter(person_id, site_id, fingerprint)
        query = select(func.count()).select_from(templates).where(*where)
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def replace_embedding(self, template_id: int, embedding: np.ndarray, *, encoder_fingerprint: str) -> None:
        """Give a template the embedding of the same face under another encoder (`enrollment-server reencode`); its
        photo, thumbnail and quality figures stay. NotFoundError for an unknown template, StoreValueError for an
        embedding that is not a finite 1-D vector."""
        vector = _embedding_vector(embedding)
        _ident(encoder_fingerprint, "encoder_fingerprint")
        values = {
            "embedding": vector.tobytes(),
            "dim": int(vector.shape[0]),
            "encoder_fingerprint": encoder_fingerprint,
        }
        with self._write() as conn:
            updated = conn.execute(templates.update().where(templates.c.id == template_id).values(**values)).rowcount
        if updated == 0:
            raise NotFoundError(f"no template {template_id}")

    def count_foreign_templates(self, site_id: str, fingerprint: str) -> int:
        """Templates of the site's active people made under another encoder fingerprint: left out of its galleries."""
        active = select(people.c.person_id).where(people.c.site_id == site_id, people.c.active)
        query = (
            select(func.count())
            .select_from(templates)
            .where(templates.c.person_id.in_(active), templates.c.encoder_fingerprint != fingerprint)
        )
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def delete_template(self, template_id: int) -> None:
        with self._write() as conn:
            deleted = conn.execute(templates.delete().where(templates.c.id == template_id)).rowcount
        if deleted == 0:
            raise NotFoundError(f"no template {template_id}")

    def template_photo(self, template_id: int) -> bytes | None:
        """The enrolment photo stored with a template (None when photos were not kept)."""
        with self._read() as conn:
            row = conn.execute(select(templates.c.photo).where(templates.c.id == template_id)).one_or_none()
        if row is None:
            raise NotFoundError(f"no template {template_id}")
        return None if row.photo is None else bytes(row.photo)

    def template_thumbnail(self, template_id: int) -> bytes | None:
        """The small JPEG of the template's aligned face (None for templates enrolled before thumbnails existed)."""
        with self._read() as conn:
            row = conn.execute(select(templates.c.thumbnail).where(templates.c.id == template_id)).one_or_none()
        if row is None:
            raise NotFoundError(f"no template {template_id}")
        return None if row.thumbnail is None else bytes(row.thumbnail)

    def site_embeddings(self, site_id: str, fingerprint: str) -> SiteEmbeddings:
        """The gallery's input: one query, one buffer join, one frombuffer (50,000 templates in well under 1 s)."""
        query = (
            select(templates.c.person_id, people.c.display_name, templates.c.dim, templates.c.embedding)
            .join(people, people.c.person_id == templates.c.person_id)
            .where(
                people.c.site_id == site_id,
                people.c.active.is_(True),
                templates.c.encoder_fingerprint == fingerprint,
            )
            .order_by(self._bytewise(templates.c.person_id), templates.c.id)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        dims = {row.dim for row in rows}
        if len(dims) > 1:
            # One fingerprint fixes the dimension; two means the table was written inconsistently.
            raise StoreError(f"site {site_id!r}, fingerprint {fingerprint!r}: templates of dims {sorted(dims)}")
        dim = dims.pop() if dims else 0
        buffer = b"".join(bytes(row.embedding) for row in rows)
        if len(buffer) != 4 * dim * len(rows):
            raise StoreError(f"site {site_id!r}: stored embeddings do not match their dim {dim}")
        embeddings = np.frombuffer(buffer, dtype="<f4").astype(np.float32, copy=False).reshape(len(rows), dim)
        labels = tuple(row.person_id for row in rows)
        names = MappingProxyType({row.person_id: row.display_name for row in rows})
        return SiteEmbeddings(embeddings=_readonly(embeddings), labels=labels, names=names)

    # -- the site's decision rule ----------------------------------------------------------------------------------

    def set_site_rule(self, rule: SiteRule) -> None:
        """Store (replacing any) the site's calibrated rule; the next gallery publication carries it."""
        d = rule.decision
        values = {
            "fingerprint": _ident(rule.fingerprint, "fingerprint"),
            "rule": d.rule.rule,
            "threshold": d.rule.threshold,
            "max_distance": d.rule.max_distance,
            "target_fpir": d.target_fpir,
            "people": d.people,
            "probes": d.probes,
            "strangers": d.strangers,
            "fpir": rule.fpir,
            "dir": rule.dir,
            "calibrated": parse_utc(d.calibrated),
        }
        with self._write() as conn:
            if conn.execute(select(sites.c.site_id).where(sites.c.site_id == rule.site_id)).one_or_none() is None:
                raise NotFoundError(f"no site {rule.site_id!r}")
            conn.execute(
                self._insert(site_decisions)
                .values(site_id=rule.site_id, **values)
                .on_conflict_do_update(index_elements=[site_decisions.c.site_id], set_=values)
            )

    def site_rule(self, site_id: str) -> SiteRule | None:
        """The site's calibrated rule, None when it runs on its encoder's default."""
        with self._read() as conn:
            row = conn.execute(select(site_decisions).where(site_decisions.c.site_id == site_id)).one_or_none()
        if row is None:
            return None
        rule = DecisionRule(row.rule, row.threshold, row.max_distance)
        decision = SiteDecision(
            rule, row.target_fpir, row.people, row.probes, row.strangers, format_utc(row.calibrated)
        )
        return SiteRule(row.site_id, row.fingerprint, decision, row.fpir, row.dir)

    def site_decision(self, site_id: str, fingerprint: str) -> SiteDecision | None:
        """The rule the site's doors apply when their gallery comes from a server of encoder `fingerprint`: the
        site's calibrated rule if it was fitted under that encoder, else None (the encoder's default). A rule of
        another encoder is never published (enrollment_server.gallery_publisher), so nothing else may use it."""
        rule = self.site_rule(site_id)
        return rule.decision if rule is not None and rule.fingerprint == fingerprint else None

    def clear_site_rule(self, site_id: str) -> bool:
        """Back to the encoder's default; False when the site had no rule of its own."""
        with self._write() as conn:
            result = conn.execute(site_decisions.delete().where(site_decisions.c.site_id == site_id))
        return bool(result.rowcount)

    # -- gallery versions -----------------------------------------------------------------------------------------

    def next_gallery_version(self, site_id: str) -> int:
        """Allocate the site's next gallery version number; concurrent callers get distinct, consecutive numbers.

        A number is never handed out twice, even if the build that took it fails and records nothing.
        """
        with self._write() as conn:
            # One statement that increments and reads: the row lock (PostgreSQL) / write lock (SQLite) orders
            # concurrent callers, and each sees the value its own increment produced.
            version = conn.execute(
                sites.update()
                .where(sites.c.site_id == site_id)
                .values(last_gallery_version=sites.c.last_gallery_version + 1)
                .returning(sites.c.last_gallery_version)
            ).scalar_one_or_none()
        if version is None:
            raise NotFoundError(f"no site {site_id!r}")
        return int(version)

    def record_gallery_version(
        self,
        site_id: str,
        version: int,
        *,
        fingerprint: str,
        count: int,
        people: int,
        blob_sha256: str,
        manifest: Mapping[str, Any] | str,
        epoch: int = 0,
    ) -> GalleryVersion:
        """Record a built gallery. The version must have come from next_gallery_version and not be recorded yet."""
        manifest_json = manifest if isinstance(manifest, str) else json.dumps(manifest, sort_keys=True)
        try:
            json.loads(manifest_json)
        except ValueError as exc:
            raise StoreValueError(f"manifest is not JSON: {exc}") from exc
        digest = _sha256(blob_sha256, "blob_sha256")
        _ident(fingerprint, "fingerprint")
        with self._write() as conn:
            allocated = conn.execute(
                select(sites.c.last_gallery_version).where(sites.c.site_id == site_id)
            ).scalar_one_or_none()
            if allocated is None:
                raise NotFoundError(f"no site {site_id!r}")
            if not 1 <= version <= allocated:
                # Recording an unallocated number would let a later next_gallery_version hand it out again.
                raise StoreValueError(f"site {site_id!r}: version {version} was not allocated (last is {allocated})")
            row = conn.execute(
                self._insert(gallery_versions)
                .values(
                    site_id=site_id,
                    version=version,
                    fingerprint=fingerprint,
                    count=count,
                    people=people,
                    blob_sha256=digest,
                    manifest=manifest_json,
                    created=_now(),
                    epoch=_epoch(epoch),
                )
                .on_conflict_do_nothing(index_elements=[gallery_versions.c.site_id, gallery_versions.c.version])
                .returning(gallery_versions)
            ).one_or_none()
        if row is None:
            raise ConflictError(f"site {site_id!r}: gallery version {version} is already recorded")
        return _gallery_version(row)

    def latest_gallery_version(self, site_id: str) -> GalleryVersion | None:
        versions = self.list_gallery_versions(site_id, limit=1)
        return versions[0] if versions else None

    def list_gallery_versions(self, site_id: str, *, limit: int | None = None) -> list[GalleryVersion]:
        """Recorded versions of a site, newest release (epoch, version) first."""
        query = (
            select(gallery_versions)
            .where(gallery_versions.c.site_id == site_id)
            .order_by(gallery_versions.c.epoch.desc(), gallery_versions.c.version.desc())
            .limit(limit)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [_gallery_version(row) for row in rows]

    # -- devices --------------------------------------------------------------------------------------------------

    def register_device(self, device_id: str, site_id: str) -> None:
        """Record the site a device is provisioned for (`provision-device`): the only site it may report under.
        Moves a registered device; never changes its reported state."""
        values = {"device_id": _ident(device_id, "device_id"), "site_id": _ident(site_id, "site_id")}
        insert = self._insert(devices).values(**values, state="unknown")
        with self._write() as conn:
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[devices.c.device_id], set_={"site_id": insert.excluded.site_id}
                )
            )

    def device_site(self, device_id: str) -> str | None:
        """The site a device is registered at; None for a device never provisioned nor heard from."""
        with self._read() as conn:
            return conn.execute(select(devices.c.site_id).where(devices.c.device_id == device_id)).scalar_one_or_none()

    def pin_device_site(self, device_id: str, site_id: str) -> str:
        """The site `device_id` is registered at: its provisioned one, else the first site it reported, which this
        call registers when the device is new (trust on first use)."""
        values = {"device_id": _ident(device_id, "device_id"), "site_id": _ident(site_id, "site_id")}
        with self._write() as conn:
            conn.execute(
                self._insert(devices)
                .values(**values, state="unknown")
                .on_conflict_do_nothing(index_elements=[devices.c.device_id])
            )
            return str(conn.execute(select(devices.c.site_id).where(devices.c.device_id == device_id)).scalar_one())

    def upsert_device_status(self, status: DeviceStatus, *, received: datetime | None = None) -> bool:
        """Store a device's status; returns False (nothing changed) when it is older than the stored one.

        Retained status messages are re-delivered on every reconnect and QoS 1 may reorder them, so only a status
        with a device timestamp at least as new as the stored one is applied; the comparison happens inside the
        upsert, so two concurrent statuses cannot overwrite each other in the wrong order. A known device's site is
        left as registered (register_device, pin_device_site): a status does not move it.
        """
        if status.state not in DEVICE_STATES:
            raise StoreValueError(f"device state {status.state!r} is not one of {DEVICE_STATES}")
        values = {
            "device_id": _ident(status.device_id, "device_id"),
            "site_id": _ident(status.site_id, "site_id"),
            "state": status.state,
            "agent_version": _optional_ident(status.agent_version, "agent_version"),
            "gallery_version": status.gallery_version,
            "gallery_epoch": None if status.gallery_epoch is None else _epoch(status.gallery_epoch),
            "fingerprint": _optional_ident(status.fingerprint, "fingerprint"),
            "health": None if status.health is None else json.dumps(dict(status.health), sort_keys=True),
            "last_seen": _utc(received, "received") if received is not None else _now(),
            "last_status_ts": _utc(status.status_ts, "status_ts"),
        }
        insert = self._insert(devices).values(**values)
        # the site is the registry's (register_device / pin_device_site), not the status's to move
        update = {name: insert.excluded[name] for name in values if name not in ("device_id", "site_id")}
        statement = insert.on_conflict_do_update(
            index_elements=[devices.c.device_id],
            set_=update,
            where=or_(
                devices.c.last_status_ts.is_(None),
                devices.c.last_status_ts <= insert.excluded.last_status_ts,
            ),
        )
        with self._write() as conn:
            # RETURNING, not rowcount: drivers only guarantee rowcount for plain UPDATE / DELETE (through SQLAlchemy,
            # psycopg reports -1 for an upsert), while a returned row is proof that the upsert wrote.
            applied = conn.execute(statement.returning(devices.c.device_id)).first() is not None
        if not applied:
            log.debug("stale status of %s (ts %s) ignored", status.device_id, values["last_status_ts"])
        return applied

    def record_ack(
        self,
        device_id: str,
        site_id: str,
        version: int,
        *,
        ok: bool,
        error: str | None = None,
        received: datetime | None = None,
        epoch: int | None = None,
    ) -> GalleryAck:
        """Store a device's gallery acknowledgement; an ok ack also raises the device's applied release.

        The applied release (epoch, version; a 1.0 edge's missing epoch counts as 0) only moves forward (a
        redelivered old ack must not roll it back); a device the server has not heard a status from yet is
        registered in state "unknown".
        """
        _ident(device_id, "device_id")
        _ident(site_id, "site_id")
        when = _utc(received, "received") if received is not None else _now()
        status = ACK_STATUSES[0] if ok else ACK_STATUSES[1]
        with self._write() as conn:
            row = conn.execute(
                gallery_acks.insert()
                .values(
                    device_id=device_id,
                    site_id=site_id,
                    version=version,
                    status=status,
                    error=error,
                    received=when,
                    epoch=None if epoch is None else _epoch(epoch),
                )
                .returning(gallery_acks)
            ).one()
            if ok:
                insert = self._insert(devices).values(
                    device_id=device_id, site_id=site_id, state="unknown", gallery_version=version, gallery_epoch=epoch
                )
                stored_epoch = func.coalesce(devices.c.gallery_epoch, 0)
                new_epoch = func.coalesce(insert.excluded.gallery_epoch, 0)
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=[devices.c.device_id],
                        set_={
                            "gallery_version": insert.excluded.gallery_version,
                            "gallery_epoch": insert.excluded.gallery_epoch,
                        },
                        where=or_(
                            devices.c.gallery_version.is_(None),
                            stored_epoch < new_epoch,
                            and_(
                                stored_epoch == new_epoch, devices.c.gallery_version < insert.excluded.gallery_version
                            ),
                        ),
                    )
                )
        if not ok:
            log.warning(
                "device %s refused or failed gallery %s v%d (epoch %s): %s", device_id, site_id, version, epoch, error
            )
        return _ack(row)

    def list_acks(self, *, device_id: str | None = None, site_id: str | None = None) -> list[GalleryAck]:
        """Acknowledgements, newest first."""
        query = select(gallery_acks)
        if device_id is not None:
            query = query.where(gallery_acks.c.device_id == device_id)
        if site_id is not None:
            query = query.where(gallery_acks.c.site_id == site_id)
        with self._read() as conn:
            rows = conn.execute(query.order_by(gallery_acks.c.received.desc(), gallery_acks.c.id.desc())).all()
        return [_ack(row) for row in rows]

    def list_devices(self, site_id: str | None = None) -> list[Device]:
        """Devices (of one site, or all) with where their gallery stands against their site's newest release."""
        recorded = (
            select(gallery_versions.c.version)
            .where(
                gallery_versions.c.site_id == devices.c.site_id,
                gallery_versions.c.version == devices.c.gallery_version,
                gallery_versions.c.epoch == devices.c.gallery_epoch,
            )
            .exists()
            .label("recorded")
        )
        query = select(devices, recorded)
        if site_id is not None:
            query = query.where(devices.c.site_id == site_id)
        with self._read() as conn:
            rows = conn.execute(query.order_by(self._bytewise(devices.c.device_id))).all()
        latest = {site: self.latest_gallery_version(site) for site in {row.site_id for row in rows}}
        out = []
        for row in rows:
            newest = latest[row.site_id]
            lag, sync = _lag(row.gallery_version, row.gallery_epoch, bool(row.recorded), newest)
            out.append(
                Device(
                    device_id=row.device_id,
                    site_id=row.site_id,
                    state=row.state,
                    agent_version=row.agent_version,
                    gallery_version=row.gallery_version,
                    fingerprint=row.fingerprint,
                    health_json=row.health,
                    last_seen=row.last_seen,
                    last_status_ts=row.last_status_ts,
                    latest_site_version=newest.version if newest is not None else None,
                    lag=lag,
                    gallery_epoch=None if row.gallery_epoch is None else int(row.gallery_epoch),
                    latest_site_epoch=newest.epoch if newest is not None else None,
                    sync=sync,
                )
            )
        return out

    # -- attendance -----------------------------------------------------------------------------------------------

    def insert_event(self, event_: AttendanceEvent, *, received_at: datetime | None = None) -> bool:
        """Store an event once: True when new, False when its event_id was already stored (duplicates += 1).

        QoS 1 delivers at least once, so redeliveries are expected. INSERT ... ON CONFLICT DO NOTHING decides
        atomically which delivery is first (on PostgreSQL a concurrent same-id insert waits on the unique index
        until the first commits); the others then increment `duplicates` with one UPDATE each, which row-locks.
        """
        values = _event_values(event_, _utc(received_at, "received_at") if received_at is not None else _now())
        with self._write() as conn:
            inserted = conn.execute(
                self._insert(attendance_events)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[attendance_events.c.event_id])
                .returning(attendance_events.c.event_id)
            ).first()
            if inserted is not None:
                return True
            conn.execute(
                attendance_events.update()
                .where(attendance_events.c.event_id == values["event_id"])
                .values(duplicates=attendance_events.c.duplicates + 1)
            )
        return False

    def insert_events(self, batch: Sequence[AttendanceEvent], *, received_at: datetime | None = None) -> list[bool]:
        """Store a batch in one transaction; per event, True for the delivery that stored it, False for duplicates.

        A repeated id inside the batch counts as a duplicate like a repeat across batches. Validation happens before
        anything is written, so a malformed event rejects the whole batch and stores nothing.
        """
        if not batch:
            return []
        when = _utc(received_at, "received_at") if received_at is not None else _now()
        rows = [_event_values(e, when) for e in batch]
        first: dict[str, dict[str, Any]] = {}
        # Ascending event_id order for the INSERT and the UPDATEs: concurrent batches with overlapping ids then
        # take their unique-index and row locks in one global order, so PostgreSQL cannot deadlock them.
        for row in sorted(rows, key=lambda r: r["event_id"]):
            first.setdefault(row["event_id"], row)
        repeats = Counter(row["event_id"] for row in rows)
        unique_rows = list(first.values())
        with self._write() as conn:
            if self._dialect == "postgresql":
                # One array per column through unnest(): the statement text is constant, so psycopg does not
                # re-parse a 500-row VALUES list with 8,500 placeholders per batch (that parse was half the time).
                arrays = {f"a_{name}": [row[name] for row in unique_rows] for name in _EVENT_COLUMNS}
                new_ids = set(conn.execute(_PG_BATCH_INSERT, arrays).scalars())
            else:
                # executemany + RETURNING: SQLAlchemy's "insertmanyvalues" sends multi-row VALUES pages.
                statement = (
                    self._insert(attendance_events)
                    .on_conflict_do_nothing(index_elements=[attendance_events.c.event_id])
                    .returning(attendance_events.c.event_id)
                )
                new_ids = set(conn.execute(statement, unique_rows).scalars())
            extra = [
                {"id_": event_id, "n": repeats[event_id] - (1 if event_id in new_ids else 0)} for event_id in first
            ]
            extra = [item for item in extra if item["n"] > 0]
            if extra:
                conn.execute(
                    attendance_events.update()
                    .where(attendance_events.c.event_id == bindparam("id_"))
                    .values(duplicates=attendance_events.c.duplicates + bindparam("n")),
                    extra,
                )
        results: list[bool] = []
        for row in rows:
            event_id = row["event_id"]
            results.append(event_id in new_ids)
            new_ids.discard(event_id)  # only the first delivery in the batch is the new one
        return results

    def events(
        self,
        *,
        site_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        person_id: str | None = None,
        device_id: str | None = None,
        limit: int | None = None,
    ) -> list[StoredEvent]:
        """Events with start <= ts < end (either bound optional), oldest first."""
        where: list[ColumnElement[bool]] = []
        if site_id is not None:
            where.append(attendance_events.c.site_id == site_id)
        if person_id is not None:
            where.append(attendance_events.c.person_id == person_id)
        if device_id is not None:
            where.append(attendance_events.c.device_id == device_id)
        if start is not None:
            where.append(attendance_events.c.ts >= _utc(start, "start"))
        if end is not None:
            where.append(attendance_events.c.ts < _utc(end, "end"))
        query = (
            select(attendance_events)
            .where(*where)
            .order_by(attendance_events.c.ts, attendance_events.c.event_id)
            .limit(limit)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [_stored_event(row) for row in rows]

    def count_events(self, site_id: str | None = None) -> int:
        query = select(func.count()).select_from(attendance_events)
        if site_id is not None:
            query = query.where(attendance_events.c.site_id == site_id)
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def daily_report(
        self, site_id: str | None, day: date, tz: tzinfo = timezone.utc, *, by_door: bool = False
    ) -> list[DailyAttendance]:
        """First and last sighting and event count of every recognised person on one local day (all sites if None);
        `by_door`: one row per person and door (device) instead of per person.

        The local day [00:00, next 00:00) in `tz` is turned into a UTC interval here (23 or 25 hours across a DST
        change), so SQL only filters on ts and aggregates: no time-zone functions, which SQLite lacks. Names are
        the person's current display name, or the name the event carried if the person was deleted since.
        """
        if isinstance(day, datetime) or not isinstance(day, date):
            raise StoreValueError(f"day must be a date, got {day!r}")
        start = datetime.combine(day, time(0), tzinfo=tz).astimezone(timezone.utc)
        end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz).astimezone(timezone.utc)
        ev = attendance_events
        name = func.coalesce(func.max(people.c.display_name), func.max(ev.c.name)).label("name")
        keys = [ev.c.site_id, ev.c.person_id, *([ev.c.device_id] if by_door else [])]
        query = (
            select(
                *keys,
                name,
                func.min(ev.c.ts).label("first_seen"),
                func.max(ev.c.ts).label("last_seen"),
                func.count().label("events"),
            )
            .select_from(ev.outerjoin(people, people.c.person_id == ev.c.person_id))
            .where(ev.c.person_id.is_not(None), ev.c.ts >= start, ev.c.ts < end)
            .group_by(*keys)
            .order_by(*(self._bytewise(k) for k in keys))
        )
        if site_id is not None:
            query = query.where(ev.c.site_id == site_id)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            DailyAttendance(
                site_id=row.site_id,
                person_id=row.person_id,
                name=row.name,
                day=day,
                first_seen=row.first_seen,
                last_seen=row.last_seen,
                events=int(row.events),
                device_id=row.device_id if by_door else None,
            )
            for row in rows
        ]

    def last_events(self, site_id: str | None = None) -> dict[str, LastEvent]:
        """Each device's most recent event (by event time), keyed by device id."""
        ev = attendance_events
        latest = select(ev.c.device_id, func.max(ev.c.ts).label("ts")).group_by(ev.c.device_id)
        if site_id is not None:
            latest = latest.where(ev.c.site_id == site_id)
        sub = latest.subquery()
        query = (
            select(ev.c.device_id, ev.c.ts, ev.c.person_id, ev.c.name)
            .join(sub, (sub.c.device_id == ev.c.device_id) & (sub.c.ts == ev.c.ts))
            .order_by(ev.c.event_id)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        out: dict[str, LastEvent] = {}
        for row in rows:  # two events of one device at the same instant: the first by event id
            out.setdefault(row.device_id, LastEvent(row.device_id, row.ts, row.person_id, row.name))
        return out

    # -- unknown visitors -----------------------------------------------------------------------------------------

    def add_unknown_face(self, face: UnknownFace, crop: bytes, *, received_at: datetime | None = None) -> bool:
        """Store an unknown visitor's face once: True when new, False when its face_id was stored already."""
        vector = np.asarray(face.embedding)
        if vector.ndim != 1 or vector.shape[0] == 0 or not np.issubdtype(vector.dtype, np.number):
            raise StoreValueError(f"embedding must be a non-empty 1-D numeric vector, got shape {vector.shape}")
        vector = vector.astype("<f4")
        if not np.all(np.isfinite(vector)):
            raise StoreValueError("embedding holds NaN or infinite values")
        if not isinstance(crop, bytes) or not crop:
            raise StoreValueError("crop must be non-empty JPEG bytes")
        values = {
            "face_id": _canonical_uuid(face.face_id),
            "site_id": _ident(face.site_id, "site_id"),
            "device_id": _ident(face.device_id, "device_id"),
            "camera": _ident(face.camera, "camera"),
            "track_id": int(face.track_id),
            "ts": _utc(face.ts, "ts"),
            "received_at": _utc(received_at, "received_at") if received_at is not None else _now(),
            "embedding": vector.tobytes(),
            "dim": int(vector.shape[0]),
            "fingerprint": _ident(face.fingerprint, "fingerprint"),
            "gallery_version": int(face.gallery_version),
            "distance": face.distance,
            "quality": float(face.quality),
            "crop": crop,
        }
        with self._write() as conn:
            inserted = conn.execute(
                self._insert(unknown_faces)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[unknown_faces.c.face_id])
                .returning(unknown_faces.c.id)
            ).first()
        return inserted is not None

    _UNKNOWN_COLUMNS = tuple(c for c in unknown_faces.c if c.name != "crop")

    def list_unknown_faces(
        self, site_id: str, *, fingerprint: str | None = None, ids: Sequence[int] | None = None
    ) -> list[StoredUnknownFace]:
        """A site's stored unknown faces (optionally of one encoder, or only `ids`), oldest first."""
        query = select(*self._UNKNOWN_COLUMNS).where(unknown_faces.c.site_id == site_id)
        if fingerprint is not None:
            query = query.where(unknown_faces.c.fingerprint == fingerprint)
        if ids is not None:
            query = query.where(unknown_faces.c.id.in_([int(i) for i in ids]))
        with self._read() as conn:
            rows = conn.execute(query.order_by(unknown_faces.c.ts, unknown_faces.c.id)).all()
        return [_unknown_face(row) for row in rows]

    def unknown_face_crops(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The JPEG crops of these faces (ids that are not stored are absent)."""
        query = select(unknown_faces.c.id, unknown_faces.c.crop).where(unknown_faces.c.id.in_([int(i) for i in ids]))
        with self._read() as conn:
            return {int(row.id): bytes(row.crop) for row in conn.execute(query).all()}

    def delete_unknown_faces(self, ids: Sequence[int]) -> int:
        with self._write() as conn:
            return int(
                conn.execute(unknown_faces.delete().where(unknown_faces.c.id.in_([int(i) for i in ids]))).rowcount
            )

    def count_unknown_faces(self, site_id: str | None = None) -> int:
        query = select(func.count()).select_from(unknown_faces)
        if site_id is not None:
            query = query.where(unknown_faces.c.site_id == site_id)
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def purge_unknown_faces(self, *, sites: Sequence[str], older_than: datetime, keep: int) -> int:
        """The retention rule of enrollment_server/visitors.py: delete every face of a site not in `sites` (a site
        that stopped opting in), faces decided before `older_than`, then all but each site's newest `keep`.
        Returns how many went."""
        if keep < 0:
            raise StoreValueError(f"keep must be >= 0, got {keep}")
        cutoff = _utc(older_than, "older_than")
        uf = unknown_faces
        with self._write() as conn:
            removed = int(conn.execute(uf.delete().where(uf.c.site_id.not_in(list(sites)))).rowcount)
            removed += int(conn.execute(uf.delete().where(uf.c.ts < cutoff)).rowcount)
            for (site,) in conn.execute(select(uf.c.site_id).distinct()).all():
                # the keep-th newest face of the site: it and everything older go (ts, then id, orders them)
                boundary = conn.execute(
                    select(uf.c.ts, uf.c.id)
                    .where(uf.c.site_id == site)
                    .order_by(uf.c.ts.desc(), uf.c.id.desc())
                    .offset(keep)
                    .limit(1)
                ).first()
                if boundary is None:
                    continue
                older = or_(uf.c.ts < boundary.ts, (uf.c.ts == boundary.ts) & (uf.c.id <= boundary.id))
                removed += int(conn.execute(uf.delete().where(uf.c.site_id == site, older)).rowcount)
        return removed


__all__ = [
    "AttendanceEvent",
    "DailyAttendance",
    "Device",
    "DeviceStatus",
    "GalleryAck",
    "GalleryVersion",
    "LastEvent",
    "Person",
    "Site",
    "SiteEmbeddings",
    "Store",
    "StoredEvent",
    "StoredUnknownFace",
    "Template",
    "TemplateQuality",
    "UnknownFace",
]
