"""Gallery publication benchmark: from the store to a verified gallery at a subscriber, at the design's size.

    python -m enrollment_server.bench_gallery [--people 10000] [--templates 5] [--broker mqtt://host:port] ...

Loads N people x T synthetic 128-d float32 templates into a fresh database (a temporary SQLite file unless --db
names one), then for each dtype (float32, float16) publishes the site's gallery with `GalleryPublisher` to a
broker (a private Mosquitto on a free local port unless --broker is given) while a subscriber link feeds a
`GalleryAssembler` (signature, sha256 of every chunk and of the blob, fingerprint, blob structure). Figures per
publication:

- build: store read + gallery encode + chunking + signing (`PublishedGallery.build_seconds`);
- publish: first chunk handed to paho until the broker acknowledged every chunk and then the manifest;
- receive+verify: from the manifest's PUBACK until the subscriber holds the verified gallery (the subscriber
  receives chunks while the publisher is still sending, so this is the tail the edge adds after the server is
  done; `verify cpu` is the time spent inside the assembler over the whole run, hashing and decoding);
- total: publish() called until the subscriber holds the verified gallery. Target: under 5 s.

Run 1 of a dtype is a first publication (the subscriber has nothing yet); later runs are updates (new version).
The subscriber fetches as an edge does, the chunks once their manifest is verified, so any size applies. It runs
in this process, on its own paho network thread: on a small machine publisher, broker and subscriber compete for
the same cores, which makes the figures pessimistic.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import logging
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine

from enrollment_server import schema
from enrollment_server.gallery_publisher import GalleryPublisher, PublishedGallery
from enrollment_server.store import Store
from models.contract import limits, topics
from models.contract.assembler import GalleryAssembler
from models.contract.gallery import DTYPES, Gallery
from models.contract.mqtt_link import InboundMessage, MqttConfig, PahoMqttLink
from models.contract.signing import Signer
from models.errors import ConfigError, ContractError, FaceAttendError, MqttError

log = logging.getLogger(__name__)

FINGERPRINT = "bench-encoder-0000000000000000"
TARGET_S = 5.0
DIM = 128
INSERT_PAGE = 5000


@dataclass(frozen=True)
class Run:
    dtype: str
    run: int
    published: PublishedGallery
    receive_verify_s: float
    total_s: float
    verify_cpu_s: float


# --- a private broker ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_mosquitto(binary: str | None = None) -> Iterator[str]:
    """A throw-away Mosquitto on a free local port (no persistence); yields its URL, ends it afterwards."""
    binary = (
        binary
        or shutil.which("mosquitto")
        or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None)
    )
    if binary is None:
        raise ConfigError("no mosquitto binary found: install mosquitto or pass --broker mqtt://host:port")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-mosquitto-") as tmp:
        config = Path(tmp) / "mosquitto.conf"
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            f"max_packet_size {2 * limits.MAX_CHUNK_SIZE}",  # the largest chunk the contract allows, with room
            f"log_dest file {tmp}/mosquitto.log",
            f"user {getpass.getuser()}",  # as root, mosquitto would switch to a user that cannot write tmp
        ]
        config.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10.0
            while True:
                if proc.poll() is not None:
                    raise MqttError(f"mosquitto exited with {proc.returncode} (config {config})")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise MqttError(f"mosquitto did not listen on port {port} within 10 s") from None
                    time.sleep(0.05)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --- data ---------------------------------------------------------------------------------------------------------


def load_synthetic(store: Store, url: str, site: str, people: int, per_person: int, seed: int) -> float:
    """Insert people x per_person random unit-scale embeddings in bulk; returns the seconds it took.

    Store.add_template is one transaction per template (about 1 ms on SQLite with synchronous=FULL: a minute
    for 50,000), so the bench writes the store's own tables with multi-row inserts through SQLAlchemy Core.
    """
    start = time.perf_counter()
    store.ensure_site(site)
    rng = np.random.default_rng(seed)
    vectors = (rng.standard_normal((people * per_person, DIM)) * 0.1).astype("<f4")
    now = datetime.now(timezone.utc)
    engine = create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        with engine.begin() as conn:
            person_rows = [
                {"person_id": f"{site}-p{i:06d}", "site_id": site, "display_name": f"Person {i}", "created": now}
                for i in range(people)
            ]
            for row in person_rows:
                row["updated"] = now
            for i in range(0, len(person_rows), INSERT_PAGE):
                conn.execute(schema.people.insert(), person_rows[i : i + INSERT_PAGE])
            template_rows = [
                {
                    "person_id": f"{site}-p{k // per_person:06d}",
                    "embedding": vectors[k].tobytes(),
                    "dim": DIM,
                    "encoder_fingerprint": FINGERPRINT,
                    "image_sha256": hashlib.sha256(f"{site}:{k}".encode()).hexdigest(),
                    "created": now,
                }
                for k in range(len(vectors))
            ]
            for i in range(0, len(template_rows), INSERT_PAGE):
                conn.execute(schema.templates.insert(), template_rows[i : i + INSERT_PAGE])
    finally:
        engine.dispose()
    return time.perf_counter() - start


# --- the subscriber -----------------------------------------------------------------------------------------------


class Subscriber:
    """An edge's gallery side, as edge_agent.gallery.sync fetches (which the server cannot import): the manifest
    subscribed to, the chunks only while a verified manifest needs them; a GalleryAssembler fed on the link's
    network thread (no queue, so nothing is dropped on the way), completions stamped."""

    def __init__(self, link: PahoMqttLink, signer: Signer, site: str) -> None:
        self._link = link
        self._assembler = GalleryAssembler(signer.verifier, FINGERPRINT, site)
        self._manifest = topics.gallery_manifest(site)
        self._chunks = topics.site_gallery_chunks(site)
        self._fetching = False
        self.done: queue.Queue[tuple[float, Gallery]] = queue.Queue()
        self.errors: list[ContractError] = []
        self.cpu_s = 0.0
        self._lock = threading.Lock()
        link.subscribe(self._manifest, 1, self._feed)
        if not link.wait_subscribed(self._manifest, 10.0):
            raise MqttError(f"the broker did not grant the subscription to {site}'s gallery within 10 s")

    def close(self) -> None:
        self._link.unsubscribe(self._manifest)
        self._link.unsubscribe(self._chunks)

    def _feed(self, msg: InboundMessage) -> None:
        started = time.perf_counter()
        try:
            gallery = self._assembler.feed(msg.topic, msg.payload)
        except ContractError as exc:
            self.errors.append(exc)
            return
        finally:
            with self._lock:
                self.cpu_s += time.perf_counter() - started
            pending = self._assembler.pending is not None
            if pending != self._fetching:  # retained chunks are sent on subscribe: that is the download
                self._fetching = pending
                if pending:
                    self._link.subscribe(self._chunks, 1, self._feed)
                else:
                    self._link.unsubscribe(self._chunks)
        if gallery is not None:
            self.done.put((time.perf_counter(), gallery))

    def take_cpu(self) -> float:
        with self._lock:
            spent, self.cpu_s = self.cpu_s, 0.0
        return spent


# --- the bench ----------------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace, broker_url: str, db_url: str) -> list[Run]:
    signer = Signer.generate()
    runs: list[Run] = []
    store = Store.open(db_url)
    server = PahoMqttLink(MqttConfig.from_url(broker_url, client_id=f"bench-server-{time.time_ns() % 10**9}"))
    edge = PahoMqttLink(MqttConfig.from_url(broker_url, client_id=f"bench-edge-{time.time_ns() % 10**9}"))
    try:
        for link in (server, edge):
            link.start()
            if not link.wait_connected(10.0):
                raise MqttError(f"broker {broker_url} not reachable within 10 s")
        for dtype in args.dtype:
            site = f"bench-{dtype}"
            loaded = load_synthetic(store, db_url, site, args.people, args.templates, seed=args.seed)
            read_start = time.perf_counter()
            count = len(store.site_embeddings(site, FINGERPRINT))
            _emit(
                f"{dtype}: {count} templates of {args.people} people loaded in {loaded:.1f} s; "
                f"store read alone {time.perf_counter() - read_start:.2f} s"
            )
            subscriber = Subscriber(edge, signer, site)
            publisher = GalleryPublisher(
                store, server, signer, FINGERPRINT, dtype=dtype, chunk_size=args.chunk_kib * 1024, ack_timeout_s=120
            )
            for run in range(1, args.runs + 1):
                subscriber.take_cpu()
                called = time.perf_counter()
                published = publisher.publish(site)
                try:
                    verified_at, gallery = subscriber.done.get(timeout=120.0)
                except queue.Empty:
                    raise MqttError(f"no verified gallery at the subscriber: {subscriber.errors}") from None
                if gallery.version != published.version or gallery.count != published.count:
                    raise ContractError(f"subscriber got v{gallery.version} ({gallery.count}), not {published}")
                if subscriber.errors:
                    raise subscriber.errors[0]
                server_done = called + published.build_seconds + published.publish_seconds
                runs.append(
                    Run(
                        dtype=dtype,
                        run=run,
                        published=published,
                        receive_verify_s=max(0.0, verified_at - server_done),
                        total_s=verified_at - called,
                        verify_cpu_s=subscriber.take_cpu(),
                    )
                )
                _emit(_line(runs[-1]))
            subscriber.close()
    finally:
        server.stop()
        edge.stop()
        store.close()
    return runs


def _line(r: Run) -> str:
    p = r.published
    return (
        f"  {r.dtype} run {r.run}: v{p.version} {p.count} templates, {p.blob_size / 2**20:.1f} MiB in {p.chunk_count}"
        f" chunks | build {p.build_seconds:.2f} s | publish {p.publish_seconds:.2f} s | receive+verify"
        f" {r.receive_verify_s:.2f} s (verify cpu {r.verify_cpu_s:.2f} s) | total {r.total_s:.2f} s"
        f" {'ok' if r.total_s < TARGET_S else 'OVER TARGET'}"
    )


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def summary(runs: Sequence[Run]) -> list[str]:
    out = []
    for dtype in dict.fromkeys(r.dtype for r in runs):
        mine = [r for r in runs if r.dtype == dtype]
        med = statistics.median
        out.append(
            f"{dtype}: median of {len(mine)} | build {med(r.published.build_seconds for r in mine):.2f} s | publish"
            f" {med(r.published.publish_seconds for r in mine):.2f} s | receive+verify"
            f" {med(r.receive_verify_s for r in mine):.2f} s | total {med(r.total_s for r in mine):.2f} s"
            f" (worst {max(r.total_s for r in mine):.2f} s, target < {TARGET_S:.0f} s)"
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m enrollment_server.bench_gallery", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--people", type=int, default=10_000)
    parser.add_argument("--templates", type=int, default=5, help="templates per person")
    parser.add_argument("--broker", help="mqtt://host:port (default: a private mosquitto on a free port)")
    parser.add_argument("--mosquitto", help="the mosquitto binary for the private broker (default: from PATH)")
    parser.add_argument("--db", help="SQLite file or postgresql+psycopg:// URL of an EMPTY database (default: temp)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--chunk-kib", type=int, default=limits.DEFAULT_CHUNK_SIZE // 1024)
    parser.add_argument("--runs", type=int, default=3, help="publications per dtype (run 1 is the first one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.people < 1 or args.templates < 1 or args.runs < 1:
        _emit("bench_gallery: --people, --templates and --runs must be >= 1")
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
            db_url = args.db or str(Path(tmp) / "bench.db")
            if args.broker:
                runs = bench(args, args.broker, db_url)
            else:
                with private_mosquitto(args.mosquitto) as url:
                    _emit(f"private broker at {url}")
                    runs = bench(args, url, db_url)
    except FaceAttendError as exc:
        _emit(f"bench_gallery: {exc}")
        return 2
    for line in summary(runs):
        _emit(line)
    return 0 if all(r.total_s < TARGET_S for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
