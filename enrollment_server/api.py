"""The enrollment server's admin HTTP API: people, face uploads, galleries, devices, attendance (JSON, /api/v1).

Authentication: `Authorization: Bearer <token>` on every endpoint but `GET /healthz` (and the OpenAPI document),
compared in constant time, or the web console's session cookie with its CSRF token (enrollment_server/auth.py).
The one admin token is the whole access model, so a short one is refused at start. Routers added by `routers`
(the console's pages and views) get the same service and authentication through an `ApiContext`.

Status codes: every error the project raises on purpose is a models.errors type (or one of the API's own below),
and `_ERROR_STATUS` is the one place that turns them into HTTP statuses: NotFoundError 404, ConflictError 409,
StoreValueError 422, any other StoreError 503; a request the API refuses is 401 (token), 413 (too large) or 422
(validation, naming the field). Every error body is `{"error": code, "detail": message, "fields": [...]}`.

Face uploads (`POST /api/v1/people/{id}/faces`, multipart, the photos in the repeated field `files`): the body is
capped (BodyLimit: a declared Content-Length above the cap is refused before a byte is read, a streamed body as
soon as its count passes the cap; 413), and the multipart form is parsed only after the token was checked, so an
anonymous client cannot make the server spool a body; more than MAX_FILES photos is a 413 as well. Other requests
are JSON, capped at 64 KiB. Each photo gets its own verdict from the Enroller (decoded by models.imageio.load_image:
empty, truncated, non-image and decompression-bomb files are verdicts, not errors). The answer is 200 when at
least one photo was added, 422 with the same report when none was (so that `curl --fail` and scripts notice that
nothing was enrolled). File names are labels in that report and nothing else: no file is ever written under a
client's name.

Enrollment is CPU-heavy and its pipeline is not thread-safe: it runs in the thread pool, one at a time. The other
endpoints are plain `def`s, which FastAPI runs in the thread pool, so the blocking store never stalls the loop.
"""

import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enrollment_server import reports
from enrollment_server.auth import AdminAuth, AuthError, CsrfError, TooManyLoginsError
from enrollment_server.enrollment import Enroller, EnrollReport
from enrollment_server.store import Device, GalleryVersion, Person, Site, Store, StoredEvent, Template
from models.contract.limits import MAX_NAME_CHARS
from models.errors import (
    ConfigError,
    ConflictError,
    FaceAttendError,
    ImageError,
    NotFoundError,
    StoreError,
    StoreValueError,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
MIN_TOKEN_CHARS = 16
MAX_FILES = 32  # photos per upload: enough for a thorough enrollment, small enough to answer within a minute
JSON_BODY_LIMIT = 64 * 1024  # every body but a face upload is a few hundred bytes of JSON
MAX_EVENTS = 10_000
DEFAULT_EVENTS = 1_000
MAX_SOURCE_CHARS = 200  # a photo's label in the report

# Site ids go into MQTT topics, so they follow the contract's topic id rule (models.contract.topics). A person id
# the API creates goes into URLs, gallery labels and CSV reports: a conservative, URL-safe set. Addressing is
# looser (PERSON_REF_PATTERN): people imported by the CLI from folder names ("Jennifer Aniston") must stay
# manageable here; only what no URL path segment can carry ('/') or what is never a name (controls) is refused.
SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PERSON_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$"
PERSON_REF_PATTERN = r"^[^/\x00-\x1f\x7f]{1,128}$"

SiteId = Annotated[str, StringConstraints(pattern=SITE_ID_PATTERN)]
PersonId = Annotated[str, StringConstraints(pattern=PERSON_ID_PATTERN)]
# the gallery's people table holds names of up to MAX_NAME_CHARS characters
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_NAME_CHARS)]

SitePath = Annotated[str, Path(pattern=SITE_ID_PATTERN, description="site id")]
PersonPath = Annotated[str, Path(pattern=PERSON_REF_PATTERN, description="person id")]


# --- the API's own errors (mapped to statuses in _ERROR_STATUS, like every other error) -------------------------


class ApiError(FaceAttendError):
    """A request the admin API refuses before it reaches the store or the enroller."""


class PayloadTooLargeError(ApiError):
    """A request carries more than the API accepts (bytes, or photos in one upload)."""


class FieldError(ApiError, ValueError):
    """One request field has a value the API cannot use (unknown site, impossible date range, bad time zone)."""

    def __init__(self, field: str, message: str, *, location: str = "query") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.location = location
        self.message = message


class NothingEnrolledError(ApiError):
    """A face upload in which no photo was added; carries the per-photo report for the response body."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# First match wins, so subclasses come before their bases (NotFoundError and ConflictError are StoreErrors).
_ERROR_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (AuthError, 401, "unauthorized"),
    (CsrfError, 403, "forbidden"),
    (TooManyLoginsError, 429, "too_many_logins"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (FieldError, 422, "invalid_field"),
    (NothingEnrolledError, 422, "no_photo_accepted"),
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (StoreValueError, 422, "invalid_value"),
    (StoreError, 503, "store_unavailable"),  # the database is down, locked or newer than this program
    (ImageError, 422, "unreadable_image"),
    (ConfigError, 500, "misconfigured"),
    (FaceAttendError, 500, "internal_error"),
)

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _error_status(exc: Exception) -> tuple[int, str]:
    for kind, status, code in _ERROR_STATUS:
        if isinstance(exc, kind):
            return status, code
    return 500, "internal_error"


# --- HTTP boundary models ---------------------------------------------------------------------------------------


class _Body(BaseModel):
    # an unknown key is a typo the client must hear about, not something to ignore
    model_config = ConfigDict(extra="forbid")


class PersonCreate(_Body):
    person_id: PersonId
    name: DisplayName
    site: SiteId | None = Field(default=None, description="defaults to the server's own site")


class PersonPatch(_Body):
    name: DisplayName | None = None
    active: StrictBool | None = None

    @model_validator(mode="after")
    def _something(self) -> "PersonPatch":
        if self.name is None and self.active is None:
            raise ValueError("give name and / or active")
        return self


class SiteCreate(_Body):
    site: SiteId
    name: DisplayName | None = None


class FaceUploadForm(_Body):
    """The text fields of a face upload (the photos come as the repeated file field `files`)."""

    name: DisplayName | None = Field(default=None, description="creates the person when they do not exist yet")
    site: SiteId | None = Field(default=None, description="site of a new person; defaults to the server's site")
    allow_duplicate_identity: bool = Field(
        default=False,
        description="skip the identity checks: enroll even when a face matches someone else already enrolled, or "
        "(photos added to an existing person) does not look like that person",
    )


class GalleryUpdateOut(BaseModel):
    """Whether the change was handed to the gallery publisher; the stored change stands either way.

    published=False with error=None: no publisher is wired (on_change None) or nothing changed (changed=False).
    """

    changed: bool
    published: bool
    error: str | None = None


class SiteOut(BaseModel):
    site: str
    name: str
    created: datetime


class PersonOut(BaseModel):
    person_id: str
    name: str
    site: str
    active: bool
    created: datetime
    updated: datetime


class TemplateQualityOut(BaseModel):
    detector_score: float | None
    face_size_px: float | None
    blur: float | None
    pose_score: float | None


class TemplateOut(BaseModel):
    template_id: int
    created: datetime
    encoder_fingerprint: str
    current_encoder: bool  # False: made by another encoder, left out of galleries until re-enrolled
    image_sha256: str
    has_photo: bool
    quality: TemplateQualityOut


class PersonDetailOut(PersonOut):
    template_count: int
    templates: list[TemplateOut]


class PersonChangeOut(BaseModel):
    person: PersonOut
    gallery: GalleryUpdateOut


class PersonDeletedOut(BaseModel):
    person_id: str
    templates_removed: int
    gallery: GalleryUpdateOut


class TemplateDeletedOut(BaseModel):
    person_id: str
    template_id: int
    gallery: GalleryUpdateOut


class PhotoOut(BaseModel):
    source: str
    accepted: bool
    reason: str | None
    message: str
    figures: dict[str, float] | None
    template_id: int | None
    matched_person: str | None
    distance: float | None


class EnrollOut(BaseModel):
    person_id: str
    person_created: bool
    added: int
    rejected: int
    photos: list[PhotoOut]
    gallery: GalleryUpdateOut


class SiteGalleryOut(BaseModel):
    site: str
    version: int | None  # None: no gallery recorded yet
    epoch: int | None  # with version, the release edges order by
    count: int
    people: int
    fingerprint: str | None
    blob_sha256: str | None
    created: datetime | None
    current_encoder: bool | None  # whether the gallery was built by this server's encoder


class DeviceOut(BaseModel):
    device_id: str
    state: str
    agent_version: str | None
    gallery_version: int | None  # the version the device acknowledged as applied
    gallery_epoch: int | None  # its epoch (null from a device older than wire schema 1.1)
    latest_version: int | None
    latest_epoch: int | None
    lag: int | None = Field(
        description="versions behind the site's latest; negative: ahead of it; null: versions of two epochs, "
        "which do not subtract (see sync)"
    )
    sync: Literal["current", "behind", "ahead", "other_epoch", "unpublished"] = Field(
        description="ahead: the device holds a newer release than this server recorded (a restored or replaced "
        "database, or another server publishing the site); other_epoch: an older epoch this database never recorded"
    )
    fingerprint: str | None
    last_seen: datetime | None
    last_status_ts: datetime | None
    health: dict[str, Any] | None


class SiteDevicesOut(BaseModel):
    site: str
    latest_version: int | None
    latest_epoch: int | None
    devices: list[DeviceOut]


class EventOut(BaseModel):
    event_id: str
    seq: int
    device_id: str
    site: str
    ts: datetime
    camera: str | None
    track_id: int | None
    person_id: str | None
    name: str | None
    distance: float | None
    margin: float | None
    threshold: float | None
    gallery_version: int | None
    fingerprint: str | None
    snapshot: str | None
    received_at: datetime
    duplicates: int


class EventsOut(BaseModel):
    count: int
    limit: int
    truncated: bool  # True when `limit` events came back: there may be more, ask for a later date_from
    events: list[EventOut]


class ReportRowOut(BaseModel):
    site: str
    person_id: str
    name: str | None
    day: date
    first_seen: datetime
    last_seen: datetime
    events: int


class ReportOut(BaseModel):
    site: str | None
    date: date
    tz: str
    rows: list[ReportRowOut]


class HealthOut(BaseModel):
    status: Literal["ok"]
    # the running server's MQTT links and ingest counters (absent when the API runs without them, as in tests)
    components: dict[str, Any] | None = None


class ErrorFieldOut(BaseModel):
    field: str
    location: str
    message: str
    type: str


class ErrorOut(BaseModel):
    error: str
    detail: str
    fields: list[ErrorFieldOut] = Field(default_factory=list)


# --- converters -------------------------------------------------------------------------------------------------


def _person_out(p: Person) -> PersonOut:
    return PersonOut(
        person_id=p.person_id,
        name=p.display_name,
        site=p.site_id,
        active=p.active,
        created=p.created,
        updated=p.updated,
    )


def _template_out(t: Template, fingerprint: str) -> TemplateOut:
    q = t.quality
    return TemplateOut(
        template_id=t.id,
        created=t.created,
        encoder_fingerprint=t.encoder_fingerprint,
        current_encoder=t.encoder_fingerprint == fingerprint,
        image_sha256=t.image_sha256,
        has_photo=t.has_photo,
        quality=TemplateQualityOut(
            detector_score=q.detector_score, face_size_px=q.face_size_px, blur=q.blur, pose_score=q.pose_score
        ),
    )


def _site_out(s: Site) -> SiteOut:
    return SiteOut(site=s.site_id, name=s.name, created=s.created)


def _gallery_out(site: str, g: GalleryVersion | None, fingerprint: str) -> SiteGalleryOut:
    if g is None:
        return SiteGalleryOut(
            site=site,
            version=None,
            epoch=None,
            count=0,
            people=0,
            fingerprint=None,
            blob_sha256=None,
            created=None,
            current_encoder=None,
        )
    return SiteGalleryOut(
        site=site,
        version=g.version,
        epoch=g.epoch,
        count=g.count,
        people=g.people,
        fingerprint=g.fingerprint,
        blob_sha256=g.blob_sha256,
        created=g.created,
        current_encoder=g.fingerprint == fingerprint,
    )


def _device_out(d: Device) -> DeviceOut:
    return DeviceOut(
        device_id=d.device_id,
        state=d.state,
        agent_version=d.agent_version,
        gallery_version=d.gallery_version,
        gallery_epoch=d.gallery_epoch,
        latest_version=d.latest_site_version,
        latest_epoch=d.latest_site_epoch,
        lag=d.lag,
        sync=d.sync,  # type: ignore[arg-type]
        fingerprint=d.fingerprint,
        last_seen=d.last_seen,
        last_status_ts=d.last_status_ts,
        health=d.health(),
    )


def _event_out(s: StoredEvent) -> EventOut:
    e = s.event
    return EventOut(
        event_id=e.event_id,
        seq=e.seq,
        device_id=e.device_id,
        site=e.site_id,
        ts=e.ts,
        camera=e.camera,
        track_id=e.track_id,
        person_id=e.person_id,
        name=e.name,
        distance=e.distance,
        margin=e.margin,
        threshold=e.threshold,
        gallery_version=e.gallery_version,
        fingerprint=e.fingerprint,
        snapshot=e.snapshot,
        received_at=s.received_at,
        duplicates=s.duplicates,
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PERSON_ID_RULE = "a new person's id is 1-128 of [A-Za-z0-9_.@+-], starting with a letter or digit"


def photo_labels(names: Sequence[str | None]) -> list[str]:
    """One distinct label per uploaded photo: its client file name, cleaned, else its position.

    Only a label: nothing is ever opened or written under it. Distinct because the report is matched to the photos
    by label (phones upload every photo as "image.jpg").
    """
    labels: list[str] = []
    seen: set[str] = set()
    for i, raw in enumerate(names, start=1):
        name = _CONTROL.sub("", unicodedata.normalize("NFC", raw or "")).strip()[:MAX_SOURCE_CHARS] or f"photo-{i}"
        label, n = name, 1
        while label in seen:
            n += 1
            label = f"{name} ({n})"
        seen.add(label)
        labels.append(label)
    return labels


# --- the service behind the routes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GalleryUpdate:
    changed: bool
    published: bool
    error: str | None = None

    def out(self) -> GalleryUpdateOut:
        return GalleryUpdateOut(changed=self.changed, published=self.published, error=self.error)


UNCHANGED = GalleryUpdate(changed=False, published=False)


@dataclass(frozen=True)
class EnrollRequest:
    person_id: str
    name: str
    site: str
    photos: tuple[tuple[str, bytes], ...]
    allow_duplicate_identity: bool


class AdminService:
    """What the routes do, as plain blocking methods (the routes run them in the thread pool)."""

    def __init__(
        self, store: Store, enroller: Enroller, default_site: str, on_change: Callable[[str], object] | None
    ) -> None:
        self.store = store
        self.enroller = enroller
        self.default_site = default_site
        self.on_change = on_change
        # the face pipeline (ONNX sessions, aligner state) is not thread-safe: one enrollment at a time
        self._enroll_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------------------------------

    def known_site(self, site: str | None, field: str = "site", *, location: str = "query") -> str:
        """The site (the server's own when None); an unknown one is the client's mistake, named by field."""
        site = self.default_site if site is None else site
        try:
            self.store.get_site(site)
        except NotFoundError as exc:
            raise FieldError(field, f"unknown site {site!r}", location=location) from exc
        return site

    def gallery_changed(self, site: str) -> GalleryUpdate:
        """Tell the publisher; its failure is reported, never raised: the stored change must stand."""
        if self.on_change is None:
            return GalleryUpdate(changed=True, published=False)
        try:
            self.on_change(site)
        except FaceAttendError as exc:  # broker down, publication timed out: expected, retried on reconnect
            log.warning("gallery of site %s not published after a change (the change is stored): %s", site, exc)
            return GalleryUpdate(changed=True, published=False, error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("gallery publication for site %s failed after a change; the change is stored", site)
            return GalleryUpdate(changed=True, published=False, error=f"{type(exc).__name__}: {exc}")
        return GalleryUpdate(changed=True, published=True)

    # -- sites and people ------------------------------------------------------------------------------------------

    def create_site(self, body: SiteCreate) -> SiteOut:
        try:
            self.store.get_site(body.site)
        except NotFoundError:
            site = self.store.ensure_site(body.site, body.name)
            log.info("site %s created", site.site_id)
            return _site_out(site)
        raise ConflictError(f"site {body.site!r} already exists")

    def create_person(self, body: PersonCreate) -> PersonOut:
        site = self.known_site(body.site, location="body")
        person = self.store.add_person(body.person_id, site, body.name)
        log.info("person %s created at %s", person.person_id, site)
        # no gallery change: a person without templates is not in any gallery
        return _person_out(person)

    def person_detail(self, person_id: str) -> PersonDetailOut:
        person = self.store.get_person(person_id)
        templates = self.store.list_templates(person_id=person_id)
        fingerprint = self.enroller.fingerprint
        return PersonDetailOut(
            **_person_out(person).model_dump(),
            template_count=len(templates),
            templates=[_template_out(t, fingerprint) for t in templates],
        )

    def patch_person(self, person_id: str, body: PersonPatch) -> PersonChangeOut:
        person = self.store.get_person(person_id)
        changed = False
        if body.name is not None and body.name != person.display_name:
            person = self.store.rename_person(person_id, body.name)  # names travel in the gallery's people table
            changed = True
        if body.active is not None and body.active != person.active:
            person = self.store.set_active(person_id, body.active)
            changed = True
        if changed:
            log.info("person %s updated: name=%r active=%s", person_id, person.display_name, person.active)
        gallery = self.gallery_changed(person.site_id) if changed else UNCHANGED
        return PersonChangeOut(person=_person_out(person), gallery=gallery.out())

    def delete_person(self, person_id: str) -> PersonDeletedOut:
        site = self.store.get_person(person_id).site_id
        removed = self.store.remove_person(person_id)
        return PersonDeletedOut(
            person_id=person_id, templates_removed=removed, gallery=self.gallery_changed(site).out()
        )

    def delete_template(self, person_id: str, template_id: int) -> TemplateDeletedOut:
        person = self.store.get_person(person_id)
        # the store deletes by template id alone: make sure the URL's person owns it
        if template_id not in {t.id for t in self.store.list_templates(person_id=person_id)}:
            raise NotFoundError(f"person {person_id!r} has no template {template_id}")
        self.store.delete_template(template_id)
        log.info("template %d of %s deleted", template_id, person_id)
        return TemplateDeletedOut(
            person_id=person_id, template_id=template_id, gallery=self.gallery_changed(person.site_id).out()
        )

    # -- enrollment ------------------------------------------------------------------------------------------------

    def enroll_target(self, person_id: str, form: FaceUploadForm) -> tuple[str, str]:
        """(name, site) to enroll under: the person's own, or the form's for a person to create."""
        try:
            person = self.store.get_person(person_id)
        except NotFoundError as exc:
            if form.name is None:
                raise NotFoundError(
                    f"no person {person_id!r}: to create them with this upload, give the form field name (and site)"
                ) from exc
            if not re.fullmatch(PERSON_ID_PATTERN, person_id):
                raise FieldError("person_id", _PERSON_ID_RULE, location="path") from exc
            return form.name, self.known_site(form.site, location="body")
        if form.site is not None and form.site != person.site_id:
            raise ConflictError(f"person {person_id!r} is enrolled at site {person.site_id!r}, not {form.site!r}")
        return person.display_name, person.site_id

    def enroll(self, request: EnrollRequest) -> EnrollReport:
        with self._enroll_lock:
            return self.enroller.enroll(
                request.person_id,
                request.name,
                request.site,
                request.photos,
                allow_duplicate_identity=request.allow_duplicate_identity,
            )

    # -- read-only views -------------------------------------------------------------------------------------------

    def site_devices(self, site: str) -> SiteDevicesOut:
        self.store.get_site(site)
        latest = self.store.latest_gallery_version(site)
        return SiteDevicesOut(
            site=site,
            latest_version=latest.version if latest else None,
            latest_epoch=latest.epoch if latest else None,
            devices=[_device_out(d) for d in self.store.list_devices(site)],
        )

    def attendance(
        self, site: str | None, date_from: date | None, date_to: date | None, person_id: str | None, limit: int
    ) -> EventsOut:
        if site is not None:
            self.known_site(site)
        if date_from is not None and date_to is not None and date_to < date_from:
            raise FieldError("date_to", f"{date_to} is before date_from {date_from}")
        # whole UTC days, date_to included
        start = None if date_from is None else datetime.combine(date_from, time(0), tzinfo=timezone.utc)
        end = None if date_to is None else datetime.combine(date_to + timedelta(days=1), time(0), tzinfo=timezone.utc)
        events = self.store.events(site_id=site, start=start, end=end, person_id=person_id, limit=limit)
        return EventsOut(
            count=len(events), limit=limit, truncated=len(events) >= limit, events=[_event_out(e) for e in events]
        )


def time_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise FieldError("tz", f"unknown time zone {name!r} (an IANA name such as Europe/Paris)") from exc


# --- exception handlers: the one place where errors become statuses ---------------------------------------------


def _error_response(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    return JSONResponse({"error": code, "detail": detail, "fields": [], **extra}, status_code=status, headers=headers)


async def _on_project_error(request: Request, exc: Exception) -> JSONResponse:
    status, code = _error_status(exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, AuthError):
        extra["headers"] = {"WWW-Authenticate": exc.challenge}
        log.warning("%s %s from %s: %s", request.method, request.url.path, _client(request), exc)
    elif isinstance(exc, FieldError):
        extra["fields"] = [{"field": exc.field, "location": exc.location, "message": exc.message, "type": code}]
    elif isinstance(exc, NothingEnrolledError):
        extra.update(exc.report)
    elif isinstance(exc, PayloadTooLargeError):
        log.warning("%s %s from %s: %s", request.method, request.url.path, _client(request), exc)
    elif status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return _error_response(status, code, str(exc), **extra)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors: Sequence[Any] = exc.errors() if isinstance(exc, RequestValidationError) else ()
    fields = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ())]
        location = loc[0] if loc else "request"
        field = ".".join(loc[1:]) or location
        # the offending input is not echoed back: it may be large, or a secret pasted into the wrong field
        fields.append({"field": field, "location": location, "message": e.get("msg", ""), "type": e.get("type", "")})
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
    return _error_response(422, "validation_error", detail, fields=fields)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):  # registered for that type only
        return await _on_unexpected_error(request, exc)
    status = exc.status_code
    return _error_response(status, _HTTP_CODES.get(status, "http_error"), str(exc.detail), headers=exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: unexpected %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return _error_response(500, "internal_error", "internal server error")


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


# --- the body cap -----------------------------------------------------------------------------------------------

_UPLOAD_PATH = re.compile(rf"{API_PREFIX}/people/[^/]+/faces")


class BodyLimit:
    """413 for a request body over its cap, before it is read: a declared Content-Length over the cap is refused
    without calling the app, a streamed (chunked) body as soon as the bytes received pass it.

    Face uploads get the configured upload cap, every other request the small JSON cap. Pure ASGI rather than
    FastAPI's own body limit, whose 413 is a plain-text "Content Too Large" that names no limit.
    """

    def __init__(self, app: ASGIApp, *, upload_bytes: int, other_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.other_bytes = other_bytes

    def limit_for(self, scope: Scope) -> int:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        is_upload = scope["method"] == "POST" and _UPLOAD_PATH.fullmatch(path) is not None
        return self.upload_bytes if is_upload else self.other_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, f"request body of {declared} bytes exceeds {_limit_text(limit)}")
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise PayloadTooLargeError(f"request body exceeds {_limit_text(limit)}")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app made of the aborted read (FastAPI answers 400 to a failed body), it is a 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._refuse(scope, receive, send, f"request body exceeds {_limit_text(limit)}")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        # through the same handler as every other error, so the 413 has the API's error shape
        response = await _on_project_error(Request(scope, receive), PayloadTooLargeError(message))
        await response(scope, receive, send)


def _limit_text(limit: int) -> str:
    if limit >= 2**20:
        return f"this endpoint's limit of {limit} bytes ({limit / 2**20:g} MiB)"
    return f"this endpoint's limit of {limit} bytes"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server (h11, httptools) refuses a malformed length before we see it
    return None


# --- the app ----------------------------------------------------------------------------------------------------

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
    422: {"model": ErrorOut, "description": "a field is invalid (named in `fields`)"},
    503: {"model": ErrorOut, "description": "the database is unavailable"},
}


def _upload_openapi() -> dict[str, Any]:
    """The multipart body of a face upload, for the OpenAPI document (the route parses the form itself)."""
    schema = FaceUploadForm.model_json_schema()
    schema["properties"] = {
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "maxItems": MAX_FILES,
            "description": "the photos (repeat the field once per photo)",
        },
        **schema["properties"],
    }
    schema["required"] = ["files"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _check_settings(token: str, max_upload_bytes: int, site: str) -> None:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"api.token must be at least {MIN_TOKEN_CHARS} characters (set it, or FACEATTEND_ADMIN_TOKEN); "
            "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError("api.token must be printable ASCII without spaces (it travels in an HTTP header)")
    if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes <= 0:
        raise ConfigError(f"api.max_upload_mib must give a positive byte count, got {max_upload_bytes!r}")
    if not isinstance(site, str) or not re.fullmatch(SITE_ID_PATTERN, site):
        raise ConfigError(f"site {site!r} is not a valid site id (1-64 of [A-Za-z0-9_.-], starting alphanumeric)")


@dataclass(frozen=True)
class ApiContext:
    """What a router added through `create_app(routers=...)` builds on: the admin service, the authentication, and
    `require`, the dependency that admits a request (bearer token, or console session + CSRF token)."""

    service: AdminService
    auth: AdminAuth
    require: Any  # a FastAPI Depends(...)


def create_app(
    store: Store,
    enroller: Enroller,
    *,
    token: str,
    max_upload_bytes: int,
    on_change: Callable[[str], object] | None = None,
    devices_site: str,
    health: Callable[[], dict[str, Any]] | None = None,
    session_ttl_s: float = 12 * 3600.0,
    routers: Sequence[Callable[[ApiContext], APIRouter]] = (),
) -> FastAPI:
    """The admin API over one store and enroller.

    token: the admin bearer token (>= 16 characters, else ConfigError). max_upload_bytes: the cap on a face upload's
    whole request body. on_change(site): called after every change that alters a site's gallery (the server wires
    the gallery publisher to it). devices_site: the server's own site (ServerConfig.site): the default wherever a
    request names no site, created in the store if absent. health(): extra figures for `GET /healthz`.
    session_ttl_s: how long a console login lasts. routers: more routes (the console), each built from the context.
    """
    _check_settings(token, max_upload_bytes, devices_site)
    store.ensure_site(devices_site)
    service = AdminService(store, enroller, devices_site, on_change)
    auth = AdminAuth(token, session_ttl_s=session_ttl_s)
    bearer = HTTPBearer(
        auto_error=False, scheme_name="bearerAuth", description="the admin token (api.token / FACEATTEND_ADMIN_TOKEN)"
    )

    async def require_token(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        auth.authenticate(request, None if credentials is None else credentials.credentials)

    app = FastAPI(
        title="faceattend enrollment server",
        version="1",
        summary="Admin API: people, face enrollment, galleries, devices, attendance",
    )
    app.add_middleware(BodyLimit, upload_bytes=max_upload_bytes, other_bytes=JSON_BODY_LIMIT)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(FaceAttendError, _on_project_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)

    @app.get("/healthz", tags=["health"], response_model_exclude_none=True)
    def healthz() -> HealthOut:
        """Liveness and database reachability; needs no token (for load balancers and probes)."""
        store.schema_version()  # StoreError -> 503
        return HealthOut(status="ok", components=health() if health else None)

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)], responses=_ERROR_RESPONSES)

    # -- sites ---------------------------------------------------------------------------------------------------

    @api.get("/sites", tags=["sites"])
    def list_sites() -> list[SiteOut]:
        return [_site_out(s) for s in store.list_sites()]

    @api.post("/sites", status_code=201, tags=["sites"], responses={409: {"model": ErrorOut}})
    def create_site(body: SiteCreate) -> SiteOut:
        return service.create_site(body)

    @api.get("/sites/{site}/gallery", tags=["sites"], responses={404: {"model": ErrorOut}})
    def site_gallery(site: SitePath) -> SiteGalleryOut:
        """The latest recorded gallery version of the site."""
        store.get_site(site)
        return _gallery_out(site, store.latest_gallery_version(site), enroller.fingerprint)

    @api.get("/sites/{site}/devices", tags=["sites"], responses={404: {"model": ErrorOut}})
    def site_devices(site: SitePath) -> SiteDevicesOut:
        """The site's edge devices: state, agent version, applied gallery version and lag, last seen."""
        return service.site_devices(site)

    # -- people --------------------------------------------------------------------------------------------------

    @api.post("/people", status_code=201, tags=["people"], responses={409: {"model": ErrorOut}})
    def create_person(body: PersonCreate) -> PersonOut:
        return service.create_person(body)

    @api.get("/people", tags=["people"])
    def list_people(
        site: Annotated[SiteId | None, Query(description="defaults to the server's site")] = None,
        active_only: bool = False,
    ) -> list[PersonOut]:
        return [_person_out(p) for p in store.list_people(service.known_site(site), active_only=active_only)]

    @api.get("/people/{person_id}", tags=["people"], responses={404: {"model": ErrorOut}})
    def get_person(person_id: PersonPath) -> PersonDetailOut:
        """The person with their templates' quality figures (never the embeddings)."""
        return service.person_detail(person_id)

    @api.patch("/people/{person_id}", tags=["people"], responses={404: {"model": ErrorOut}})
    def patch_person(person_id: PersonPath, body: PersonPatch) -> PersonChangeOut:
        """Rename and / or (de)activate; an inactive person keeps their templates but leaves the gallery."""
        return service.patch_person(person_id, body)

    @api.delete("/people/{person_id}", tags=["people"], responses={404: {"model": ErrorOut}})
    def delete_person(person_id: PersonPath) -> PersonDeletedOut:
        """Delete the person and their templates; their attendance history stays."""
        return service.delete_person(person_id)

    @api.delete("/people/{person_id}/faces/{template_id}", tags=["people"], responses={404: {"model": ErrorOut}})
    def delete_face(person_id: PersonPath, template_id: Annotated[int, Path(ge=1)]) -> TemplateDeletedOut:
        return service.delete_template(person_id, template_id)

    @api.post(
        "/people/{person_id}/faces",
        tags=["people"],
        openapi_extra=_upload_openapi(),
        responses={
            404: {"model": ErrorOut, "description": "no such person, and no name given to create them"},
            409: {"model": ErrorOut, "description": "the person belongs to another site"},
            413: {"model": ErrorOut, "description": f"body over the upload cap, or more than {MAX_FILES} photos"},
            422: {"description": "invalid field, or no photo was added (the body is then the full report)"},
        },
    )
    async def upload_faces(person_id: PersonPath, request: Request) -> EnrollOut:
        """Enroll photos (multipart field `files`, repeated); creates the person when `name` is given.

        200 when at least one photo was added, 422 with the same per-photo report when none was.
        """
        # parsed here, after the token check, rather than by FastAPI before it: an anonymous client must not be
        # able to make the server spool a body (BodyLimit counts what request.form() streams)
        form = await request.form()
        try:
            fields, uploads = _split_form(form.multi_items())
            upload_form = _validate_form(fields)
            if len(uploads) > MAX_FILES:
                raise PayloadTooLargeError(f"{len(uploads)} photos in one upload; at most {MAX_FILES}")
            if not uploads:
                raise FieldError("files", "no photo: send one or more files in the field 'files'", location="body")
            labels = photo_labels([u.filename for u in uploads])
            photos = tuple([(label, await u.read()) for label, u in zip(labels, uploads, strict=True)])
        finally:
            await form.close()
        name, site = await run_in_threadpool(service.enroll_target, person_id, upload_form)
        report = await run_in_threadpool(
            service.enroll,
            EnrollRequest(person_id, name, site, photos, upload_form.allow_duplicate_identity),
        )
        gallery = await run_in_threadpool(service.gallery_changed, site) if report.added else UNCHANGED
        payload = {**report.to_json(), "gallery": gallery.out().model_dump()}
        if not report.added:
            reasons = sorted({r.reason or "?" for r in report.results})
            raise NothingEnrolledError(f"no photo was added ({', '.join(reasons)}): see photos", payload)
        return EnrollOut.model_validate(payload)

    # -- attendance ----------------------------------------------------------------------------------------------

    @api.get("/attendance", tags=["attendance"])
    def attendance(
        site: SiteId | None = None,
        date_from: Annotated[date | None, Query(description="first UTC day, YYYY-MM-DD")] = None,
        date_to: Annotated[date | None, Query(description="last UTC day (included), YYYY-MM-DD")] = None,
        person_id: Annotated[str | None, Query(pattern=PERSON_REF_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = DEFAULT_EVENTS,
    ) -> EventsOut:
        """Attendance events, oldest first (all sites when no site is given)."""
        return service.attendance(site, date_from, date_to, person_id, limit)

    @api.get(
        "/attendance/report",
        tags=["attendance"],
        responses={200: {"model": ReportOut, "content": {"text/csv": {}}, "description": "JSON or CSV (format)"}},
    )
    def attendance_report(
        day: Annotated[date, Query(alias="date", description="the local day, YYYY-MM-DD")],
        site: SiteId | None = None,
        format: Literal["json", "csv"] = "json",
        tz: Annotated[str, Query(description="IANA time zone the day is counted in")] = "UTC",
    ) -> Response:
        """First and last sighting and event count per recognised person on one day (all sites if none given)."""
        if site is not None:
            service.known_site(site)
        rows = store.daily_report(site, day, time_zone(tz))
        if format == "csv":
            filename = f"attendance-{site or 'all'}-{day.isoformat()}.csv"
            return Response(
                reports.to_csv(rows),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="{filename}"'},
            )
        out = ReportOut(
            site=site, date=day, tz=tz, rows=[ReportRowOut.model_validate(r) for r in reports.report_rows(rows)]
        )
        return JSONResponse(out.model_dump(mode="json"))

    app.include_router(api)
    context = ApiContext(service, auth, Depends(require_token))
    for make_router in routers:
        app.include_router(make_router(context))
    return app


def _split_form(items: Sequence[tuple[str, UploadFile | str]]) -> tuple[dict[str, str], list[UploadFile]]:
    """The text fields and the photos of a face upload; files anywhere but `files`, or repeated fields, are refused."""
    fields: dict[str, str] = {}
    uploads: list[UploadFile] = []
    for key, value in items:
        if isinstance(value, UploadFile):
            if key != "files":
                raise FieldError(key, "unexpected file field: send photos in the field 'files'", location="body")
            uploads.append(value)
        elif key == "files":
            raise FieldError("files", "must be files (multipart parts with a filename), not text", location="body")
        elif key in fields:
            raise FieldError(key, "given more than once", location="body")
        else:
            fields[key] = value
    return fields, uploads


def _validate_form(fields: dict[str, str]) -> FaceUploadForm:
    try:
        return FaceUploadForm.model_validate(fields)
    except ValidationError as exc:
        # the same shape as FastAPI's own body errors, so the one validation handler names the field
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc


__all__ = [
    "API_PREFIX",
    "MAX_FILES",
    "MIN_TOKEN_CHARS",
    "PERSON_ID_PATTERN",
    "PERSON_REF_PATTERN",
    "SITE_ID_PATTERN",
    "AdminService",
    "ApiContext",
    "ApiError",
    "AuthError",
    "FieldError",
    "NothingEnrolledError",
    "PayloadTooLargeError",
    "create_app",
    "photo_labels",
    "time_zone",
]
