"""The web console's server side through FastAPI's TestClient, over a real store (SQLite and PostgreSQL where the
test takes `store`) and the real face pipeline: login sessions and their cookie, CSRF and origin checks, failed
login throttling, pages and assets with their security headers, and the /api/v1 views the pages are drawn from
(people, thumbnails, attendance per door with arrivals per hour and CSV, doors, unknown visitors and their actions).

The browser itself drives the same routes in tests/integration/test_console_browser.py.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from visitor_faces import demo_photos, real_faces, record

from enrollment_server.api import create_app
from enrollment_server.auth import MAX_FAILED_LOGINS, SESSION_COOKIE, AdminAuth
from enrollment_server.config import EnrollmentSection, UnknownVisitorsSection
from enrollment_server.console.pages import console_pages
from enrollment_server.console_api import console_views
from enrollment_server.enrollment import Enroller
from enrollment_server.store import AttendanceEvent, DeviceStatus, SiteRule, Store
from enrollment_server.visitors import Visitors
from models.contract.gallery import SiteDecision
from models.decision.rules import DecisionRule
from models.face.encoders import DLIB_RESNET
from models.face.pipeline import FacePipeline
from models.imageio import encode_jpeg

TOKEN = "console-test-token-0123456789"
SITE = "hq"
BASE = "http://console.test"
UTC = timezone.utc


@dataclass
class Console:
    client: TestClient
    store: Store
    changes: list[str]
    csrf: str = ""

    def login(self) -> None:
        r = self.client.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303, r.text
        page = self.client.get("/console/people")
        self.csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post("/api/v1" + path, headers={"X-CSRF-Token": self.csrf, **kw.pop("headers", {})}, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get("/api/v1" + path, **kw)


def make_console(store: Store, pipeline: FacePipeline, *, sites: tuple[str, ...] = (SITE,)) -> Console:
    enroller = Enroller(store, pipeline, EnrollmentSection())
    visitors = Visitors(store, UnknownVisitorsSection(sites=sites), enroller)
    changes: list[str] = []
    app = create_app(
        store,
        enroller,
        token=TOKEN,
        max_upload_bytes=16 << 20,
        on_change=changes.append,
        devices_site=SITE,
        routers=[
            console_views(visitors, stale_after_s=120.0, default_rule=DLIB_RESNET.default_decision, fingerprint="fp"),
            console_pages(default_site=SITE),
        ],
    )
    return Console(TestClient(app, base_url=BASE), store, changes)


@pytest.fixture
def sqlite_store(tmp_path: Path):
    s = Store.open(tmp_path / "console.db")
    yield s
    s.close()


@pytest.fixture
def console(sqlite_store: Store, pipeline: FacePipeline) -> Console:
    c = make_console(sqlite_store, pipeline)
    c.login()
    return c


# --- sessions, CSRF, pages ----------------------------------------------------------------------------------------


def test_login_exchanges_the_token_for_a_strict_http_only_cookie(sqlite_store: Store, pipeline: FacePipeline) -> None:
    c = make_console(sqlite_store, pipeline)
    client = c.client
    for path in ("/console", "/console/people", "/console/unknown", "/console/attendance", "/console/doors"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/console/login", path
    assert client.get("/api/v1/console/people").status_code == 401
    page = client.get("/console/login")
    assert page.status_code == 200 and 'method="post"' in page.text and 'type="password"' in page.text
    bad = client.post("/console/login", data={"token": "not-the-token-at-all"}, follow_redirects=False)
    assert bad.status_code == 401 and "not the admin token" in bad.text and SESSION_COOKIE not in bad.cookies
    ok = client.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/console/people"
    assert TOKEN not in ok.headers["location"] and TOKEN not in ok.text
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and TOKEN not in cookie
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age=43200"):
        assert attribute.lower() in cookie.lower(), cookie
    assert "secure" not in cookie.lower()  # plain http here; over https the cookie is Secure (next test)
    page = client.get("/console/people")
    assert page.status_code == 200 and 'data-page="people"' in page.text
    assert client.get("/console/login", follow_redirects=False).headers["location"] == "/console/people"
    # every page and asset is sent with a strict policy: own scripts only, no framing, no referrer
    for r in (page, client.get("/console/login"), client.get("/console/static/console.js")):
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert r.headers["referrer-policy"] == "same-origin" and r.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"


def test_state_changes_through_the_cookie_need_the_csrf_token_and_the_same_origin(console: Console) -> None:
    body = {"person_id": "ann", "name": "Ann"}
    no_token = console.client.post("/api/v1/people", json=body)
    assert no_token.status_code == 403 and no_token.json()["error"] == "forbidden"
    wrong = console.client.post("/api/v1/people", json=body, headers={"X-CSRF-Token": "guess"})
    assert wrong.status_code == 403
    foreign = console.post("/people", json=body, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403 and "origin" in foreign.json()["detail"]
    # what a browser sends for a page whose origin it will not disclose (sandboxed frame, no-referrer page)
    assert console.post("/people", json=body, headers={"Origin": "null"}).status_code == 403
    assert console.post("/people", json=body, headers={"Origin": BASE}).status_code == 201
    # reading needs no CSRF token; a bearer client needs none either (it sends no cookie a page could ride on)
    assert console.get("/people").status_code == 200
    bearer = httpx.Client(transport=console.client._transport, base_url=BASE)  # no cookie jar shared
    r = bearer.post(
        "/api/v1/people", json={"person_id": "bob", "name": "Bob"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 201
    # a login form posted from another site is refused (no logging a victim into someone's session)
    cross = console.client.post("/console/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403


def test_logout_ends_the_session_at_once(console: Console) -> None:
    assert console.get("/console/people").status_code == 200
    cookie = console.client.cookies.get(SESSION_COOKIE)
    assert console.client.post("/console/logout", headers={"X-CSRF-Token": "wrong"}).status_code == 403
    r = console.client.post("/console/logout", headers={"X-CSRF-Token": console.csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    again = httpx.Client(transport=console.client._transport, base_url=BASE, cookies={SESSION_COOKIE: cookie})
    assert again.get("/api/v1/console/people").status_code == 401  # the old cookie is dead, not just forgotten


def test_failed_logins_are_throttled_per_address(sqlite_store: Store, pipeline: FacePipeline) -> None:
    client = make_console(sqlite_store, pipeline).client
    for _ in range(MAX_FAILED_LOGINS):
        assert client.post("/console/login", data={"token": "x" * 20}).status_code == 401
    r = client.post("/console/login", data={"token": TOKEN})  # even the right token, for a while
    assert r.status_code == 429 and "too many failed logins" in r.text.lower()


def test_over_https_the_cookie_is_secure(sqlite_store: Store, pipeline: FacePipeline) -> None:
    c = make_console(sqlite_store, pipeline)
    https = TestClient(c.client.app, base_url="https://console.test")
    ok = https.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
    assert ok.status_code == 303 and "; secure" in ok.headers["set-cookie"].lower()


def test_sessions_expire() -> None:
    now = [1000.0]
    auth = AdminAuth(TOKEN, session_ttl_s=60.0, clock=lambda: now[0])
    cookie, session = auth.login(TOKEN, "10.0.0.1")
    assert auth.session(cookie) == session and auth.session("forged") is None
    now[0] += 61
    assert auth.session(cookie) is None


def test_assets_are_the_shipped_files_only(console: Console) -> None:
    for name, kind in (("console.css", "text/css"), ("people.js", "text/javascript"), ("logo.svg", "image/svg+xml")):
        r = console.client.get(f"/console/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    for bad in ("shell.html", "..%2Fpages.py", "missing.js"):
        assert console.client.get(f"/console/static/{bad}").status_code == 404
    # nothing is loaded from elsewhere: every src / href in the pages and scripts is this server's
    pages = [console.client.get(p).text for p in ("/console/people", "/console/login")]
    scripts = [console.client.get(f"/console/static/{n}").text for n in ("console.js", "people.js", "unknown.js")]
    for text in pages + scripts:
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
        assert "cdn" not in text.lower()


# --- people -------------------------------------------------------------------------------------------------------


def test_people_with_counts_thumbnails_and_search(console: Console) -> None:
    for person, name in (("Barack_Obama", "Barack Obama"), ("Elon_Musk", "Elon Musk")):
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in demo_photos(person)[:2]]
        r = console.post(f"/people/{person.lower()}/faces", files=files, data={"name": name})
        assert r.status_code == 200 and r.json()["added"] == 2, r.text
    console.store.add_person("nobody", SITE, "No Photo")
    people = console.get("/console/people").json()["people"]
    assert [p["person_id"] for p in people] == ["barack_obama", "elon_musk", "nobody"]  # by name
    obama = people[0]
    assert obama["templates"] == 2 and obama["thumbnail_template"] is not None and people[2]["templates"] == 0
    assert [p["person_id"] for p in console.get("/console/people", params={"q": "MUSK"}).json()["people"]] == [
        "elon_musk"
    ]
    thumb = console.get(f"/people/barack_obama/faces/{obama['thumbnail_template']}/thumbnail")
    assert (
        thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    )
    assert console.get("/people/barack_obama/thumbnail").content == thumb.content
    assert console.get(f"/people/elon_musk/faces/{obama['thumbnail_template']}/thumbnail").status_code == 404
    assert console.get("/people/nobody/thumbnail").status_code == 404
    assert console.get("/people/ghost/thumbnail").status_code == 404
    assert console.get("/console/people", params={"site": "nowhere"}).status_code == 422


# --- attendance ---------------------------------------------------------------------------------------------------


def _event(person: str | None, ts: datetime, device: str, name: str | None = None) -> AttendanceEvent:
    return AttendanceEvent(
        event_id=str(uuid.uuid4()), seq=1, device_id=device, site_id=SITE, ts=ts, person_id=person, name=name
    )


def test_attendance_per_person_and_door_with_arrivals_per_hour_and_csv(console: Console) -> None:
    store = console.store
    paris = ZoneInfo("Europe/Paris")
    day = date(2026, 3, 2)

    def at(h: int, m: int, d: date = day) -> datetime:
        return datetime(d.year, d.month, d.day, h, m, tzinfo=paris)

    store.add_person("ann", SITE, "Ann")
    store.add_person("bob", SITE, "=Bob")  # a name a spreadsheet would run as a formula
    store.insert_events(
        [
            _event("ann", at(8, 5), "door-1"),
            _event("ann", at(12, 30), "door-2"),
            _event("ann", at(17, 45), "door-1"),
            _event("bob", at(9, 50), "door-2"),
            _event(None, at(10, 0), "door-1"),  # an unknown visitor: no attendance row
            _event("ann", at(8, 59, day + timedelta(days=1)), "door-1"),
            _event("bob", at(0, 30, day + timedelta(days=1)), "door-1"),  # 23:30 UTC the day before: Paris counts
        ]
    )
    one = console.get("/console/attendance", params={"date_from": "2026-03-02", "tz": "Europe/Paris"}).json()
    rows = [(r["person_id"], r["door"], r["events"]) for r in one["rows"]]
    assert rows == [("ann", "door-1", 2), ("ann", "door-2", 1), ("bob", "door-2", 1)]
    ann1 = one["rows"][0]
    assert datetime.fromisoformat(ann1["first_seen"]).astimezone(paris).hour == 8
    assert datetime.fromisoformat(ann1["last_seen"]).astimezone(paris).strftime("%H:%M") == "17:45"
    assert one["arrivals_by_hour"][8] == 1 and one["arrivals_by_hour"][9] == 1 and sum(one["arrivals_by_hour"]) == 2
    assert (one["people"], one["events"]) == (2, 4)
    both = console.get(
        "/console/attendance", params={"date_from": "2026-03-02", "date_to": "2026-03-03", "tz": "Europe/Paris"}
    ).json()
    assert [r["day"] for r in both["rows"]] == ["2026-03-02"] * 3 + ["2026-03-03"] * 2
    assert both["arrivals_by_hour"][0] == 1 and both["arrivals_by_hour"][8] == 2 and both["people"] == 2
    utc = console.get("/console/attendance", params={"date_from": "2026-03-02"}).json()
    assert utc["arrivals_by_hour"][7] == 1  # 08:05 in Paris is 07:05 UTC
    assert [r["person_id"] for r in utc["rows"]].count("bob") == 2  # 23:30 UTC is still the 2nd in UTC

    r = console.get(
        "/console/attendance",
        params={"date_from": "2026-03-02", "date_to": "2026-03-03", "tz": "Europe/Paris", "format": "csv"},
    )
    assert r.headers["content-type"].startswith("text/csv")
    assert 'filename="attendance-hq-2026-03-02_2026-03-03.csv"' in r.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert list(table[0]) == ["site", "day", "person_id", "name", "door", "first_seen", "last_seen", "events"]
    assert len(table) == 5 and {row["name"] for row in table} == {"Ann", "'=Bob"}
    for params, field in (
        ({"date_from": "2026-03-05", "date_to": "2026-03-01"}, "date_to"),
        ({"date_from": "2026-01-01", "date_to": "2026-06-01"}, "date_to"),
        ({"date_from": "2026-03-02", "tz": "Mars/Olympus"}, "tz"),
    ):
        bad = console.get("/console/attendance", params=params)
        assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == field, bad.text


# --- doors --------------------------------------------------------------------------------------------------------


def test_doors_show_state_gallery_figures_last_event_and_flag_stale_ones(console: Console) -> None:
    store = console.store
    now = datetime.now(UTC)
    outbox = {"depth": 3, "oldest_unconfirmed_age_s": 42.0}
    health = {"pipeline": {"fps": 14.25}, "outbox": outbox, "mqtt_connected": True}
    for device, state, seen in (("door-1", "online", now), ("door-2", "online", now - timedelta(minutes=10))):
        store.upsert_device_status(DeviceStatus(device, SITE, state, seen, "0.1.0", 1, "fp", health), received=seen)
    store.upsert_device_status(DeviceStatus("gate-3", "lab", "offline", now, "0.1.0", None, "fp", {}), received=now)
    store.add_person("ann", SITE, "Ann")
    store.insert_events([_event("ann", now - timedelta(minutes=3), "door-1", "Ann")])
    doors = {d["device_id"]: d for d in console.get("/console/doors").json()["doors"]}
    assert set(doors) == {"door-1", "door-2", "gate-3"}
    d1, d2 = doors["door-1"], doors["door-2"]
    assert (d1["state"], d1["stale"], d2["stale"]) == ("online", False, True)  # silent for 10 minutes
    assert d1["fps"] == 14.25 and d1["outbox_depth"] == 3 and d1["outbox_oldest_age_s"] == 42.0
    assert d1["mqtt_connected"] is True and d1["gallery_version"] == 1
    # the site has published nothing this database knows of: the door is not shown as "current" (lag 0)
    assert (d1["sync"], d1["lag"], d1["latest_version"]) == ("unpublished", None, None)
    assert d1["last_event"]["person_id"] == "ann" and d2["last_event"] is None
    assert doors["gate-3"]["state"] == "offline" and not doors["gate-3"]["stale"] and doors["gate-3"]["fps"] is None
    assert [d["device_id"] for d in console.get("/console/doors", params={"site": SITE}).json()["doors"]] == [
        "door-1",
        "door-2",
    ]


def test_doors_show_the_sites_rule_in_one_line_and_each_doors_rule_in_force(console: Console) -> None:
    store = console.store
    store.ensure_site(SITE)
    now = datetime.now(UTC)
    reported = {"rule": "ratio", "threshold": 0.84, "max_distance": 0.5, "source": "site"}
    store.upsert_device_status(DeviceStatus("door-1", SITE, "online", now, "0.1.0", 1, "fp", {"decision": reported}))
    shown = console.get("/console/doors", params={"site": SITE}).json()
    default = DLIB_RESNET.default_decision
    assert shown["decision"]["source"] == "encoder default" and shown["decision"]["calibrated"] is None
    assert shown["decision"]["summary"] == (
        f"encoder default ({default.rule} {default.threshold:.2f}, cap {default.max_distance:.2f})"
    )
    assert shown["doors"][0]["decision"] == reported

    decision = SiteDecision(DecisionRule.ratio(0.84, 0.5), 0.01, 212, 180, 3000, "2026-12-06T10:00:00Z")
    store.set_site_rule(SiteRule(SITE, "fp", decision, fpir=0.0097, dir=0.91))
    shown = console.get("/console/doors", params={"site": SITE}).json()["decision"]
    assert shown["summary"] == (
        "ratio 0.84, cap 0.50 — calibrated 2026-12-06 on 212 people / 3,000 strangers at 1 % strangers accepted"
    )
    assert shown["rule"] == {"rule": "ratio", "threshold": 0.84, "max_distance": 0.5} and shown["source"] == "site"
    assert (shown["people"], shown["probes"], shown["strangers"], shown["target_fpir"]) == (212, 180, 3000, 0.01)
    # a rule of another encoder is not what the doors get
    store.set_site_rule(SiteRule(SITE, "other-encoder", decision, fpir=0.0097, dir=0.91))
    assert console.get("/console/doors").json()["decision"]["source"] == "encoder default"


# --- unknown visitors ---------------------------------------------------------------------------------------------


def test_unknown_visitors_grouped_shown_named_and_ignored_through_the_api(
    console: Console, pipeline: FacePipeline
) -> None:
    store = console.store
    store.ensure_site(SITE)
    faces = real_faces(pipeline, {"Jack_Dorsey": 3, "Elon_Musk": 2})
    fp = pipeline.fingerprint
    for i, f in enumerate(faces):
        store.add_unknown_face(record(f, site=SITE, fingerprint=fp, i=i), f.crop)
    out = console.get("/visitors").json()
    assert out["enabled"] and out["max_age_days"] == 14 and out["best_crops"] == 3
    groups = sorted(out["groups"], key=lambda g: g["size"])
    assert [g["size"] for g in groups] == [2, 3]
    crop = console.get(f"/visitors/faces/{groups[0]['faces'][0]['id']}/crop")
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
    assert crop.headers["cache-control"] == "private, no-store"

    # "new person" from the three faces of Jack: templates, faces gone, the gallery told
    jack = groups[1]
    r = console.post(
        "/visitors/enroll", json={"face_ids": jack["face_ids"], "person_id": "jack", "name": "Jack Dorsey"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["deleted"] == 3 and body["enrollment"]["person_created"] and body["enrollment"]["added"] >= 1
    assert body["gallery"] == {"changed": True, "published": True, "error": None} and console.changes == [SITE]
    # the same faces again: they are gone
    assert console.post("/visitors/ignore", json={"face_ids": jack["face_ids"]}).status_code == 404
    # "this is" to somebody of the wrong site, unknown fields: refused, nothing changes
    store.ensure_site("lab")
    store.add_person("labber", "lab", "Lab Person")
    elon = groups[0]
    wrong = console.post("/visitors/assign", json={"face_ids": elon["face_ids"], "person_id": "labber"})
    assert wrong.status_code == 422
    typo = console.post("/visitors/assign", json={"face_ids": elon["face_ids"], "person": "jack"})
    assert typo.status_code == 422 and typo.json()["error"] == "validation_error"
    # ignore: deleted
    r = console.post("/visitors/ignore", json={"face_ids": elon["face_ids"]})
    assert r.status_code == 200 and r.json()["deleted"] == 2 and r.json()["enrollment"] is None
    assert console.get("/visitors").json()["groups"] == []
    # a site that did not opt in says so
    assert console.get("/visitors", params={"site": "lab"}).json()["enabled"] is False


def test_a_visitor_group_the_gate_refuses_entirely_is_a_422_with_the_report(
    console: Console, pipeline: FacePipeline
) -> None:
    store = console.store
    store.ensure_site(SITE)
    face = real_faces(pipeline, {"Jeff_Bezos": 1})[0]
    blank = encode_jpeg(np.full((240, 240, 3), 90, np.uint8), 85)
    store.add_unknown_face(record(face, site=SITE, fingerprint=pipeline.fingerprint, i=0), blank)
    [group] = console.get("/visitors").json()["groups"]
    r = console.post("/visitors/enroll", json={"face_ids": group["face_ids"], "person_id": "jeff", "name": "Jeff"})
    assert r.status_code == 422 and r.json()["error"] == "no_photo_accepted"
    assert [p["reason"] for p in r.json()["enrollment"]["photos"]] == ["no_face"] and r.json()["deleted"] == 0
    assert len(console.get("/visitors").json()["groups"]) == 1
