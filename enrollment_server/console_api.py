"""The API routes the web console is drawn from (JSON and images under /api/v1, the admin API's authentication):

- `GET /console/people`: people of a site with their template count and a face thumbnail to show;
- `GET /people/{id}/thumbnail`, `GET /people/{id}/faces/{template}/thumbnail`: a template's aligned face (JPEG);
- `GET /console/attendance`: first / last seen per person and door for each local day of a range, arrivals per
  hour (the first sighting of each person each day), as JSON or CSV;
- `GET /console/doors`: every device with its online state, applied gallery version and lag, fps, outbox depth, last
  status and last event, flagged `stale` when it says online but has been silent past `console.stale_after_s`;
- unknown visitors (enrollment_server/visitors.py): `GET /visitors` (groups), `GET /visitors/faces/{id}/crop`,
  `POST /visitors/assign` ("this is <person>"), `POST /visitors/enroll` ("new person"), `POST /visitors/ignore`.

They are part of the API, documented in its OpenAPI, usable by scripts with the bearer token as much as by the
console.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from enrollment_server import reports
from enrollment_server.api import (
    API_PREFIX,
    PERSON_REF_PATTERN,
    UNCHANGED,
    ApiContext,
    DisplayName,
    EnrollOut,
    ErrorOut,
    FieldError,
    GalleryUpdateOut,
    NothingEnrolledError,
    PersonId,
    PersonPath,
    SiteId,
    time_zone,
)
from enrollment_server.site_calibration import describe_rule
from enrollment_server.store import Device
from enrollment_server.visitors import VisitorAction, VisitorGroup, Visitors
from models.contract.gallery import SiteDecision
from models.contract.timestamps import parse_utc
from models.decision.rules import DecisionRule
from models.errors import NotFoundError

log = logging.getLogger(__name__)

MAX_RANGE_DAYS = 62
MAX_FACE_IDS = 10_000
_IMAGE_CACHE = "private, max-age=3600"  # a template's thumbnail never changes under its id


# --- models -----------------------------------------------------------------------------------------------------


class ConsolePersonOut(BaseModel):
    person_id: str
    name: str
    active: bool
    templates: int
    thumbnail_template: int | None  # a template with a thumbnail to show (None: none kept)
    created: datetime
    updated: datetime


class ConsolePeopleOut(BaseModel):
    site: str
    people: list[ConsolePersonOut]


class DoorRowOut(BaseModel):
    day: date
    person_id: str
    name: str | None
    door: str
    first_seen: datetime
    last_seen: datetime
    events: int


class ConsoleAttendanceOut(BaseModel):
    site: str
    tz: str
    date_from: date
    date_to: date
    people: int  # distinct people seen in the range
    events: int
    arrivals_by_hour: list[int]  # 24 bins: each person's first sighting of each day, local hour
    rows: list[DoorRowOut]


class LastEventOut(BaseModel):
    ts: datetime
    person_id: str | None
    name: str | None


class DecisionRuleOut(BaseModel):
    rule: str
    threshold: float | None  # None: infinite (a margin rule that only accepts without a runner-up)
    max_distance: float | None  # None: the distance rule, or no cap


class DoorDecisionOut(DecisionRuleOut):
    source: str  # config / site / encoder default


class ConsoleDoorOut(BaseModel):
    device_id: str
    site: str
    state: str
    stale: bool  # online by its last status, but silent for longer than console.stale_after_s
    silent_s: float | None  # since the server last heard from it
    agent_version: str | None
    gallery_version: int | None
    latest_version: int | None
    lag: int | None  # versions behind (negative: ahead); None across gallery epochs
    sync: str  # current / behind / ahead / other_epoch / unpublished (enrollment_server.store.SYNC_STATES)
    fps: float | None
    outbox_depth: int | None
    outbox_oldest_age_s: float | None
    mqtt_connected: bool | None
    last_seen: datetime | None
    last_event: LastEventOut | None
    decision: DoorDecisionOut | None  # the rule the door reports in force; None from an agent that does not say


class ConsoleDecisionOut(BaseModel):
    """The site's decision rule: its own calibrated one (`enrollment-server calibrate --apply`) or the encoder's
    default; `summary` says it in one line."""

    site: str
    source: Literal["site", "encoder default"]
    rule: DecisionRuleOut
    summary: str
    calibrated: datetime | None  # the figures below: only for a site's own rule
    target_fpir: float | None
    people: int | None
    probes: int | None
    strangers: int | None


class ConsoleDoorsOut(BaseModel):
    stale_after_s: float
    decision: ConsoleDecisionOut  # of the site asked for (the server's own with all sites)
    doors: list[ConsoleDoorOut]


class VisitorFaceOut(BaseModel):
    id: int
    door: str
    ts: datetime
    quality: float
    distance: float | None


class VisitorGroupOut(BaseModel):
    key: int
    size: int
    faces: list[VisitorFaceOut]  # best first
    face_ids: list[int]  # every face of the group: what an action on it names
    first_seen: datetime
    last_seen: datetime
    doors: list[str]
    nearest_person: str | None
    nearest_name: str | None
    nearest_distance: float | None


class VisitorsOut(BaseModel):
    site: str
    enabled: bool  # the site is listed in unknown_visitors.sites
    max_age_days: float
    max_faces: int
    best_crops: int
    same_person_distance: float
    groups: list[VisitorGroupOut]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


FaceIds = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=MAX_FACE_IDS)]


class VisitorAssign(_Body):
    site: SiteId | None = None
    face_ids: FaceIds
    person_id: Annotated[str, Field(pattern=PERSON_REF_PATTERN)]


class VisitorEnroll(_Body):
    site: SiteId | None = None
    face_ids: FaceIds
    person_id: PersonId
    name: DisplayName
    allow_duplicate_identity: StrictBool = False


class VisitorIgnore(_Body):
    site: SiteId | None = None
    face_ids: FaceIds


class VisitorActionOut(BaseModel):
    deleted: int  # stored faces deleted (the group's, once named or ignored)
    enrollment: EnrollOut | None = None
    gallery: GalleryUpdateOut


# --- converters -------------------------------------------------------------------------------------------------


def _number(tree: dict[str, Any] | None, *path: str) -> float | None:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _door_out(d: Device, last: Any, now: datetime, stale_after_s: float) -> ConsoleDoorOut:
    health = d.health()
    silent = None if d.last_seen is None else max(0.0, (now - d.last_seen).total_seconds())
    depth = _number(health, "outbox", "depth")
    connected = health.get("mqtt_connected") if isinstance(health, dict) else None
    return ConsoleDoorOut(
        device_id=d.device_id,
        site=d.site_id,
        state=d.state,
        stale=d.state == "online" and (silent is None or silent > stale_after_s),
        silent_s=None if silent is None else round(silent, 1),
        agent_version=d.agent_version,
        gallery_version=d.gallery_version,
        latest_version=d.latest_site_version,
        lag=d.lag,
        sync=d.sync,
        fps=_number(health, "pipeline", "fps"),
        outbox_depth=None if depth is None else int(depth),
        outbox_oldest_age_s=_number(health, "outbox", "oldest_unconfirmed_age_s"),
        mqtt_connected=connected if isinstance(connected, bool) else None,
        last_seen=d.last_seen,
        last_event=None if last is None else LastEventOut(ts=last.ts, person_id=last.person_id, name=last.name),
        decision=_door_decision(health),
    )


def _door_decision(health: dict[str, Any] | None) -> DoorDecisionOut | None:
    reported = health.get("decision") if isinstance(health, dict) else None
    if not isinstance(reported, dict) or not isinstance(reported.get("rule"), str):
        return None
    return DoorDecisionOut(
        rule=reported["rule"],
        threshold=_number(reported, "threshold"),
        max_distance=_number(reported, "max_distance"),
        source=str(reported.get("source", "")),
    )


def _rule_out(rule: DecisionRule) -> DecisionRuleOut:
    def finite(x: float | None) -> float | None:
        return x if x is not None and math.isfinite(x) else None

    return DecisionRuleOut(rule=rule.rule, threshold=finite(rule.threshold), max_distance=finite(rule.max_distance))


def _decision_out(site: str, default: DecisionRule, d: SiteDecision | None) -> ConsoleDecisionOut:
    return ConsoleDecisionOut(
        site=site,
        source="encoder default" if d is None else "site",
        rule=_rule_out(default if d is None else d.rule),
        summary=describe_rule(default, d),
        calibrated=None if d is None else parse_utc(d.calibrated),
        target_fpir=None if d is None else d.target_fpir,
        people=None if d is None else d.people,
        probes=None if d is None else d.probes,
        strangers=None if d is None else d.strangers,
    )


def _group_out(g: VisitorGroup) -> VisitorGroupOut:
    return VisitorGroupOut(
        key=g.key,
        size=g.size,
        faces=[
            VisitorFaceOut(id=f.id, door=f"{f.device_id}/{f.camera}", ts=f.ts, quality=f.quality, distance=f.distance)
            for f in g.faces
        ],
        face_ids=list(g.face_ids),
        first_seen=g.first_seen,
        last_seen=g.last_seen,
        doors=list(g.doors),
        nearest_person=g.nearest_person,
        nearest_name=g.nearest_name,
        nearest_distance=g.nearest_distance,
    )


def _jpeg(data: bytes, cache: str) -> Response:
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": cache})


# --- the routes -------------------------------------------------------------------------------------------------


def console_views(
    visitors: Visitors, *, stale_after_s: float, default_rule: DecisionRule, fingerprint: str
) -> Callable[[ApiContext], APIRouter]:
    """The router factory `create_app(routers=...)` takes. `default_rule`: the encoder's default decision, what a
    site without its own rule (or with one of another encoder, `fingerprint` being the server's) decides under."""

    def make(ctx: ApiContext) -> APIRouter:
        service = ctx.service
        store = service.store
        router = APIRouter(
            prefix=API_PREFIX,
            dependencies=[ctx.require],
            responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 422: {"model": ErrorOut}},
        )

        # -- people ------------------------------------------------------------------------------------------------

        @router.get("/console/people", tags=["console"])
        def console_people(
            site: SiteId | None = None,
            q: Annotated[str | None, Query(max_length=200, description="matches id or name, any case")] = None,
        ) -> ConsolePeopleOut:
            """People of a site (the server's by default) with their template count and a thumbnail to show."""
            site = service.known_site(site)
            counts: dict[str, int] = {}
            shown: dict[str, int] = {}
            for t in store.list_templates(site_id=site):
                counts[t.person_id] = counts.get(t.person_id, 0) + 1
                if t.has_thumbnail:
                    shown.setdefault(t.person_id, t.id)
            needle = (q or "").strip().casefold()
            people = [
                ConsolePersonOut(
                    person_id=p.person_id,
                    name=p.display_name,
                    active=p.active,
                    templates=counts.get(p.person_id, 0),
                    thumbnail_template=shown.get(p.person_id),
                    created=p.created,
                    updated=p.updated,
                )
                for p in store.list_people(site)
                if not needle or needle in p.person_id.casefold() or needle in p.display_name.casefold()
            ]
            people.sort(key=lambda p: (p.name.casefold(), p.person_id))
            return ConsolePeopleOut(site=site, people=people)

        @router.get(
            "/people/{person_id}/faces/{template_id}/thumbnail",
            tags=["people"],
            response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorOut}},
        )
        def template_thumbnail(person_id: PersonPath, template_id: Annotated[int, Path(ge=1)]) -> Response:
            if template_id not in {t.id for t in store.list_templates(person_id=person_id)}:
                raise NotFoundError(f"person {person_id!r} has no template {template_id}")
            data = store.template_thumbnail(template_id)
            if data is None:
                raise NotFoundError(f"template {template_id} has no thumbnail (enrolled before thumbnails were kept)")
            return _jpeg(data, _IMAGE_CACHE)

        @router.get(
            "/people/{person_id}/thumbnail",
            tags=["people"],
            response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorOut}},
        )
        def person_thumbnail(person_id: PersonPath) -> Response:
            """The face of the person's first template that kept one (what the console shows for them)."""
            for t in store.list_templates(person_id=person_id):
                if t.has_thumbnail:
                    data = store.template_thumbnail(t.id)
                    if data is not None:
                        return _jpeg(data, "private, max-age=60")
            store.get_person(person_id)  # 404 for an unknown person, else the one below
            raise NotFoundError(f"person {person_id!r} has no face thumbnail")

        # -- attendance --------------------------------------------------------------------------------------------

        @router.get(
            "/console/attendance",
            tags=["console"],
            responses={200: {"model": ConsoleAttendanceOut, "content": {"text/csv": {}}}},
        )
        def console_attendance(
            date_from: Annotated[date, Query(description="first local day, YYYY-MM-DD")],
            date_to: Annotated[date | None, Query(description="last local day (included); default date_from")] = None,
            site: SiteId | None = None,
            tz: Annotated[str, Query(description="IANA time zone the days are counted in")] = "UTC",
            format: Literal["json", "csv"] = "json",
        ) -> Response:
            """First and last seen per person and door, each local day of the range; arrivals per hour."""
            site = service.known_site(site)
            last = date_to or date_from
            if last < date_from:
                raise FieldError("date_to", f"{last} is before date_from {date_from}")
            days = (last - date_from).days + 1
            if days > MAX_RANGE_DAYS:
                raise FieldError("date_to", f"{days} days asked; at most {MAX_RANGE_DAYS} in one report")
            zone = time_zone(tz)
            door_rows = []
            arrivals = [0] * 24
            people: set[str] = set()
            for i in range(days):
                day = date_from + timedelta(days=i)
                door_rows.extend(store.daily_report(site, day, zone, by_door=True))
                for r in store.daily_report(site, day, zone):
                    arrivals[r.first_seen.astimezone(zone).hour] += 1
                    people.add(r.person_id)
            if format == "csv":
                span = date_from.isoformat() + ("" if days == 1 else f"_{last.isoformat()}")
                return Response(
                    reports.to_csv(door_rows, by_door=True),
                    media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="attendance-{site}-{span}.csv"'},
                )
            out = ConsoleAttendanceOut(
                site=site,
                tz=tz,
                date_from=date_from,
                date_to=last,
                people=len(people),
                events=sum(r.events for r in door_rows),
                arrivals_by_hour=arrivals,
                rows=[
                    DoorRowOut(
                        day=r.day,
                        person_id=r.person_id,
                        name=r.name,
                        door=r.device_id or "",
                        first_seen=r.first_seen,
                        last_seen=r.last_seen,
                        events=r.events,
                    )
                    for r in door_rows
                ],
            )
            return JSONResponse(out.model_dump(mode="json"))

        # -- doors -------------------------------------------------------------------------------------------------

        @router.get("/console/doors", tags=["console"])
        def console_doors(site: SiteId | None = None) -> ConsoleDoorsOut:
            """Every device (of one site, or all): state, gallery, figures of its last status, last event."""
            shown = service.known_site(site)  # the server's own site when none is named
            now = datetime.now(timezone.utc)
            last = store.last_events(site)
            doors = [_door_out(d, last.get(d.device_id), now, stale_after_s) for d in store.list_devices(site)]
            decision = _decision_out(shown, default_rule, store.site_decision(shown, fingerprint))
            return ConsoleDoorsOut(stale_after_s=stale_after_s, decision=decision, doors=doors)

        # -- unknown visitors --------------------------------------------------------------------------------------

        @router.get("/visitors", tags=["visitors"])
        def visitor_groups(site: SiteId | None = None) -> VisitorsOut:
            """The site's unknown visitors, grouped by identity, most recently seen first."""
            site = service.known_site(site)
            cfg = visitors.config
            return VisitorsOut(
                site=site,
                enabled=visitors.enabled(site),
                max_age_days=cfg.max_age_days,
                max_faces=cfg.max_faces,
                best_crops=cfg.best_crops,
                same_person_distance=visitors.threshold,
                groups=[_group_out(g) for g in visitors.groups(site)],
            )

        @router.get(
            "/visitors/faces/{face_id}/crop",
            tags=["visitors"],
            response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorOut}},
        )
        def visitor_crop(face_id: Annotated[int, Path(ge=1)]) -> Response:
            # no-store: a stranger's face is not kept in the browser's cache once the page is gone
            return _jpeg(visitors.crop(face_id), "private, no-store")

        def finish(site: str, action: VisitorAction) -> VisitorActionOut:
            if action.report is None:
                return VisitorActionOut(deleted=action.deleted, gallery=UNCHANGED.out())
            gallery = service.gallery_changed(site) if action.report.added else UNCHANGED
            enrollment = {**action.report.to_json(), "gallery": gallery.out().model_dump()}
            payload = {"deleted": action.deleted, "enrollment": enrollment, "gallery": gallery.out().model_dump()}
            if not action.report.added:
                reasons = sorted({r.reason or "?" for r in action.report.results})
                raise NothingEnrolledError(f"no crop was enrolled ({', '.join(reasons)}): see enrollment", payload)
            return VisitorActionOut.model_validate(payload)

        @router.post("/visitors/assign", tags=["visitors"], responses={404: {"model": ErrorOut}})
        async def visitor_assign(body: VisitorAssign) -> VisitorActionOut:
            """ "This is <person>": the group's best crops become the person's templates (quality-gated); 422 with
            the per-crop report when none passed (the faces are then kept)."""
            site = await run_in_threadpool(service.known_site, body.site, location="body")
            action = await run_in_threadpool(visitors.assign, site, body.face_ids, body.person_id)
            return await run_in_threadpool(finish, site, action)

        @router.post("/visitors/enroll", tags=["visitors"], responses={404: {"model": ErrorOut}})
        async def visitor_enroll(body: VisitorEnroll) -> VisitorActionOut:
            """ "New person": create the person from the group's best crops; refused as a probable duplicate when
            the face matches someone enrolled, unless allow_duplicate_identity."""
            site = await run_in_threadpool(service.known_site, body.site, location="body")
            action = await run_in_threadpool(
                lambda: visitors.enroll(
                    site,
                    body.face_ids,
                    body.person_id,
                    body.name,
                    allow_duplicate_identity=body.allow_duplicate_identity,
                )
            )
            return await run_in_threadpool(finish, site, action)

        @router.post("/visitors/ignore", tags=["visitors"], responses={404: {"model": ErrorOut}})
        def visitor_ignore(body: VisitorIgnore) -> VisitorActionOut:
            """Forget the group: its faces are deleted."""
            site = service.known_site(body.site, location="body")
            return finish(site, visitors.ignore(site, body.face_ids))

        return router

    return make
