"""Camera capture: order, latest-frame-wins, end / loop, reconnection (file and MJPEG-over-HTTP), stop, CameraSet."""

from __future__ import annotations

import itertools
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from mjpeg import MjpegServer

from edge_agent.capture import (
    Camera,
    CameraConfig,
    CameraSet,
    CameraState,
    SourceKind,
    gstreamer_available,
    redact_source,
    source_kind,
)
from models.errors import CaptureError, ConfigError

BITS = 10  # frame indices up to 1023 are drawn as 10 black / white blocks
BLOCK = 16


def draw_index(index: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    width, height = size
    image = np.full((height, width, 3), 90, np.uint8)
    for bit in range(BITS):
        value = 255 if index >> bit & 1 else 0
        image[:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = value
    return image


def read_index(image: np.ndarray) -> int:
    """Inverse of draw_index; survives JPEG artefacts (each block's centre is averaged)."""
    c = BLOCK // 2
    return sum(
        1 << bit for bit in range(BITS) if image[c - 3 : c + 3, bit * BLOCK + c - 3 : bit * BLOCK + c + 3].mean() > 128
    )


def write_video(path: Path, frames: int, fps: float = 30.0, size: tuple[int, int] = (160, 120)) -> Path:
    """An MJPG .avi written under a temporary name and renamed, so a camera never opens it half-written."""
    tmp = path.with_name(f".{path.stem}.tmp.avi")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(draw_index(i, size))
    writer.release()
    os.replace(tmp, path)
    return path


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def drain(camera: Camera, timeout: float = 2.0) -> list[int]:
    """Take every frame until the camera ends; returns the drawn indices."""
    out, seq = [], 0
    while (frame := camera.latest(seq, timeout)) is not None:
        assert frame.seq > seq
        seq = frame.seq
        out.append(read_index(frame.image))
    return out


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return write_video(tmp_path / "door.avi", 30)


# --- configuration --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": " cam"}, "name"),
        ({"source": " "}, "source"),
        ({"reconnect_min_s": -1.0}, "reconnect_min_s"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect_max_s"),
        ({"max_fps": 0.0}, "max_fps"),
        ({"width": 640, "height": 480}, "width"),  # a file has no capture size
        ({"source": "/dev/video0", "width": 640}, "width and height"),
        ({"source": "/dev/video0", "width": -1, "height": 480}, "width"),
        ({"source": "rtsp://cam/stream", "loop": True}, "loop"),
        ({"source": "rtsp://cam/stream", "realtime": False}, "realtime"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    args = {"name": "door", "source": "clip.avi", **kwargs}
    with pytest.raises(ConfigError, match=field):
        CameraConfig(**args)


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("videos/door.mp4", SourceKind.FILE),
        ("/data/door cam.avi", SourceKind.FILE),
        ("rtsp://user:pw@10.0.0.5:554/stream1", SourceKind.NETWORK),
        ("http://127.0.0.1:8080/stream.mjpg", SourceKind.NETWORK),
        ("/dev/video0", SourceKind.V4L2),
        ("/dev/v4l/by-id/usb-Logitech_C920-video-index0", SourceKind.V4L2),
        ("0", SourceKind.V4L2),
        (
            "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv ! "
            "video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink",
            SourceKind.GSTREAMER,
        ),
        (
            "rtspsrc location=rtsp://cam/s latency=200 ! rtph264depay ! h264parse ! nvv4l2decoder ! nvvidconv ! "
            "video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1",
            SourceKind.GSTREAMER,
        ),
        ("weird!name.avi", SourceKind.FILE),
    ],
)
def test_source_kind(source: str, kind: SourceKind) -> None:
    assert source_kind(source) is kind


def test_redact_source_hides_credentials() -> None:
    assert redact_source("rtsp://admin:secret@10.0.0.5/s") == "rtsp://***@10.0.0.5/s"
    assert redact_source("/videos/a.avi") == "/videos/a.avi"


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
def test_gstreamer_without_support_is_a_clear_error() -> None:
    camera = Camera(CameraConfig("jetson", "videotestsrc ! videoconvert ! appsink"))
    with pytest.raises(CaptureError, match="without GStreamer"):
        camera.start()
    assert camera.stats().state is CameraState.IDLE


def test_camera_set_rejects_duplicate_names(video: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate camera name"):
        CameraSet([CameraConfig("a", str(video)), CameraConfig("a", str(video))])


# --- files ----------------------------------------------------------------------------------------------------------
def test_file_frames_in_order_then_ended(video: Path) -> None:
    with Camera(CameraConfig("door", str(video), realtime=False)) as camera:
        frames = []
        seq = 0
        while (frame := camera.latest(seq, timeout=2.0)) is not None:
            frames.append(frame)
            seq = frame.seq
        stats = camera.stats()
    assert [f.seq for f in frames] == list(range(1, 31))
    assert [read_index(f.image) for f in frames] == list(range(30))
    positions = [f.position_ms for f in frames]
    assert positions[0] == 0.0
    assert positions[-1] == pytest.approx(29 * 1000 / 30, abs=1)
    assert all(f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8 for f in frames)
    assert not frames[0].image.flags.writeable
    assert frames[0].wall_time.tzinfo is not None
    assert stats.state is CameraState.ENDED
    assert (stats.frames_read, stats.frames_dropped, stats.reconnects) == (30, 0, 0)


def test_realtime_file_is_paced_at_its_fps(tmp_path: Path) -> None:
    video = write_video(tmp_path / "paced.avi", 16, fps=30.0)
    camera = Camera(CameraConfig("door", str(video)))
    started = time.monotonic()
    camera.start()
    try:
        indices = drain(camera)
        elapsed = time.monotonic() - started
        assert indices[-1] == 15
        # 16 frames at 30 fps take 0.5 s: never faster than the file's own rate (decoding alone is ~10x faster);
        # a loaded machine may deliver them slower, which is not what this checks
        assert elapsed > 0.4
        assert camera.stats().fps < 30 * 1.3
    finally:
        camera.stop()


def test_slow_consumer_gets_the_latest_frame_and_memory_stays_bounded(tmp_path: Path) -> None:
    size = (320, 240)
    frame_bytes = size[0] * size[1] * 3
    video = write_video(tmp_path / "fast.avi", 100, fps=100.0, size=size)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with Camera(CameraConfig("door", str(video))) as camera:
            taken: list[int] = []
            seq = 0
            while (frame := camera.latest(seq, timeout=2.0)) is not None:
                seq = frame.seq
                taken.append(read_index(frame.image))
                del frame
                time.sleep(0.1)  # a consumer 10x slower than the camera
            stats = camera.stats()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert taken == sorted(taken) and len(taken) < 30
    assert stats.frames_read == 100
    assert stats.frames_dropped > 50
    assert stats.frames_dropped + len(taken) == 100
    # the slot, the consumer's frame and one being decoded: nowhere near the 100 frames read
    assert peak < 6 * frame_bytes, f"peak {peak / frame_bytes:.1f} frames"


def test_max_fps_skips_frames(tmp_path: Path) -> None:
    video = write_video(tmp_path / "fast.avi", 50, fps=100.0)
    with Camera(CameraConfig("door", str(video), max_fps=20.0)) as camera:
        taken = drain(camera)
        stats = camera.stats()
    assert 7 <= len(taken) <= 14  # 0.5 s at 20 fps
    assert stats.frames_skipped == 50 - len(taken) - stats.frames_dropped


def test_loop_keeps_going(tmp_path: Path) -> None:
    video = write_video(tmp_path / "short.avi", 10)
    with Camera(CameraConfig("door", str(video), loop=True, realtime=False)) as camera:
        frames = [camera.latest(seq, timeout=2.0) for seq in range(35)]
    stats = camera.stats()
    assert [f.seq for f in frames if f] == list(range(1, 36))
    assert [read_index(f.image) for f in frames if f] == [i % 10 for i in range(35)]
    assert stats.state is CameraState.STOPPED
    assert stats.reconnects == 0


def test_loop_restarts_at_the_file_pace(tmp_path: Path) -> None:
    video = write_video(tmp_path / "short.avi", 5, fps=25.0)
    with Camera(CameraConfig("door", str(video), loop=True)) as camera:
        seq, times = 0, []
        while len(times) < 15:
            frame = camera.latest(seq, timeout=2.0)
            assert frame is not None
            seq = frame.seq
            times.append(frame.captured_at)
    gaps = np.diff(times)
    assert gaps.max() < 0.1 and gaps.min() > 0.01  # no burst or stall at the loop points (40 ms period)


# --- reconnection ---------------------------------------------------------------------------------------------------
def test_missing_file_reconnects_with_backoff_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later.avi"
    config = CameraConfig("door", str(path), realtime=False, reconnect_min_s=0.05, reconnect_max_s=0.2)
    with Camera(config) as camera:
        wait_for(lambda: camera.stats().state is CameraState.RECONNECTING)
        assert "no such file" in (camera.stats().last_error or "")
        assert camera.latest(0, timeout=0.3) is None
        write_video(path, 5)
        assert drain(camera) == [0, 1, 2, 3, 4]
        stats = camera.stats()
    assert stats.reconnects == 1
    assert stats.state is CameraState.ENDED


def test_file_removed_then_restored(tmp_path: Path) -> None:
    path = write_video(tmp_path / "door.avi", 10)
    config = CameraConfig("door", str(path), loop=True, realtime=False, reconnect_min_s=0.05, reconnect_max_s=0.2)
    with Camera(config) as camera:
        first = camera.latest(0, timeout=2.0)
        assert first is not None
        path.unlink()  # the open file still plays to its end; reopening it for the next loop fails
        seq = first.seq
        while camera.stats().state is not CameraState.RECONNECTING:
            frame = camera.latest(seq, timeout=0.1)
            seq = frame.seq if frame else seq
        write_video(path, 10)
        frame = camera.latest(seq, timeout=3.0)
        assert frame is not None and frame.seq == seq + 1
        assert read_index(frame.image) == 0
        assert camera.stats().reconnects == 1


def test_stop_during_backoff_returns_at_once(tmp_path: Path) -> None:
    camera = Camera(CameraConfig("door", str(tmp_path / "absent.avi"), reconnect_min_s=10.0, reconnect_max_s=60.0))
    camera.start()
    wait_for(lambda: camera.stats().state is CameraState.RECONNECTING)
    started = time.monotonic()
    camera.stop()
    assert time.monotonic() - started < 1.0
    assert camera.stats().state is CameraState.STOPPED


def test_latest_before_start_is_none_at_once(video: Path) -> None:
    camera = Camera(CameraConfig("door", str(video)))
    started = time.monotonic()
    assert camera.latest(0, timeout=5.0) is None
    assert time.monotonic() - started < 0.5


@pytest.fixture
def mjpeg_server() -> Iterator[MjpegServer]:
    # each frame shows its number, so a test can tell fresh frames from repeated ones
    server = MjpegServer(lambda i: cv2.imencode(".jpg", draw_index(i % 1024))[1].tobytes(), period=0.02)
    server.start()
    yield server
    server.stop()


def test_http_stream_lost_and_back_reconnects(mjpeg_server: MjpegServer) -> None:
    config = CameraConfig("door", mjpeg_server.url, reconnect_min_s=0.05, reconnect_max_s=0.2)
    with Camera(config) as camera:
        first = camera.latest(0, timeout=5.0)
        assert first is not None and first.position_ms is None
        assert camera.stats().state is CameraState.CONNECTED
        mjpeg_server.stop()
        wait_for(lambda: camera.stats().state is CameraState.RECONNECTING)
        assert camera.stats().last_error
        time.sleep(0.3)  # a few refused attempts while the server is down
        assert camera.stats().state is CameraState.RECONNECTING
        seq_before = camera.stats().frames_read
        mjpeg_server.start()  # same port
        wait_for(lambda: camera.stats().frames_read > seq_before + 3)
        frame = camera.latest(first.seq, timeout=2.0)
        assert frame is not None
    stats = camera.stats()
    assert stats.state is CameraState.STOPPED
    assert stats.reconnects >= 1


# --- several cameras ------------------------------------------------------------------------------------------------
def test_camera_set_serves_cameras_round_robin(tmp_path: Path) -> None:
    long = write_video(tmp_path / "long.avi", 12)
    short = write_video(tmp_path / "short.avi", 4)
    configs = [CameraConfig("a", str(long), realtime=False), CameraConfig("b", str(short), realtime=False)]
    with CameraSet(configs) as cameras:
        wait_for(lambda: all(s.frames_read for s in cameras.stats().values()))
        got = []
        while (frame := cameras.next_frame(timeout=2.0)) is not None:
            got.append((frame.camera, read_index(frame.image)))
            time.sleep(0.02)  # slower than decoding: both cameras have a fresh frame at every call until b ends
        stats = cameras.stats()
    # so they alternate: nobody is served twice in a row
    names = [name for name, _ in got[:8]]
    assert all(x != y for x, y in itertools.pairwise(names))
    assert [i for name, i in got if name == "a"] == list(range(12))
    assert [i for name, i in got if name == "b"] == list(range(4))
    assert {s.state for s in stats.values()} == {CameraState.ENDED}


def test_camera_set_does_not_starve_a_slow_camera(tmp_path: Path) -> None:
    fast = write_video(tmp_path / "fast.avi", 60, fps=60.0)
    slow = write_video(tmp_path / "slow.avi", 10, fps=10.0)
    with CameraSet([CameraConfig("fast", str(fast)), CameraConfig("slow", str(slow))]) as cameras:
        got = []
        while (frame := cameras.next_frame(timeout=2.0)) is not None:
            got.append(frame.camera)
            time.sleep(0.03)  # slower than the fast camera, faster than the slow one
    assert got.count("slow") >= 9
    assert got.count("fast") >= 15
