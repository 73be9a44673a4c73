"""Gallery bench: how fast a published gallery goes into service at an edge, how fast an edge starts from its saved
gallery, and what a query costs, for galleries of a few sizes.

    edge-agent bench-gallery [--templates 5000 50000 200000] [--broker mqtt://host:port] [--no-graph] [--json]

Per size, a synthetic gallery (unit vectors around one centre per person, 5 templates each, 128-d float32) and a
fresh signing key; a real `GallerySync` on its own link, with an empty state directory; a broker (an embedded one
unless --broker names a running Mosquitto, which is what a deployment has and the faster of the two). Figures:

- sign+send: encode, chunk and sign the publication (models.contract.gallery.build_publication) and publish it the
  way the enrollment server does (retained chunks, their PUBACKs, then the retained manifest and its PUBACK). The
  server's own store read comes before this (`python -m enrollment_server.bench_gallery` measures it);
- publish -> in service: from the start of sign+send until the edge's index swap (exact search from then on): the
  edge's share is receiving, verifying, saving and the exact index;
- graph: above `IndexParams.exact_max_templates`, the hnswlib stage built in the background after the swap
  (lower thread priority, one thread), then saved beside the gallery;
- start-up: a new `GallerySync.start()` on the same directory, broker reachable or not: read, verify, exact index
  in service; then `graph load`, the saved graph checked against its sha256 and loaded in the background;
- query p50 / p95: one probe at a time (what a door does), k=2, through `GalleryIndex.search` (stage 1 and the exact
  re-rank), exact and with the hnswlib stage, both once the background build is over (during a build the
  queries share the cores with it).

Targets (issue 14, on a 2-core x86): publish -> in service under 5 s and start-up under 1 s at 50,000 templates.
On a machine shared with other work the figures are pessimistic; run it alone for reference numbers.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_agent.gallery.index import GalleryIndex, IndexHolder, IndexParams
from edge_agent.gallery.sync import GallerySync
from models.contract import limits, topics
from models.contract.gallery import Gallery, GalleryPerson, build_publication
from models.contract.mqtt_link import MqttConfig, MqttLink, PahoMqttLink, PublishHandle
from models.contract.signing import Signer
from models.errors import MqttError

log = logging.getLogger(__name__)

FINGERPRINT = "bench-encoder-0000000000000000"
DEVICE = "bench-door"
DIM = 128
PER_PERSON = 5
TARGET_SERVICE_S = 5.0
TARGET_START_S = 1.0
TARGET_TEMPLATES = 50_000  # the size the targets are set for
WAIT_S = 600.0


@dataclass(frozen=True)
class Row:
    templates: int
    blob_mib: float
    chunks: int
    sign_send_s: float
    in_service_s: float
    graph_s: float | None  # None: exact only (small gallery) or --no-graph
    start_s: float
    graph_load_s: float | None
    exact_p50_ms: float
    exact_p95_ms: float
    graph_p50_ms: float | None
    graph_p95_ms: float | None

    @property
    def within_targets(self) -> bool:
        if self.templates > TARGET_TEMPLATES:
            return True  # no target set beyond 50k: reported only
        return self.in_service_s < TARGET_SERVICE_S and self.start_s < TARGET_START_S


def synthetic_gallery(site: str, templates: int, seed: int = 0) -> Gallery:
    """Unit vectors: people around a shared mean direction (about 1.0 apart), templates about 0.45 from theirs."""
    rng = np.random.default_rng(seed)
    people = max(1, templates // PER_PERSON)
    mean = rng.standard_normal(DIM)
    centres = mean / np.linalg.norm(mean) + rng.standard_normal((people, DIM)) / np.sqrt(DIM)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.arange(templates) % people
    vectors = centres[labels] + 0.35 * rng.standard_normal((templates, DIM)) / np.sqrt(DIM)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    persons = tuple(GalleryPerson(f"p{i:06d}", f"Person {i}") for i in range(people))
    return Gallery(site, 1, FINGERPRINT, "euclidean", "float32", vectors.astype(np.float32), labels, persons)


def publish(link: MqttLink, site: str, chunks: Sequence[bytes], manifest: bytes) -> None:
    """The enrollment server's wire order (enrollment_server.gallery_publisher, which an edge cannot import):
    every chunk retained and acknowledged before the retained manifest."""

    def settle(handles: list[PublishHandle]) -> None:
        for handle in handles:
            if not handle.wait(WAIT_S) or handle.rejected:
                raise MqttError(f"the broker did not take the publication of site {site}")

    settle([link.publish(topics.gallery_blob(site, i), c, qos=1, retain=True) for i, c in enumerate(chunks)])
    settle([link.publish(topics.gallery_manifest(site), manifest, qos=1, retain=True)])


def query_latency(index: GalleryIndex, probes: np.ndarray) -> tuple[float, float]:
    """p50 and p95 in ms of one probe at a time, after a warm-up."""
    for p in probes[:20]:
        index.search(p, k=2)
    times = []
    for p in probes:
        started = time.perf_counter()
        index.search(p, k=2)
        times.append((time.perf_counter() - started) * 1000.0)
    q = statistics.quantiles(times, n=20)
    return statistics.median(times), q[18]


def bench_one(broker_url: str, workdir: Path, templates: int, *, graph: bool, queries: int, chunk_size: int) -> Row:
    site = f"bench-{templates}-{secrets.token_hex(3)}"  # its own topics on a shared broker
    chunk_count = 0
    params = IndexParams() if graph else IndexParams(exact_max_templates=10**12)
    gallery = synthetic_gallery(site, templates)
    rng = np.random.default_rng(1)
    picks = rng.integers(0, templates, queries)
    probes = gallery.embeddings[picks] + 0.3 * rng.standard_normal((queries, DIM)).astype(np.float32) / np.sqrt(DIM)
    signer = Signer.generate()
    state = workdir / site
    server = PahoMqttLink(MqttConfig.from_url(broker_url, client_id=f"{site}-server"))
    edge = PahoMqttLink(MqttConfig.from_url(broker_url, client_id=f"{site}-edge"))
    links = [server, edge]
    syncs: list[GallerySync] = []
    try:
        for link in links:
            link.start()
            if not link.wait_connected(10.0):
                raise MqttError(f"broker {broker_url} not reachable within 10 s")
        applied: queue.Queue[GalleryIndex] = queue.Queue()
        holder = IndexHolder()
        sync = GallerySync(edge, site, DEVICE, signer.verifier, FINGERPRINT, holder, state, applied.put, params=params)
        syncs.append(sync)
        sync.start()
        if not edge.wait_subscribed(topics.gallery_manifest(site), 10.0):
            raise MqttError("the broker did not grant the edge's subscription within 10 s")

        started = time.perf_counter()
        manifest, chunks = build_publication(gallery, signer, chunk_size)
        chunk_count = len(chunks)
        publish(server, site, chunks, manifest.to_json())
        sent = time.perf_counter()
        index = applied.get(timeout=WAIT_S)
        in_service = time.perf_counter()
        graph_s = graph_p50 = graph_p95 = None
        if templates > params.exact_max_templates:
            sync.wait_search_ready(WAIT_S)
            graph_s = time.perf_counter() - in_service
            current = holder.current
            if current is not None and not current.exact:
                graph_p50, graph_p95 = query_latency(current, probes)
        # measured once the background build is over, like the graph's: queries during a build share the cores
        exact_p50, exact_p95 = query_latency(index, probes)
        sync.stop(30.0)

        # start-up: a restart on the same state directory
        restarted_holder = IndexHolder()
        restart = GallerySync(edge, site, DEVICE, signer.verifier, FINGERPRINT, restarted_holder, state, params=params)
        syncs.append(restart)
        restart_started = time.perf_counter()
        restart.start()
        start_s = time.perf_counter() - restart_started
        if restarted_holder.current is None:
            raise MqttError("the restarted edge did not serve its saved gallery")
        graph_load_s = None
        if graph_s is not None:
            restart.wait_search_ready(WAIT_S)
            graph_load_s = time.perf_counter() - restart_started - start_s
        return Row(
            templates=templates,
            blob_mib=manifest.blob_size / limits.MIB,
            chunks=manifest.chunk_count,
            sign_send_s=sent - started,
            in_service_s=in_service - started,
            graph_s=graph_s,
            start_s=start_s,
            graph_load_s=graph_load_s,
            exact_p50_ms=exact_p50,
            exact_p95_ms=exact_p95,
            graph_p50_ms=graph_p50,
            graph_p95_ms=graph_p95,
        )
    finally:
        for s in syncs:
            s.stop(30.0)
        _clear(server, site, chunk_count)
        for link in links:
            link.stop()
        shutil.rmtree(state, ignore_errors=True)


def _clear(link: MqttLink, site: str, chunk_count: int) -> None:
    """Leave nothing retained on the broker (it may be a shared one): an empty retained payload clears a topic."""
    if not link.is_connected():
        return
    topics_to_clear = [topics.gallery_manifest(site), *(topics.gallery_blob(site, i) for i in range(chunk_count))]
    handles = [link.publish(t, b"", qos=1, retain=True) for t in topics_to_clear]
    if not all(h.wait(30.0) for h in handles):
        log.warning("bench-gallery: the retained gallery of site %s may not be cleared", site)


def describe(rows: Sequence[Row]) -> str:
    def f(value: float | None, fmt: str = ".2f") -> str:
        return "-" if value is None else format(value, fmt)

    head = (
        f"{'templates':>9} {'blob MiB':>8} {'chunks':>6} {'sign+send s':>11} {'->in service s':>14} "
        f"{'graph s':>7} {'start-up s':>10} {'graph load s':>12} {'exact p50/p95 ms':>16} {'hnswlib p50/p95 ms':>18}"
    )
    lines = [head]
    for r in rows:
        exact = f"{r.exact_p50_ms:.2f}/{r.exact_p95_ms:.2f}"
        ann = "-" if r.graph_p50_ms is None else f"{r.graph_p50_ms:.2f}/{f(r.graph_p95_ms)}"
        lines.append(
            f"{r.templates:>9} {r.blob_mib:>8.1f} {r.chunks:>6} {r.sign_send_s:>11.2f} {r.in_service_s:>14.2f} "
            f"{f(r.graph_s, '.1f'):>7} {r.start_s:>10.2f} {f(r.graph_load_s):>12} {exact:>16} {ann:>18}"
            + ("" if r.within_targets else "  OVER TARGET")
        )
    lines.append(
        f"targets at {TARGET_TEMPLATES} templates: publish -> in service < {TARGET_SERVICE_S:.0f} s, start-up < "
        f"{TARGET_START_S:.0f} s (the graph is built and loaded in the background: exact search serves meanwhile)"
    )
    return "\n".join(lines)


def run(
    sizes: Sequence[int],
    *,
    broker: str | None = None,
    graph: bool = True,
    queries: int = 500,
    chunk_size: int = limits.DEFAULT_CHUNK_SIZE,
    progress: bool = True,
) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
        embedded = None
        if broker is None:
            from edge_agent.devtools.embedded_broker import EmbeddedBroker

            embedded = EmbeddedBroker()
            broker = embedded.start()
        try:
            for templates in sizes:
                rows.append(
                    bench_one(broker, Path(tmp), templates, graph=graph, queries=queries, chunk_size=chunk_size)
                )
                if progress:
                    sys.stderr.write(f"bench-gallery: {templates} templates done\n")
        finally:
            if embedded is not None:
                embedded.stop()
    return rows


def to_json(rows: Sequence[Row]) -> list[dict]:
    return [asdict(r) | {"within_targets": r.within_targets} for r in rows]
