"""The long-running server: MQTT ingest, gallery publication and the admin API in one process.

Parts and why they are separate:

- the ingest link: a persistent session under a stable client id (`ingest_config`), so the broker queues edges'
  events while the server is down or restarting;
- the gallery link: a clean session of its own, because the ingest handler may block paho's network thread
  under backpressure, and a gallery publication waiting for PUBACKs behind it would time out;
- the admin API (FastAPI on uvicorn): every change that alters a site's gallery publishes a new version at once
  when the broker is connected. When it is not, the change is stored and the publisher's reconnect hook
  (`republish_on_connect`, run for every site after each connect) publishes it: the data no longer matches the
  latest recorded version, so a new version goes out;
- uvicorn owns SIGINT / SIGTERM; once it has drained its requests the links and the ingest are stopped in the
  order `Ingest.stop` documents (link first, then the worker stores what is queued).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any

from enrollment_server import components as c
from enrollment_server.config import ServerConfig
from enrollment_server.ingest import Ingest, ingest_config
from models.errors import MqttError

log = logging.getLogger(__name__)

INGEST_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerParts:
    """Everything `run_server` starts; tests drive it without uvicorn through `start_parts` / `stop_parts`."""

    store: Any
    ingest: Ingest
    ingest_link: Any
    gallery_link: Any
    publisher: Any
    app: Any


def start_parts(cfg: ServerConfig) -> ServerParts:
    """Open the store, load the key and models, connect both links (asynchronously) and build the API."""
    from enrollment_server.api import create_app

    token = c.admin_token(cfg)  # fail on a missing token before anything connects
    store = c.open_store(cfg)
    store.ensure_site(cfg.site)
    signer = c.signer_for(cfg, create=True)
    enroller = c.make_enroller(cfg, store)

    gallery_link = c.make_link(c.mqtt_config(cfg, "gallery"))
    publisher = c.make_publisher(cfg, store, gallery_link, signer)
    # sites are read at each connect, so that sites created through the API are covered after a broker loss
    publisher.republish_on_connect(lambda: [s.site_id for s in store.list_sites()])

    def on_change(site: str) -> None:
        if not gallery_link.is_connected():
            raise MqttError(f"broker {cfg.mqtt.url} not connected: the gallery is published when it reconnects")
        published = publisher.publish(site)
        log.info("site %s: gallery v%d published (%d templates)", site, published.version, published.count)

    ingest_link = c.make_link(ingest_config(cfg.mqtt.url, f"{cfg.mqtt.client_id}-ingest", **c.tls_options(cfg)))
    ingest = Ingest(store, ingest_link)
    app = create_app(
        store,
        enroller,
        token=token,
        max_upload_bytes=cfg.api.max_upload_mib * 1024 * 1024,
        on_change=on_change,
        devices_site=cfg.site,
        health=lambda: _health(gallery_link, ingest_link, ingest),
    )
    ingest.start()
    ingest_link.start()
    gallery_link.start()
    log.info(
        "enrollment server: site %s, database %s, broker %s, signing key id %s",
        cfg.site,
        store.dialect,
        cfg.mqtt.url,
        signer.key_id,
    )
    return ServerParts(store, ingest, ingest_link, gallery_link, publisher, app)


def stop_parts(parts: ServerParts) -> bool:
    """Stop in the safe order; True when every received event was stored."""
    parts.gallery_link.stop()
    parts.ingest_link.stop()
    clean = parts.ingest.stop(INGEST_STOP_TIMEOUT_S)
    stats = parts.ingest.stats()
    log.info(
        "enrollment server stopped: %d events stored, %d duplicates, %d rejected",
        stats.stored,
        stats.duplicates,
        stats.rejected_total,
    )
    parts.store.close()
    return clean


def run_server(cfg: ServerConfig) -> int:
    """Serve until SIGINT / SIGTERM; 0 after a clean stop, 1 when queued events had to be abandoned."""
    import uvicorn

    # uvicorn handles SIGINT / SIGTERM while it serves, then re-raises the signal under the handlers it found
    # installed: a handler of ours there lets the process live on to stop the links and store queued events
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    parts = start_parts(cfg)
    try:
        server = uvicorn.Server(
            uvicorn.Config(parts.app, host=cfg.api.host, port=cfg.api.port, log_level="info", access_log=False)
        )
        server.run()
    finally:
        clean = stop_parts(parts)
    log.info("enrollment server exiting (signals: %s)", [signal.Signals(s).name for s in received] or "none")
    return 0 if clean else 1


def _health(gallery_link: Any, ingest_link: Any, ingest: Ingest) -> dict[str, Any]:
    stats = ingest.stats()
    return {
        "mqtt": {"ingest_connected": ingest_link.is_connected(), "gallery_connected": gallery_link.is_connected()},
        "ingest": {
            "received": stats.received,
            "stored": stats.stored,
            "duplicates": stats.duplicates,
            "rejected": dict(stats.rejected),
            "queue_depth": stats.queue_depth,
        },
    }
