"""The admin's command line, every command on a real SQLite database, real models and a real Mosquitto; bad input
at the CLI door gets a specific message and the documented exit code, and never loses what is stored."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import facesets
import pytest
from conftest import MosquittoBroker, free_port

from enrollment_server import store as st
from enrollment_server.cli import EXIT_BROKER, EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, main

SITE = "hq"


class Cli:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str], broker_url: str) -> None:
        self.root = root
        self.capsys = capsys
        self.db = root / "server.db"
        self.config = root / "server.yaml"
        self.write_config(broker_url)

    def write_config(self, broker_url: str, **extra: object) -> None:
        cfg = {
            "site": SITE,
            "database": {"url": str(self.db)},
            "mqtt": {"url": broker_url},
            "gallery": {"signing_key": str(self.root / "keys" / "gallery.pem")},
            **extra,
        }
        self.config.write_text(json.dumps(cfg))

    def __call__(self, *argv: str) -> tuple[int, list[str], str]:
        self.capsys.readouterr()
        code = main(["-c", str(self.config), *argv])
        out, err = self.capsys.readouterr()
        return code, [line for line in out.splitlines() if line.strip()], err

    def json(self, *argv: str) -> tuple[int, list[dict], str]:
        code, lines, err = self(*argv)
        return code, [json.loads(line) for line in lines if line.startswith("{")], err


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], mosquitto: MosquittoBroker) -> Cli:
    c = Cli(tmp_path, capsys, mosquitto.url)
    code, out, err = c.json("init")
    assert code == EXIT_OK, err
    assert out[0]["public_key_b64"] and out[0]["schema_version"] >= 1
    return c


def photos(person: str) -> list[str]:
    return [str(p) for p in facesets.photos(person)]


def test_enroll_list_rename_publish_remove(cli: Cli, mosquitto: MosquittoBroker):
    code, out, err = cli.json("enroll", "--person-id", "obama", "--name", "Barack Obama", *photos("Barack_Obama")[:2])
    assert code == EXIT_OK, err
    report, gallery = out[0], out[1]["gallery"]
    assert report["added"] == 2 and report["person_created"] is True
    assert gallery["people"] == 1 and gallery["templates"] == 2 and gallery["version"] >= 1

    code, out, _ = cli.json("list")
    assert code == EXIT_OK
    assert out == [{"person_id": "obama", "name": "Barack Obama", "site": SITE, "active": True, "templates": 2}]

    code, out, _ = cli.json("rename", "obama", "B. Obama")
    assert code == EXIT_OK and out == [{"person_id": "obama", "name": "B. Obama"}]

    code, out, _ = cli.json("publish")
    assert code == EXIT_OK and out[0]["gallery"]["version"] > gallery["version"]

    # the broker is gone: the removal is stored all the same, and the exit code says the publication is pending
    mosquitto.stop()
    code, out, err = cli.json("remove", "obama", "--timeout", "2")
    assert code == EXIT_BROKER and out[0] == {"removed": "obama", "templates": 2}
    assert "not published" in err and "not reachable" in err
    assert cli.json("list")[1] == []


def test_import_folder_reports_each_photo_and_a_summary(cli: Cli, tmp_path: Path):
    root = tmp_path / "people"
    for person in ("Angelina_Jolie", "Matt_Damon"):
        (root / person).mkdir(parents=True)
        for src in photos(person)[:2]:
            (root / person / Path(src).name).symlink_to(src)
    (root / "Matt_Damon" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    code, out, err = cli.json("import", str(root), "--quiet", "--no-publish")
    assert code == EXIT_PARTIAL, err
    rows = [r for r in out if "source" in r]
    assert len(rows) == 5
    broken = [r for r in rows if r["source"].endswith("broken.jpg")]
    assert broken and broken[0]["accepted"] is False and broken[0]["reason"] == "unreadable_image"
    summary = out[-1]["summary"]
    assert summary == {"people": 2, "photos": 5, "added": 4, "rejected": 1, "people_created": 2}


def test_devices_and_report(cli: Cli):
    store = st.Store.open(str(cli.db))
    store.ensure_site(SITE)
    now = datetime.now(timezone.utc)
    store.upsert_device_status(
        st.DeviceStatus(
            device_id="door-1", site_id=SITE, state="online", status_ts=now, agent_version="1.0",
        )
    )  # fmt: skip
    store.insert_event(
        st.AttendanceEvent(
            event_id="0b6c8a52-6a3e-4a43-9d55-0c9d2bbd1c11", seq=1, device_id="door-1", site_id=SITE, camera="c0",
            track_id=1, person_id="obama", name="Barack Obama", distance=0.3, margin=0.2, threshold=0.5,
            gallery_version=1, fingerprint="fp", ts=now, snapshot=None,
        )
    )  # fmt: skip
    store.close()

    code, out, _ = cli.json("devices", "--json")
    assert code == EXIT_OK and [(d["device"], d["state"], d["sync"]) for d in out] == [
        ("door-1", "online", "unpublished")
    ]
    code, lines, _ = cli("devices")
    assert code == EXIT_OK and lines[0].startswith("device") and "door-1" in lines[1]

    # the database restored from a backup at v1 while door-1 holds v3 of the same epoch, door-2 v9 of another
    store = st.Store.open(str(cli.db))
    store.record_gallery_version(
        SITE,
        store.next_gallery_version(SITE),
        fingerprint="fp",
        count=1,
        people=1,
        blob_sha256="0" * 64,
        manifest={},
        epoch=1000,
    )
    store.upsert_device_status(st.DeviceStatus("door-1", SITE, "online", now, gallery_version=3, gallery_epoch=1000))
    store.upsert_device_status(st.DeviceStatus("door-2", SITE, "online", now, gallery_version=9, gallery_epoch=900))
    store.close()
    code, out, _ = cli.json("devices", "--json")
    assert [(d["device"], d["gallery"], d["latest"], d["lag"], d["sync"]) for d in out] == [
        ("door-1", 3, 1, -2, "ahead"),
        ("door-2", 9, 1, None, "other_epoch"),
    ]
    code, lines, _ = cli("devices")
    assert "-2  ahead" in lines[1] and "AHEAD" in lines[1] and "older epoch" in lines[2]

    code, lines, _ = cli("report", "--date", now.date().isoformat(), "--site", SITE)
    assert code == EXIT_OK and "obama" in lines[1] and len(lines) == 2
    out_file = cli.root / "report.json"
    code, _, err = cli("report", "--date", now.date().isoformat(), "--format", "json", "--out", str(out_file))
    assert code == EXIT_OK and "1 rows written" in err
    assert json.loads(out_file.read_text())[0]["person_id"] == "obama"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("report", "--date", "23/11/2026"), "expected YYYY-MM-DD"),
        (("rename", "nobody", "X"), "nobody"),
        (("remove", "nobody"), "nobody"),
        (("import", "/nonexistent/folder", "--quiet"), "not a folder"),
        (("enroll", "--person-id", "x", "--name", "X", "/nonexistent.jpg"), "cannot read /nonexistent.jpg"),
        (("enroll", "--person-id", "x" * 200, "--name", "X", *photos("Barack_Obama")[:1]), "longer than 128"),
    ],
)
def test_bad_input_exits_2_with_a_specific_message(cli: Cli, argv: tuple[str, ...], message: str):
    code, _, err = cli(*argv)
    assert code == EXIT_FATAL, err
    assert message in err and "Traceback" not in err


def test_enroll_rejects_non_images_but_keeps_the_good_photo(cli: Cli, tmp_path: Path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("<?php system($_GET['c']); ?>")
    huge = tmp_path / "bomb.png"
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (60000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    )
    good = photos("Barack_Obama")[0]
    code, out, err = cli.json(
        "enroll", "--person-id", "obama", "--name", "Obama", good, str(fake), str(huge), "--no-publish"
    )
    assert code == EXIT_PARTIAL, err
    verdicts = {Path(r["source"]).name: r for r in out[0]["photos"]}
    assert verdicts[Path(good).name]["accepted"] is True
    assert verdicts["photo.jpg"]["reason"] == verdicts["bomb.png"]["reason"] == "unreadable_image"
    assert cli.json("list")[1][0]["templates"] == 1


def test_config_errors_and_unreachable_broker(cli: Cli):
    cli.write_config("mqtt://127.0.0.1:1883", colour="blue")
    code, _, err = cli("list")
    assert code == EXIT_FATAL and "colour" in err

    # the encoder: a known one, and a non-commercial one only with its licence acknowledged
    cli.write_config("mqtt://127.0.0.1:1883", enrollment={"encoder": "facenet"})
    code, _, err = cli("list")
    assert code == EXIT_FATAL and "enrollment.encoder: unknown encoder 'facenet'; known encoders: dlib-resnet-v1" in err
    cli.write_config("mqtt://127.0.0.1:1883", enrollment={"encoder": "mobilefacenet-192"})
    code, _, err = cli("list")
    assert code == EXIT_FATAL and "mobilefacenet-192's weights may not be used commercially" in err
    assert "MS1M-V2" in err and "set enrollment.accept_licence to non-commercial-research" in err

    cli.write_config(f"mqtt://127.0.0.1:{free_port()}")
    code, _, err = cli("publish", "--timeout", "1")
    assert code == EXIT_BROKER and "not reachable" in err


def _first_start(key: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    # a child process: what `enrollment-server init` / `serve` does with the key at its first start
    from enrollment_server import components
    from enrollment_server.config import config_from_dict

    cfg = config_from_dict({"gallery": {"signing_key": key}})
    barrier.wait()
    results.put(components.signer_for(cfg, create=True).key_id)


def test_two_first_starts_at_once_end_with_one_signing_key(tmp_path: Path) -> None:
    """Two server processes starting on an empty key volume (compose's `init` racing `serve`, two replicas):
    both must sign with the key that ends up on disk, or the edges refuse one of them forever."""
    import multiprocessing

    from models.contract.signing import Signer

    ctx = multiprocessing.get_context("fork")
    for attempt in range(8):
        key = tmp_path / f"try{attempt}" / "keys" / "gallery.pem"
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_first_start, args=(str(key), barrier, results)) for _ in range(3)]
        for p in procs:
            p.start()
        ids = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        on_disk = Signer.load(key).key_id
        assert ids == [on_disk] * 3, f"attempt {attempt}: processes signed with {ids}, the file holds {on_disk}"
        pub = key.with_suffix(".pub.pem").read_text()
        assert Signer.load(key).verifier.public_pem() == pub
        assert sorted(p.name for p in key.parent.iterdir()) == ["gallery.pem", "gallery.pub.pem"]  # no temp files
