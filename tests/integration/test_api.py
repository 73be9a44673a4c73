"""The admin HTTP API against a real store and the real face pipeline, through FastAPI's TestClient (httpx).

Stores: the tests taking `api` (over conftest's `store`) run on SQLite and on PostgreSQL (skipped when the server is
unreachable); the others on SQLite in a temp file. One test runs a real uvicorn server on a free port, so the ASGI
wiring is exercised over a socket too.
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import facesets
import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from enrollment_server.api import MAX_FILES, create_app
from enrollment_server.config import EnrollmentSection
from enrollment_server.enrollment import Enroller, EnrollReport
from enrollment_server.store import AttendanceEvent, DeviceStatus, Store
from models.errors import ConfigError, StoreError
from models.face import quality as q
from models.face.pipeline import FacePipeline
from models.imageio import load_image

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SITE = "hq"
UTC = timezone.utc
V1 = "/api/v1"


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> Iterator[FacePipeline]:
    pipeline = FacePipeline.create()
    yield pipeline
    pipeline.close()


def _sqlite_store(tmp_path: Path) -> Store:
    return Store.open(str(tmp_path / "api.db"))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = _sqlite_store(tmp_path)
    yield s
    s.close()


@dataclass
class Api:
    client: TestClient
    store: Store
    app: FastAPI
    changes: list[str] = field(default_factory=list)  # the sites on_change was called with

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """An authenticated request under /api/v1."""
        return self.client.request(method, V1 + path, headers={**AUTH, **kw.pop("headers", {})}, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)

    def upload(self, person: str, photos: Sequence[tuple[str, bytes]], **form: str) -> httpx.Response:
        files = [("files", (name, data, "application/octet-stream")) for name, data in photos]
        return self.post(f"/people/{person}/faces", files=files, data=form)


def _api(
    store: Store,
    enroller: Any,
    *,
    max_upload_bytes: int = 16 * 2**20,
    on_change: Callable[[str], object] | None = None,
) -> Api:
    changes: list[str] = []
    app = create_app(
        store,
        enroller,
        token=TOKEN,
        max_upload_bytes=max_upload_bytes,
        on_change=on_change or changes.append,
        devices_site=SITE,
    )
    return Api(TestClient(app), store, app, changes)


@pytest.fixture
def api(store: Store, pipe: FacePipeline) -> Api:
    """The API over both backends."""
    return _api(store, Enroller(store, pipe, EnrollmentSection()))


@pytest.fixture
def sqlite_api(sqlite_store: Store, pipe: FacePipeline) -> Api:
    return _api(sqlite_store, Enroller(sqlite_store, pipe, EnrollmentSection()))


# --- photos -----------------------------------------------------------------------------------------------------


def _blob(p: Path) -> tuple[str, bytes]:
    return (p.name, p.read_bytes())


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with (far) too little data: decoding would need
    1.2 GB for 20000 x 20000, so the only acceptable answer is a refusal from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def _blurred(p: Path) -> bytes:
    sharp = load_image(p)
    # out of focus relative to the face's size (the gate measures the aligned chip)
    return _png(cv2.GaussianBlur(sharp, (0, 0), sharp.shape[1] / 100))


# --- auth and settings ------------------------------------------------------------------------------------------


def test_token_is_required_everywhere_but_healthz(sqlite_api: Api) -> None:
    client = sqlite_api.client
    assert client.get("/healthz").json() == {"status": "ok"}
    missing = client.get(f"{V1}/people")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["error"] == "unauthorized"
    wrong = client.get(f"{V1}/people", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    prefix = client.get(f"{V1}/people", headers={"Authorization": f"Bearer {TOKEN[:-1]}"})
    assert prefix.status_code == 401
    basic = client.get(f"{V1}/people", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    assert client.get(f"{V1}/people", headers=AUTH).status_code == 200
    assert client.get(f"{V1}/people", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    # every route under the prefix is behind the token, including the upload and the reports
    for method, path in [
        ("post", "/people/x/faces"),
        ("delete", "/people/x"),
        ("get", "/sites/hq/devices"),
        ("get", "/attendance/report?date=2026-01-15"),
    ]:
        assert client.request(method.upper(), V1 + path).status_code == 401, path


@pytest.mark.parametrize("token", ["", "short", "x" * 15, "sixteen chars ok", "tökenwithunicode-0123"])
def test_weak_or_unusable_tokens_are_refused(sqlite_store: Store, token: str) -> None:
    with pytest.raises(ConfigError, match="token"):
        create_app(sqlite_store, object(), token=token, max_upload_bytes=1024, devices_site=SITE)  # type: ignore[arg-type]


def test_bad_settings_are_refused(sqlite_store: Store) -> None:
    with pytest.raises(ConfigError, match="max_upload"):
        create_app(sqlite_store, object(), token=TOKEN, max_upload_bytes=0, devices_site=SITE)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="site"):
        create_app(sqlite_store, object(), token=TOKEN, max_upload_bytes=1, devices_site="a/b")  # type: ignore[arg-type]


# --- people -----------------------------------------------------------------------------------------------------


def test_people_crud_and_conflicts(api: Api) -> None:
    created = api.post("/people", json={"person_id": "alice", "name": "Alice", "site": SITE})
    assert created.status_code == 201, created.text
    assert created.json() | {"created": None, "updated": None} == {
        "person_id": "alice",
        "name": "Alice",
        "site": SITE,
        "active": True,
        "created": None,
        "updated": None,
    }
    # the site defaults to the server's own
    assert api.post("/people", json={"person_id": "bob", "name": "Bob"}).json()["site"] == SITE
    again = api.post("/people", json={"person_id": "alice", "name": "Alice Again"})
    assert again.status_code == 409 and "alice" in again.json()["detail"]

    detail = api.get("/people/alice").json()
    assert detail["template_count"] == 0 and detail["templates"] == []
    assert [p["person_id"] for p in api.get("/people").json()] == ["alice", "bob"]
    assert [p["person_id"] for p in api.get("/people", params={"site": SITE}).json()] == ["alice", "bob"]

    renamed = api.patch("/people/alice", json={"name": "  Alice Liddell "})
    assert renamed.status_code == 200 and renamed.json()["person"]["name"] == "Alice Liddell"
    assert renamed.json()["gallery"] == {"changed": True, "published": True, "error": None}
    off = api.patch("/people/bob", json={"active": False})
    assert off.json()["person"]["active"] is False
    assert [p["person_id"] for p in api.get("/people", params={"active_only": True}).json()] == ["alice"]
    same = api.patch("/people/bob", json={"active": False})  # nothing changes, nothing is published
    assert same.json()["gallery"] == {"changed": False, "published": False, "error": None}
    assert api.changes == [SITE, SITE]

    gone = api.delete("/people/bob")
    assert gone.status_code == 200 and gone.json()["templates_removed"] == 0
    assert api.changes == [SITE, SITE, SITE]
    assert api.get("/people/bob").status_code == 404
    assert api.delete("/people/bob").status_code == 404
    assert api.patch("/people/bob", json={"active": True}).status_code == 404
    assert [p["person_id"] for p in api.get("/people").json()] == ["alice"]


def _field_error(response: httpx.Response, status: int = 422) -> list[str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["fields"], body
    return [f["field"] for f in body["fields"]]


def test_validation_errors_name_the_field(api: Api) -> None:
    assert _field_error(api.post("/people", json={"person_id": "carol", "name": "Carol", "nmae": "x"})) == ["nmae"]
    assert _field_error(api.post("/people", json={"person_id": "carol", "name": "Carol", "site": "mars"})) == ["site"]
    assert _field_error(api.post("/people", json={"person_id": "no/slash", "name": "X"})) == ["person_id"]
    assert _field_error(api.post("/people", json={"person_id": "x" * 129, "name": "X"})) == ["person_id"]
    assert _field_error(api.post("/people", json={"person_id": "dave", "name": "   "})) == ["name"]
    assert _field_error(api.post("/people", json={"person_id": "dave"})) == ["name"]
    assert _field_error(api.post("/people", json=["not", "an", "object"])) == ["body"]
    bad_json = api.post("/people", content=b'{"person_id": ', headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 422
    api.post("/people", json={"person_id": "carol", "name": "Carol"})
    assert _field_error(api.patch("/people/carol", json={"active": "yes please"})) == ["active"]
    assert _field_error(api.patch("/people/carol", json={"colour": "red"})) == ["colour"]
    assert _field_error(api.patch("/people/carol", json={})) == ["body"]
    assert _field_error(api.get("/people/bad%01id")) == ["person_id"]
    assert _field_error(api.get("/people/" + "x" * 129)) == ["person_id"]
    assert _field_error(api.get("/people", params={"site": "mars"})) == ["site"]
    assert _field_error(api.get("/people", params={"site": "a+b"})) == ["site"]
    assert _field_error(api.delete("/people/carol/faces/zero")) == ["template_id"]


# --- face uploads -----------------------------------------------------------------------------------------------


def test_upload_good_photos_creates_the_person_and_publishes(api: Api) -> None:
    photos = [_blob(p) for p in facesets.photos("Jennifer_Aniston")[:3]]
    r = api.upload("jen", photos, name="Jennifer Aniston", site=SITE)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["person_created"] is True and report["added"] >= 2
    assert report["added"] + report["rejected"] == 3
    assert [p["source"] for p in report["photos"]] == [name for name, _ in photos]
    assert report["gallery"] == {"changed": True, "published": True, "error": None}
    assert api.changes == [SITE]

    person = api.get("/people/jen").json()
    assert person["name"] == "Jennifer Aniston" and person["site"] == SITE
    assert person["template_count"] == report["added"] == len(person["templates"])
    template = person["templates"][0]
    assert template["current_encoder"] is True and 0.9 <= template["quality"]["detector_score"] <= 1.0
    assert template["quality"]["blur"] > 25 and len(template["image_sha256"]) == 64
    assert "embedding" not in template and "embedding" not in r.text

    # more photos for the same person: no name needed
    more = api.upload("jen", [_blob(facesets.photos("Jennifer_Aniston")[5])])
    assert more.status_code == 200 and more.json()["person_created"] is False and more.json()["added"] == 1
    assert api.changes == [SITE, SITE]

    # a template is deleted through its own person only
    api.upload("obama", [_blob(facesets.photos("Barack_Obama")[0])], name="Barack Obama")
    obama_template = api.get("/people/obama").json()["templates"][0]["template_id"]
    assert api.delete(f"/people/jen/faces/{obama_template}").status_code == 404
    first = person["templates"][0]["template_id"]
    deleted = api.delete(f"/people/jen/faces/{first}")
    assert deleted.status_code == 200 and deleted.json()["gallery"]["published"] is True
    assert api.get("/people/jen").json()["template_count"] == person["template_count"]  # + 1 - 1
    assert api.delete(f"/people/jen/faces/{first}").status_code == 404

    changes = len(api.changes)
    removed = api.delete("/people/jen")
    assert removed.status_code == 200 and removed.json()["templates_removed"] == person["template_count"]
    assert api.changes[changes:] == [SITE]
    assert "jen" not in [p["person_id"] for p in api.get("/people").json()]
    assert api.store.count_templates(person_id="jen") == 0


def test_each_rejected_photo_gets_its_specific_reason(sqlite_api: Api, tmp_path: Path) -> None:
    aniston = facesets.photos("Jennifer_Aniston")
    jpeg = aniston[0].read_bytes()
    before = sorted(tmp_path.rglob("*"))
    photos = [
        ("good.jpg", jpeg),
        ("blurred.png", _blurred(aniston[4])),
        ("empty.jpg", b""),
        ("notes.txt", b"this is not an image\n"),
        ("truncated.jpg", aniston[1].read_bytes()[: len(aniston[1].read_bytes()) // 2]),
        ("bomb.png", _png_declaring(20000, 20000)),
        ("grey.png", _png(np.full((240, 240, 3), 90, np.uint8))),
        ("../../../../tmp/evil.jpg", b"GIF89a not really"),
        ("good.jpg", jpeg),  # the same name (and bytes) again: a distinct label, and a duplicate verdict
    ]
    r = sqlite_api.upload("jen", photos, name="Jennifer Aniston")
    assert r.status_code == 200, r.text
    by_source = {p["source"]: p for p in r.json()["photos"]}
    assert list(by_source) == [
        "good.jpg",
        "blurred.png",
        "empty.jpg",
        "notes.txt",
        "truncated.jpg",
        "bomb.png",
        "grey.png",
        "../../../../tmp/evil.jpg",
        "good.jpg (2)",
    ]
    assert by_source["good.jpg"]["accepted"] is True and by_source["good.jpg"]["template_id"] is not None
    assert by_source["blurred.png"]["reason"] == q.TOO_BLURRED and by_source["blurred.png"]["figures"]["blur"] < 12
    expected = {
        "empty.jpg": "empty",
        "notes.txt": "not a recognised image format",
        "truncated.jpg": "truncated",
        "bomb.png": "too large",  # refused from the header (PIL's own guard or ours, by pixel count)
        "../../../../tmp/evil.jpg": "",
    }
    for source, words in expected.items():
        verdict = by_source[source]
        assert verdict["accepted"] is False and verdict["reason"] == q.UNREADABLE, verdict
        assert words in verdict["message"], verdict
    assert by_source["grey.png"]["reason"] == q.NO_FACE
    assert by_source["good.jpg (2)"]["reason"] in (q.DUPLICATE_TEMPLATE, q.DUPLICATE_IMAGE)
    assert r.json()["added"] == 1 and r.json()["rejected"] == 8
    # file names are labels only: nothing was written anywhere under them
    assert sorted(tmp_path.rglob("*")) == before
    assert not Path("/tmp/evil.jpg").exists()


def test_an_upload_that_adds_nothing_is_422_with_the_report(sqlite_api: Api) -> None:
    r = sqlite_api.upload(
        "nobody", [("grey.png", _png(np.full((200, 200, 3), 90, np.uint8))), ("e.jpg", b"")], name="N"
    )
    assert r.status_code == 422 and r.json()["error"] == "no_photo_accepted"
    body = r.json()
    assert [p["reason"] for p in body["photos"]] == [q.NO_FACE, q.UNREADABLE]
    assert body["added"] == 0 and body["person_created"] is False and body["gallery"]["changed"] is False
    assert sqlite_api.get("/people/nobody").status_code == 404  # not created without a template
    assert sqlite_api.changes == []


def test_a_probable_duplicate_identity_needs_the_override(sqlite_api: Api) -> None:
    obama = facesets.photos("Barack_Obama")
    assert sqlite_api.upload("obama", [_blob(obama[0])], name="Barack Obama").status_code == 200
    flagged = sqlite_api.upload("b-obama", [_blob(obama[2])], name="B. Obama")
    assert flagged.status_code == 422
    (verdict,) = flagged.json()["photos"]
    assert verdict["reason"] == q.PROBABLE_DUPLICATE_IDENTITY and verdict["matched_person"] == "obama"
    assert _field_error(
        sqlite_api.upload("b-obama", [_blob(obama[2])], name="B. Obama", allow_duplicate_identity="perhaps")
    ) == ["allow_duplicate_identity"]
    forced = sqlite_api.upload("b-obama", [_blob(obama[2])], name="B. Obama", allow_duplicate_identity="true")
    assert forced.status_code == 200 and forced.json()["person_created"] is True


def test_upload_targets_and_form_fields(sqlite_api: Api) -> None:
    photo = _blob(facesets.photos("Elon_Musk")[0])
    missing = sqlite_api.upload("elon", [photo])  # no such person and no name to create them
    assert missing.status_code == 404 and "name" in missing.json()["detail"]
    assert _field_error(sqlite_api.upload("elon", [photo], name="Elon", site="mars")) == ["site"]
    assert _field_error(sqlite_api.upload("elon", [photo], name="Elon", colour="red")) == ["colour"]
    assert _field_error(sqlite_api.upload("elon", [], name="Elon")) == ["files"]
    wrong_field = sqlite_api.post("/people/elon/faces", files=[("photo", ("a.jpg", photo[1]))], data={"name": "E"})
    assert _field_error(wrong_field) == ["photo"]
    sqlite_api.store.ensure_site("branch")
    assert sqlite_api.upload("elon", [photo], name="Elon Musk", site="branch").status_code == 200
    elsewhere = sqlite_api.upload("elon", [_blob(facesets.photos("Elon_Musk")[1])], site=SITE)
    assert elsewhere.status_code == 409 and "branch" in elsewhere.json()["detail"]
    assert sqlite_api.changes == ["branch"]


def test_people_from_folder_names_stay_addressable(sqlite_api: Api) -> None:
    # the CLI's folder import makes ids of folder names; the API creates only URL-safe ids, but manages any
    sqlite_api.store.add_person("José García", SITE, "José García")
    assert sqlite_api.get("/people/José García").json()["name"] == "José García"
    assert sqlite_api.patch("/people/José García", json={"active": False}).status_code == 200
    assert sqlite_api.get("/attendance", params={"person_id": "José García"}).status_code == 200
    assert sqlite_api.delete("/people/José García").status_code == 200
    assert _field_error(sqlite_api.post("/people", json={"person_id": "José García", "name": "J"})) == ["person_id"]
    photo = _blob(facesets.photos("Elon_Musk")[0])
    refused = sqlite_api.upload("Elon Musk", [photo], name="Elon Musk")
    assert _field_error(refused) == ["person_id"] and refused.json()["fields"][0]["location"] == "path"


def test_store_failures_are_503(sqlite_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_args: object, **_kwargs: object) -> None:
        raise StoreError("database error: connection refused")

    monkeypatch.setattr(sqlite_api.store, "list_people", down)
    monkeypatch.setattr(sqlite_api.store, "schema_version", down)
    r = sqlite_api.get("/people")
    assert r.status_code == 503 and r.json() == {
        "error": "store_unavailable",
        "detail": "database error: connection refused",
        "fields": [],
    }
    assert sqlite_api.client.get("/healthz").status_code == 503


def test_too_many_files_is_413_and_nothing_is_enrolled(sqlite_api: Api) -> None:
    tiny = _png(np.full((8, 8, 3), 200, np.uint8))
    r = sqlite_api.upload("many", [(f"{i}.png", tiny) for i in range(MAX_FILES + 1)], name="Many")
    assert r.status_code == 413 and str(MAX_FILES) in r.json()["detail"]
    assert sqlite_api.get("/people/many").status_code == 404


class _CountingApp:
    """ASGI wrapper that counts the request body bytes the app actually pulled through receive()."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def counted() -> dict:
            message = await receive()
            self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def test_an_oversized_upload_is_refused_before_it_is_read(sqlite_store: Store, pipe: FacePipeline) -> None:
    cap = 256 * 1024
    api = _api(sqlite_store, Enroller(sqlite_store, pipe, EnrollmentSection()), max_upload_bytes=cap)
    counting = _CountingApp(api.app)
    client = TestClient(counting)
    big = [("big.jpg", b"\xff" * (cap + 1))]
    r = client.post(f"{V1}/people/jen/faces", headers=AUTH, files=[("files", big[0])], data={"name": "Jen"})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large" and str(cap) in r.json()["detail"]
    assert counting.received == 0  # declared Content-Length over the cap: not one byte was read
    # anonymous or not, a declared oversize is refused before anything else
    assert client.post(f"{V1}/people/jen/faces", files=[("files", big[0])]).status_code == 413
    # JSON endpoints have their own small cap
    assert client.post(f"{V1}/people", headers=AUTH, json={"person_id": "x", "name": "y" * 70_000}).status_code == 413
    # a good upload under the cap still works
    small = _blob(facesets.photos("Jennifer_Aniston")[1])  # 26 kB
    ok = client.post(f"{V1}/people/jen/faces", headers=AUTH, files=[("files", small)])
    assert ok.status_code == 404  # reached the route: no person and no name

    # a streamed (chunked, no Content-Length) body is cut off once the cap is passed
    chunk = 16 * 1024
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n\r\n'
        for _ in range(10 * cap // chunk):
            pulled += 1
            yield b"\xff" * chunk

    async def post_streamed() -> httpx.Response:
        transport = httpx.ASGITransport(app=counting)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=XyZ"}
            return await c.post(f"{V1}/people/jen/faces", content=body(), headers=headers)

    counting.received = 0
    streamed = asyncio.run(post_streamed())
    assert streamed.status_code == 413 and streamed.json()["error"] == "payload_too_large", streamed.text
    assert pulled <= cap // chunk + 2 and counting.received <= cap + chunk + 100


class _GatedEnroller:
    """The real enroller behind a gate, recording how many enrollments overlap."""

    def __init__(self, inner: Enroller) -> None:
        self.inner = inner
        self.fingerprint = inner.fingerprint
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def enroll(self, *args: Any, **kwargs: Any) -> EnrollReport:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.release()
        try:
            self.gate.wait(30)
            return self.inner.enroll(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1


def test_enrollment_runs_off_the_event_loop_one_at_a_time(sqlite_store: Store, pipe: FacePipeline) -> None:
    gated = _GatedEnroller(Enroller(sqlite_store, pipe, EnrollmentSection()))
    api = _api(sqlite_store, gated)
    photos = {"jen": facesets.photos("Jennifer_Aniston")[0], "obama": facesets.photos("Barack_Obama")[0]}
    results: dict[str, int] = {}
    with TestClient(api.app) as client:  # one event loop for every request

        def upload(person: str) -> None:
            files = [("files", _blob(photos[person]))]
            r = client.post(f"{V1}/people/{person}/faces", headers=AUTH, files=files, data={"name": person})
            results[person] = r.status_code

        threads = [threading.Thread(target=upload, args=(p,)) for p in photos]
        for t in threads:
            t.start()
        assert gated.entered.acquire(timeout=30)  # one enrollment is inside the enroller, blocked
        # the loop still serves other requests while it waits
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert client.get(f"{V1}/people", headers=AUTH).status_code == 200
        assert time.monotonic() - started < 5
        assert not gated.entered.acquire(timeout=0.5)  # the second upload waits for the first
        gated.gate.set()
        for t in threads:
            t.join(60)
    assert results == {"jen": 200, "obama": 200}
    assert gated.max_active == 1


def test_a_failing_publisher_never_loses_the_change(sqlite_store: Store, pipe: FacePipeline) -> None:
    calls: list[str] = []

    def broken(site: str) -> None:
        calls.append(site)
        raise RuntimeError("broker unreachable")

    api = _api(sqlite_store, Enroller(sqlite_store, pipe, EnrollmentSection()), on_change=broken)
    r = api.upload("jen", [_blob(facesets.photos("Jennifer_Aniston")[0])], name="Jen")
    assert r.status_code == 200
    assert r.json()["gallery"] == {"changed": True, "published": False, "error": "RuntimeError: broker unreachable"}
    assert sqlite_store.count_templates(person_id="jen") == 1
    off = api.patch("/people/jen", json={"active": False})
    assert off.status_code == 200 and off.json()["gallery"]["published"] is False
    assert sqlite_store.get_person("jen").active is False
    gone = api.delete("/people/jen")
    assert gone.status_code == 200 and "broker unreachable" in gone.json()["gallery"]["error"]
    assert api.get("/people/jen").status_code == 404
    assert calls == [SITE, SITE, SITE]


# --- sites, devices, attendance ---------------------------------------------------------------------------------


def test_site_gallery_and_devices(api: Api) -> None:
    store = api.store
    empty = api.get(f"/sites/{SITE}/gallery").json()
    assert empty["version"] is None and empty["count"] == 0
    fp = "dlib-resnet-v1:test"
    for count in (3, 5):
        version = store.next_gallery_version(SITE)
        store.record_gallery_version(
            SITE, version, fingerprint=fp, count=count, people=2, blob_sha256=f"{version:064x}", manifest={"v": version}
        )
    gallery = api.get(f"/sites/{SITE}/gallery").json()
    assert gallery | {"created": None} == {
        "site": SITE,
        "version": 2,
        "epoch": 0,
        "count": 5,
        "people": 2,
        "fingerprint": fp,
        "blob_sha256": f"{2:064x}",
        "created": None,
        "current_encoder": False,
    }

    t0 = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
    seen = datetime(2026, 1, 15, 8, 0, 5, tzinfo=UTC)
    store.upsert_device_status(
        DeviceStatus("door-1", SITE, "online", t0, agent_version="0.2.0", gallery_version=2, health={"fps": 14.5}),
        received=seen,
    )
    store.record_ack("door-1", SITE, 2, ok=True)
    store.upsert_device_status(DeviceStatus("door-2", SITE, "stopped", t0, agent_version="0.1.9"), received=seen)
    store.record_ack("door-2", SITE, 1, ok=True)
    store.upsert_device_status(DeviceStatus("door-3", SITE, "offline", t0), received=seen)
    # a device holding a newer version than this server recorded (a restored database): ahead, never "lag 0"
    store.upsert_device_status(DeviceStatus("door-4", SITE, "online", t0, gallery_version=5), received=seen)
    store.ensure_site("branch")
    store.upsert_device_status(DeviceStatus("door-9", "branch", "online", t0), received=seen)

    devices = api.get(f"/sites/{SITE}/devices").json()
    assert devices["site"] == SITE and devices["latest_version"] == 2
    rows = {d["device_id"]: d for d in devices["devices"]}
    assert list(rows) == ["door-1", "door-2", "door-3", "door-4"]
    assert [(d["state"], d["agent_version"], d["gallery_version"], d["lag"], d["sync"]) for d in rows.values()] == [
        ("online", "0.2.0", 2, 0, "current"),
        ("stopped", "0.1.9", 1, 1, "behind"),
        ("offline", None, None, 2, "behind"),
        ("online", None, 5, -3, "ahead"),
    ]
    assert devices["latest_epoch"] == 0 and rows["door-1"]["latest_epoch"] == 0
    assert rows["door-1"]["health"] == {"fps": 14.5}
    assert rows["door-1"]["last_seen"] == "2026-01-15T08:00:05Z"
    assert api.get("/sites/mars/devices").status_code == 404
    assert api.get("/sites/mars/gallery").status_code == 404
    assert _field_error(api.get("/sites/a+b/devices")) == ["site"]
    assert {s["site"] for s in api.get("/sites").json()} == {SITE, "branch"}
    assert api.post("/sites", json={"site": "annex", "name": "Annex"}).status_code == 201
    assert api.post("/sites", json={"site": "annex"}).status_code == 409
    assert api.post("/people", json={"person_id": "zed", "name": "Zed", "site": "annex"}).status_code == 201


def _event(person: str | None, ts: datetime, *, site: str = SITE, name: str | None = None) -> AttendanceEvent:
    return AttendanceEvent(
        event_id=str(uuid.uuid4()),
        seq=1,
        device_id="door-1",
        site_id=site,
        ts=ts,
        camera="cam0",
        track_id=3,
        person_id=person,
        name=name if name is not None else person,
        distance=0.3 if person else None,
        threshold=0.5,
        gallery_version=2,
    )


def test_attendance_events_and_daily_report(api: Api) -> None:
    store = api.store
    store.ensure_site("branch")
    day = date(2026, 1, 15)

    def at(hour: int, minute: int = 0) -> datetime:
        return datetime(2026, 1, 15, hour, minute, tzinfo=UTC)

    store.insert_events(
        [
            _event("alice", at(8, 55)),
            _event("alice", at(12, 30)),
            _event("alice", at(17, 5)),
            _event("bob", at(9, 10), name="=HYPERLINK(1)"),
            _event(None, at(10, 0)),  # a stranger: an event, not a report row
            _event("alice", at(9, 0) + timedelta(days=1)),
            _event("carol", at(9, 30), site="branch"),
        ]
    )
    events = api.get("/attendance", params={"site": SITE, "date_from": "2026-01-15", "date_to": "2026-01-15"}).json()
    assert events["count"] == 5 and events["truncated"] is False
    assert [e["person_id"] for e in events["events"]] == ["alice", "bob", None, "alice", "alice"]
    assert events["events"][0]["ts"] == "2026-01-15T08:55:00Z" and events["events"][0]["device_id"] == "door-1"
    alice = api.get("/attendance", params={"person_id": "alice"}).json()
    assert alice["count"] == 4
    limited = api.get("/attendance", params={"site": SITE, "limit": 2}).json()
    assert limited["count"] == 2 and limited["truncated"] is True
    assert api.get("/attendance").json()["count"] == 7  # all sites
    assert _field_error(api.get("/attendance", params={"date_from": "2026-02-30"})) == ["date_from"]
    assert _field_error(api.get("/attendance", params={"date_from": "2026-01-16", "date_to": "2026-01-15"})) == [
        "date_to"
    ]
    assert _field_error(api.get("/attendance", params={"site": "mars"})) == ["site"]
    assert _field_error(api.get("/attendance", params={"limit": 0})) == ["limit"]

    report = api.get("/attendance/report", params={"site": SITE, "date": day.isoformat()})
    assert report.status_code == 200
    rows = report.json()["rows"]
    assert [(r["person_id"], r["first_seen"], r["last_seen"], r["events"]) for r in rows] == [
        ("alice", "2026-01-15T08:55:00Z", "2026-01-15T17:05:00Z", 3),
        ("bob", "2026-01-15T09:10:00Z", "2026-01-15T09:10:00Z", 1),
    ]
    csv = api.get("/attendance/report", params={"site": SITE, "date": "2026-01-15", "format": "csv"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert 'filename="attendance-hq-2026-01-15.csv"' in csv.headers["content-disposition"]
    lines = csv.text.splitlines()
    assert lines[0] == "site,person_id,name,day,first_seen,last_seen,events"
    assert len(lines) == 3 and lines[1].startswith("hq,alice,alice,2026-01-15,")
    assert lines[2].startswith("hq,bob,'=HYPERLINK(1)")  # a formula stays text in a spreadsheet
    everywhere = api.get("/attendance/report", params={"date": "2026-01-15"}).json()["rows"]
    assert [(r["site"], r["person_id"]) for r in everywhere] == [("branch", "carol"), (SITE, "alice"), (SITE, "bob")]
    # the day counted in another time zone: Tokyo's 16th runs from 15:00 UTC on the 15th to 15:00 UTC on the 16th
    tokyo = api.get("/attendance/report", params={"site": SITE, "date": "2026-01-16", "tz": "Asia/Tokyo"}).json()
    assert [(r["person_id"], r["first_seen"], r["events"]) for r in tokyo["rows"]] == [
        ("alice", "2026-01-15T17:05:00Z", 2)
    ]
    assert _field_error(api.get("/attendance/report", params={"date": "15/01/2026"})) == ["date"]
    assert _field_error(api.get("/attendance/report", params={"date": "2026-01-15", "format": "xml"})) == ["format"]
    assert _field_error(api.get("/attendance/report", params={"date": "2026-01-15", "tz": "Mars/Base"})) == ["tz"]
    assert _field_error(api.get("/attendance/report")) == ["date"]


# --- OpenAPI and a real server ----------------------------------------------------------------------------------


def test_openapi_document_declares_paths_and_the_bearer_scheme(sqlite_api: Api) -> None:
    doc = sqlite_api.client.get("/openapi.json").json()
    paths = doc["paths"]
    for path in [
        "/healthz",
        "/api/v1/people",
        "/api/v1/people/{person_id}",
        "/api/v1/people/{person_id}/faces",
        "/api/v1/people/{person_id}/faces/{template_id}",
        "/api/v1/sites/{site}/gallery",
        "/api/v1/sites/{site}/devices",
        "/api/v1/attendance",
        "/api/v1/attendance/report",
    ]:
        assert path in paths, path
    schemes = doc["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["bearerAuth"].items()
    assert paths["/api/v1/people"]["get"]["security"] == [{"bearerAuth": []}]
    assert "security" not in paths["/healthz"]["get"]
    upload = paths["/api/v1/people/{person_id}/faces"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["properties"]["files"]["maxItems"] == MAX_FILES
    assert set(paths["/api/v1/people/{person_id}"]) == {"get", "patch", "delete"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_real_uvicorn_server(sqlite_store: Store, pipe: FacePipeline) -> None:
    api = _api(sqlite_store, Enroller(sqlite_store, pipe, EnrollmentSection()), max_upload_bytes=1024 * 1024)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            assert http.get(f"{V1}/sites").status_code == 401
            sites = http.get(f"{V1}/sites", headers=AUTH)
            assert sites.status_code == 200 and [s["site"] for s in sites.json()] == [SITE]
        # headers announcing 64 MiB and no body at all: the answer must come without waiting for the body
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(
                (
                    f"POST {V1}/people/jen/faces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {64 * 2**20}\r\n\r\n"
                ).encode()
            )
            answer = ""
            while "payload_too_large" not in answer:
                data = raw.recv(65536)
                if not data:
                    break
                answer += data.decode()
        assert answer.startswith("HTTP/1.1 413"), answer
        assert "payload_too_large" in answer
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()
