"""The snapshot store (edge_agent/delivery/snapshots.py): modes, crops, retention, atomic writes."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.delivery.snapshots import SnapshotConfig, SnapshotStore
from models.config import load_dataclass
from models.errors import ConfigError, ImageError, SnapshotError

DAY1 = datetime(2025, 3, 1, 8, 30, tzinfo=timezone.utc)
DAY2 = DAY1 + timedelta(days=1)
MIB = 1024 * 1024


def noisy_frame(seed: int = 0, shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    # noise does not compress: every snapshot has a predictable, sizeable JPEG
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def decode(path: Path) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, f"{path} does not decode"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def store(tmp_path: Path, **options: object) -> SnapshotStore:
    return SnapshotStore(SnapshotConfig(dir=tmp_path / "snaps", **options))  # type: ignore[arg-type]


def eid() -> str:
    return str(uuid.uuid4())


def test_off_stores_nothing(tmp_path: Path) -> None:
    s = store(tmp_path, mode="off")
    assert s.save(eid(), noisy_frame(), (10, 10, 50, 50)) is None
    assert not (tmp_path / "snaps").exists()
    assert list(s.iter_snapshots()) == []


def test_face_mode_crops_with_a_margin_in_rgb(tmp_path: Path) -> None:
    frame = np.zeros((200, 300, 3), np.uint8)
    frame[50:130, 100:160] = (220, 30, 30)  # the "face": red
    s = store(tmp_path, mode="face", face_margin=0.3)
    event_id = eid()
    ref = s.save(event_id.upper(), frame, (100.0, 50.0, 160.0, 130.0), at=DAY1)
    assert ref == f"2025-03-01/{event_id}.jpg"  # canonical lower-case id, UTC day of the event
    crop = decode(tmp_path / "snaps" / ref)
    # 60 x 80 box, 30 % of its width / height added on each side: 96 x 128
    assert crop.shape == (128, 96, 3)
    centre = crop[40:88, 30:66].reshape(-1, 3).mean(axis=0)
    assert centre[0] > 180 and centre[1] < 70 and centre[2] < 70  # still red: channel order kept


def test_face_box_at_the_edge_is_clipped_and_bad_input_refused(tmp_path: Path) -> None:
    s = store(tmp_path, mode="face", face_margin=0.5)
    ref = s.save(eid(), noisy_frame(), (0, 0, 40, 40))
    assert ref is not None and decode(tmp_path / "snaps" / ref).shape == (60, 60, 3)
    with pytest.raises(ImageError, match="outside"):
        s.save(eid(), noisy_frame(), (500, 500, 600, 600))
    with pytest.raises(ImageError, match="x1 < x2"):
        s.save(eid(), noisy_frame(), (40, 40, 10, 10))
    with pytest.raises(ImageError, match="RGB uint8"):
        s.save(eid(), noisy_frame().astype(np.float32), (0, 0, 40, 40))
    with pytest.raises(ImageError, match="RGB uint8"):
        s.save(eid(), np.zeros((40, 40), np.uint8), (0, 0, 40, 40))
    with pytest.raises(SnapshotError, match="not a UUID"):
        s.save("../../etc/passwd", noisy_frame(), (0, 0, 40, 40))
    with pytest.raises(SnapshotError, match="aware"):
        s.save(eid(), noisy_frame(), (0, 0, 40, 40), at=datetime(2025, 1, 1))  # naive
    assert len(list(s.iter_snapshots())) == 1


def test_frame_mode_keeps_the_whole_frame_and_quality_matters(tmp_path: Path) -> None:
    frame = noisy_frame(shape=(90, 130))
    low = store(tmp_path / "low", mode="frame", jpeg_quality=30)
    high = store(tmp_path / "high", mode="frame", jpeg_quality=95)
    ref_low = low.save(eid(), frame, (0, 0, 1, 1))
    ref_high = high.save(eid(), frame, (0, 0, 1, 1))
    assert ref_low is not None and ref_high is not None
    assert decode(tmp_path / "low" / "snaps" / ref_low).shape == frame.shape
    assert low.total_bytes() < high.total_bytes() / 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "thumbnail"),
        ("jpeg_quality", 0),
        ("jpeg_quality", 101),
        ("jpeg_quality", 90.5),
        ("max_age_days", 0),
        ("max_total_mib", -1),
        ("max_total_mib", float("inf")),
        ("face_margin", -0.1),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"snapshots.{field}"):
        SnapshotConfig(dir=tmp_path, **{field: value})  # type: ignore[arg-type]


def test_config_loads_from_a_mapping(tmp_path: Path) -> None:
    cfg = load_dataclass(SnapshotConfig, {"dir": str(tmp_path), "mode": "frame", "max_total_mib": 5})
    assert (cfg.dir, cfg.mode, cfg.max_total_mib, cfg.jpeg_quality) == (tmp_path, "frame", 5.0, 90)


def test_retention_by_size_deletes_the_oldest_and_empty_days(tmp_path: Path) -> None:
    s = store(tmp_path, mode="frame", max_total_mib=0.05)
    first = s.save(eid(), noisy_frame(0), (0, 0, 1, 1), at=DAY1)
    assert first is not None
    size = s.total_bytes()
    assert 12_000 < size < 0.02 * MIB  # ~18 KB each: two or three fit under 0.05 MiB
    refs = [first] + [s.save(eid(), noisy_frame(i), (0, 0, 1, 1), at=DAY2) for i in range(1, 6)]
    kept = [snap.ref for snap in s.iter_snapshots()]
    assert kept == refs[-len(kept) :] and 2 <= len(kept) <= 3  # the newest, in order
    assert s.total_bytes() <= 0.05 * MIB
    assert s.total_bytes() == sum(p.stat().st_size for p in (tmp_path / "snaps").rglob("*.jpg"))
    assert not (tmp_path / "snaps" / "2025-03-01").exists()  # its only file went: the day directory too


def test_the_newest_snapshot_survives_a_tiny_limit(tmp_path: Path) -> None:
    s = store(tmp_path, mode="frame", max_total_mib=0.001)
    refs = [s.save(eid(), noisy_frame(i), (0, 0, 1, 1)) for i in range(3)]
    assert [snap.ref for snap in s.iter_snapshots()] == refs[-1:]


def test_retention_by_age_and_rescan_at_startup(tmp_path: Path) -> None:
    s = store(tmp_path, mode="frame", max_age_days=30)
    refs = [s.save(eid(), noisy_frame(i), (0, 0, 1, 1), at=DAY1 + timedelta(hours=i)) for i in range(4)]
    root = tmp_path / "snaps"
    now = time.time()
    # written in the order 0..3; pretend 1 and 0 are 40 and 35 days old
    os.utime(root / refs[1], (now - 40 * 86_400, now - 40 * 86_400))
    os.utime(root / refs[0], (now - 35 * 86_400, now - 35 * 86_400))
    (root / "2025-03-01" / f"{eid()}.jpg.abc123.tmp").write_bytes(b"half a jpeg")  # a crash mid-write
    (root / "README").write_text("not ours")

    again = store(tmp_path, mode="frame", max_age_days=30)  # rescans (oldest by mtime first) and prunes
    assert [snap.ref for snap in again.iter_snapshots()] == refs[2:]
    assert again.total_bytes() == sum((root / r).stat().st_size for r in refs[2:])
    assert not list(root.rglob("*.tmp")) and (root / "README").exists()
    # a timer's prune: 31 days from now everything has aged out
    assert again.prune(now=now + 31 * 86_400) == 2
    assert list(again.iter_snapshots()) == [] and again.total_bytes() == 0
    assert not (root / "2025-03-01").exists()


def test_a_failed_write_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path, mode="frame")
    kept = s.save(eid(), noisy_frame(), (0, 0, 1, 1), at=DAY1)

    def crash(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SnapshotError, match="No space left"):
        s.save(eid(), noisy_frame(1), (0, 0, 1, 1), at=DAY1)
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "snaps" / "2025-03-01").iterdir())
    assert files == [Path(str(kept)).name]
    assert [snap.ref for snap in s.iter_snapshots()] == [kept]


def test_readers_never_see_a_partial_jpeg(tmp_path: Path) -> None:
    s = store(tmp_path, mode="frame")
    root = tmp_path / "snaps"
    done = threading.Event()
    seen: set[Path] = set()
    bad: list[str] = []

    def reader() -> None:
        while not done.is_set():
            for path in root.rglob("*.jpg"):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                seen.add(path)
                if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
                    bad.append(f"{path.name}: {len(data)} bytes")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            s.save(eid(), noisy_frame(i, shape=(240, 320)), (0, 0, 1, 1))
    finally:
        done.set()
        thread.join(10)
    assert bad == []
    assert len(seen) > 5


def test_derived_paintings_are_not_snapshots_and_leave_with_theirs(tmp_path: Path) -> None:
    s = store(tmp_path, mode="frame")
    first = s.save(eid(), noisy_frame(1), (10, 10, 50, 50), at=DAY1)
    assert first is not None
    painted = tmp_path / "snaps" / first.replace(".jpg", ".mosaic.jpg")
    painted.write_bytes((tmp_path / "snaps" / first).read_bytes())
    assert [x.ref for x in store(tmp_path, mode="frame").iter_snapshots()] == [first]  # the rescan skips it
    size = (tmp_path / "snaps" / first).stat().st_size
    tight = store(tmp_path, mode="frame", max_total_mib=1.5 * size / MIB)
    second = tight.save(eid(), noisy_frame(2), (10, 10, 50, 50), at=DAY2)
    assert [x.ref for x in tight.iter_snapshots()] == [second]
    assert not painted.exists() and not (tmp_path / "snaps" / "2025-03-01").exists()
