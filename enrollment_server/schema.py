"""The enrollment server's tables (SQLAlchemy Core) and the migrations that create and upgrade them.

The program owns its schema: `migrate()` runs at every open, inside one transaction, and brings the database to
`LATEST_VERSION` or refuses a database that a newer program already upgraded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator

from models.errors import DatabaseVersionError, StoreValueError

log = logging.getLogger(__name__)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so the value is converted to UTC and stored naive in
    SQLAlchemy's fixed-width ISO format, whose lexical order is chronological: comparisons, MIN/MAX and ORDER BY in
    SQL stay correct. Results always come back with tzinfo=timezone.utc, whatever the backend or session zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            # A naive datetime is ambiguous (local? UTC?); guessing would shift attendance by hours.
            raise StoreValueError(f"naive datetime {value.isoformat()} refused: pass a timezone-aware datetime")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            # Aggregates over the column on SQLite may come back as the stored string when the type is lost.
            value = datetime.fromisoformat(str(value))
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# BIGINT ids on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the auto-incrementing rowid alias.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

ID_LENGTH = 128  # site, person, device ids, camera names and fingerprints
DEVICE_STATES = ("online", "stopped", "offline", "unknown")
ACK_STATUSES = ("ok", "error")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", UTCDateTime, nullable=False),
)

sites = Table(
    "sites",
    metadata,
    Column("site_id", String(ID_LENGTH), primary_key=True),
    Column("name", Text, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    # The last gallery version handed out for the site. Allocation is an UPDATE ... RETURNING on this row, which
    # the row lock (PostgreSQL) or the write lock (SQLite) serialises, so concurrent builders never share a number.
    Column("last_gallery_version", Integer, nullable=False, server_default=text("0")),
)

people = Table(
    "people",
    metadata,
    Column("person_id", String(ID_LENGTH), primary_key=True),
    Column("site_id", String(ID_LENGTH), ForeignKey("sites.site_id"), nullable=False),
    Column("display_name", Text, nullable=False),
    Column("active", Boolean, nullable=False, server_default=text("TRUE")),
    Column("created", UTCDateTime, nullable=False),
    Column("updated", UTCDateTime, nullable=False),
    Index(None, "site_id", "active"),
)

templates = Table(
    "templates",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("person_id", String(ID_LENGTH), ForeignKey("people.person_id", ondelete="CASCADE"), nullable=False),
    Column("embedding", LargeBinary, nullable=False),  # float32 little-endian, `dim` values
    Column("dim", Integer, nullable=False),
    Column("encoder_fingerprint", String(ID_LENGTH), nullable=False),
    Column("detector_score", Float),
    Column("face_size_px", Float),
    Column("blur", Float),  # variance of the Laplacian of the aligned chip: low means blurred
    Column("pose_score", Float),  # 1.0 = frontal
    Column("image_sha256", String(64), nullable=False),
    Column("photo", LargeBinary),  # only when the server is configured to keep enrolment photos
    # the aligned face chip as a small JPEG (schema 2), shown by the console; never the photo itself
    Column("thumbnail", LargeBinary),
    Column("created", UTCDateTime, nullable=False),
    # Also the index that serves "templates of this person" (leading column). Deliberately no index on
    # encoder_fingerprint: a site has one or two, so it never narrows a query, and with stale statistics (right after
    # a bulk enrolment) PostgreSQL ANDed it into a per-person nested loop: 12 s instead of 0.1 s for 50,000 templates.
    UniqueConstraint("person_id", "image_sha256"),
)

gallery_versions = Table(
    "gallery_versions",
    metadata,
    Column("site_id", String(ID_LENGTH), ForeignKey("sites.site_id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("fingerprint", String(ID_LENGTH), nullable=False),
    Column("count", Integer, nullable=False),
    Column("people", Integer, nullable=False),
    Column("blob_sha256", String(64), nullable=False),
    Column("manifest", Text, nullable=False),  # the published manifest, JSON
    Column("created", UTCDateTime, nullable=False),
    # schema 2: the manifest's epoch (ms since 1970, models.contract.gallery); 0 for versions published before it
    Column("epoch", BigInteger, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("site_id", "version"),
)

# Devices, acks and events come from the field over MQTT: no foreign keys, so a device that reports a site the
# server does not know yet (or an event about a person deleted since) is still recorded rather than lost.
devices = Table(
    "devices",
    metadata,
    Column("device_id", String(ID_LENGTH), primary_key=True),
    Column("site_id", String(ID_LENGTH), nullable=False),
    Column("state", String(16), nullable=False),
    Column("agent_version", String(ID_LENGTH)),
    Column("gallery_version", Integer),  # the version the device last reported or acknowledged as applied
    Column("fingerprint", String(ID_LENGTH)),
    Column("health", Text),  # JSON
    Column("last_seen", UTCDateTime),  # when the server received the status
    Column("last_status_ts", UTCDateTime),  # the device's own timestamp of that status (orders retained messages)
    Column("gallery_epoch", BigInteger),  # schema 2: the epoch of gallery_version; NULL from a 1.0 edge
    CheckConstraint("state IN ('online', 'stopped', 'offline', 'unknown')", name="state"),
    Index(None, "site_id"),
)

gallery_acks = Table(
    "gallery_acks",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("device_id", String(ID_LENGTH), nullable=False),
    Column("site_id", String(ID_LENGTH), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(8), nullable=False),
    Column("error", Text),
    Column("received", UTCDateTime, nullable=False),
    Column("epoch", BigInteger),  # schema 2: the epoch of `version`; NULL from a 1.0 edge
    CheckConstraint("status IN ('ok', 'error')", name="status"),
    Index(None, "device_id", "received"),
    Index(None, "site_id", "version"),
)

attendance_events = Table(
    "attendance_events",
    metadata,
    Column("event_id", String(36), primary_key=True),  # canonical lower-case UUID: the de-duplication key
    Column("seq", BigInteger, nullable=False),
    Column("device_id", String(ID_LENGTH), nullable=False),
    Column("site_id", String(ID_LENGTH), nullable=False),
    Column("camera", String(ID_LENGTH)),
    Column("track_id", BigInteger),
    Column("person_id", String(ID_LENGTH)),  # NULL = stranger; no FK: events are history and outlive the person
    Column("name", Text),
    Column("distance", Float),
    Column("margin", Float),
    Column("threshold", Float),
    Column("gallery_version", Integer),
    Column("fingerprint", String(ID_LENGTH)),
    Column("ts", UTCDateTime, nullable=False),
    Column("snapshot", Text),  # a reference to the snapshot, never the image bytes
    Column("received_at", UTCDateTime, nullable=False),
    Column("duplicates", Integer, nullable=False, server_default=text("0")),
    Index(None, "site_id", "ts"),
    Index(None, "person_id", "ts"),
    Index(None, "device_id", "seq"),
)


# Faces of tracks an edge decided as unknown, from sites that opted in (enrollment_server/visitors.py). Like events,
# they come from the field: no foreign keys. Naming, ignoring and the retention limits delete rows.
unknown_faces = Table(
    "unknown_faces",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("face_id", String(36), nullable=False, unique=True),  # canonical UUID: QoS 1 redeliveries stored once
    Column("site_id", String(ID_LENGTH), nullable=False),
    Column("device_id", String(ID_LENGTH), nullable=False),
    Column("camera", String(ID_LENGTH), nullable=False),
    Column("track_id", BigInteger, nullable=False),
    Column("ts", UTCDateTime, nullable=False),  # when the edge decided the track
    Column("received_at", UTCDateTime, nullable=False),
    Column("embedding", LargeBinary, nullable=False),  # float32 little-endian, `dim` values
    Column("dim", Integer, nullable=False),
    Column("fingerprint", String(ID_LENGTH), nullable=False),
    Column("gallery_version", Integer, nullable=False),
    Column("distance", Float),  # the decision's nearest distance (None: no gallery)
    Column("quality", Float, nullable=False),  # the edge's sample weight, (0, 1]
    Column("crop", LargeBinary, nullable=False),  # JPEG
    Index(None, "site_id", "ts"),
)


# A site's own calibrated decision rule (schema 4; `enrollment-server calibrate --apply`), published in the gallery
# manifest while `fingerprint` is the publisher's encoder: a threshold means nothing in another embedding space.
site_decisions = Table(
    "site_decisions",
    metadata,
    Column("site_id", String(ID_LENGTH), ForeignKey("sites.site_id"), primary_key=True),
    Column("fingerprint", String(ID_LENGTH), nullable=False),
    Column("rule", String(16), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("max_distance", Float),  # NULL for the distance rule
    Column("target_fpir", Float, nullable=False),
    Column("people", Integer, nullable=False),
    Column("probes", Integer, nullable=False),
    Column("strangers", Integer, nullable=False),
    Column("fpir", Float, nullable=False),  # reached on the calibration strangers
    Column("dir", Float),  # on the site's own genuine probes
    Column("calibrated", UTCDateTime, nullable=False),
)


# --- migrations -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial_schema(conn: Connection) -> None:
    later = (unknown_faces, site_decisions)  # created by their own migrations
    metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t not in later], checkfirst=True)


def _thumbnails_and_unknown_faces(conn: Connection) -> None:
    # Written to hold on both paths to version 2: a database upgraded from version 1 lacks the column, while a fresh
    # one got it from the version-1 step (which creates `templates` as defined above, column included).
    columns = {c["name"] for c in inspect(conn).get_columns(templates.name)}
    if "thumbnail" not in columns:
        kind = LargeBinary().compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE {templates.name} ADD COLUMN thumbnail {kind}"))
    unknown_faces.create(conn, checkfirst=True)


def _add_missing_columns(*columns: Column[Any]) -> Callable[[Connection], None]:
    """A migration adding table columns that do not exist yet. `_initial_schema` creates the tables as defined above,
    i.e. with every column: on a fresh database this finds them all and does nothing, on an older one it adds them."""

    def apply(conn: Connection) -> None:
        inspector = inspect(conn)
        for column in columns:
            table = column.table.name
            if column.name in {c["name"] for c in inspector.get_columns(table)}:
                continue
            ddl = f"ALTER TABLE {table} ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"
            if column.server_default is not None:
                ddl += f" DEFAULT {column.server_default.arg.text}"  # type: ignore[attr-defined]
            if not column.nullable:
                ddl += " NOT NULL"
            conn.execute(text(ddl))

    return apply


# Ordered, append-only. A new migration alters the tables above AND gets an entry here that performs the same change
# on an existing database (ALTER TABLE ...). A fresh database is built by running every migration in order: a later
# migration either leaves out of `_initial_schema` what it creates (a table) or checks before it changes (a column,
# `_add_missing_columns`).
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _initial_schema),
    Migration(
        2,
        "gallery epochs: gallery_versions.epoch, devices.gallery_epoch, gallery_acks.epoch",
        _add_missing_columns(gallery_versions.c.epoch, devices.c.gallery_epoch, gallery_acks.c.epoch),
    ),
    Migration(3, "template thumbnails, unknown visitors' faces", _thumbnails_and_unknown_faces),
    Migration(4, "per-site calibrated decision rules", lambda conn: site_decisions.create(conn, checkfirst=True)),
)
LATEST_VERSION = MIGRATIONS[-1].version

# Any constant works: it only has to be the same for every process of this program on one database.
_PG_MIGRATION_LOCK = 0x46414345_41545444  # "FACEATTD"


def current_version(conn: Connection) -> int:
    """The schema version recorded in the database; 0 for a database this program never touched."""
    if not inspect(conn).has_table(schema_version.name):
        return 0
    return int(conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one())


def migrate(conn: Connection, *, now: datetime) -> int:
    """Bring the database to LATEST_VERSION inside the caller's transaction; returns the version it was at.

    Raises DatabaseVersionError for a database written by a newer program: its tables may have meanings this code
    does not know, so touching them (even reading) could corrupt data or mislead the operator.
    """
    if conn.dialect.name == "postgresql":
        # Two servers starting at once on an empty database would both run CREATE TABLE; the transaction-scoped
        # advisory lock makes the second wait and then find the schema in place. SQLite's BEGIN IMMEDIATE already
        # serialises this.
        conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
    found = current_version(conn)
    if found > LATEST_VERSION:
        raise DatabaseVersionError(
            f"database schema version {found} is newer than this program's {LATEST_VERSION}: "
            "upgrade the program (or point it at another database); nothing was changed"
        )
    for migration in MIGRATIONS:
        if migration.version <= found:
            continue
        log.info("applying schema migration %d: %s", migration.version, migration.description)
        migration.apply(conn)
        conn.execute(
            schema_version.insert().values(version=migration.version, description=migration.description, applied_at=now)
        )
    return found
