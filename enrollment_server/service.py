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
- the web console (/console) on the API's port, with the same token (enrollment_server/console/);
- unknown visitors, when some site opted in (`unknown_visitors.sites`): a clean-session link of their own
  (enrollment_server/visitor_ingest.py), absent otherwise;
- Home Assistant discovery, when `home_assistant.discovery` is on: a clean-session link of its own
  (enrollment_server/home_assistant.py);
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
from models import extras
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
    visitor_ingest: Any = None  # with its link, only when some site shares unknown visitors
    visitor_link: Any = None
    home_assistant: Any = None  # with its link, only when Home Assistant discovery is on
    home_assistant_link: Any = None


def start_parts(cfg: ServerConfig) -> ServerParts:
    """Open the store, load the key and models, connect the links (asynchronously) and build the API and console."""
    from enrollment_server.api import create_app
    from enrollment_server.console.pages import console_pages
    from enrollment_server.console_api import console_views
    from enrollment_server.visitors import Visitors

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
    visitors = Visitors(store, cfg.unknown_visitors, enroller)
    visitor_link = visitor_ingest = None
    if cfg.unknown_visitors.sites:
        from enrollment_server.visitor_ingest import VisitorIngest

        visitor_link = c.make_link(c.mqtt_config(cfg, "visitors"))
        visitor_ingest = VisitorIngest(store, visitor_link, visitors)
    else:
        visitors.purge()  # the feature is off: nothing stored earlier stays
    ha_link = ha = None
    if cfg.home_assistant.discovery:
        from enrollment_server.home_assistant import HomeAssistantDiscovery

        ha_link = c.make_link(c.mqtt_config(cfg, "ha"))
        ha = HomeAssistantDiscovery(ha_link, cfg.home_assistant, extras.distribution_version())
    routers = [console_views(visitors, stale_after_s=cfg.console.stale_after_s)]
    if cfg.console.enabled:
        routers.append(console_pages(default_site=cfg.site))
    app = create_app(
        store,
        enroller,
        token=token,
        max_upload_bytes=cfg.api.max_upload_mib * 1024 * 1024,
        on_change=on_change,
        devices_site=cfg.site,
        health=lambda: _health(gallery_link, ingest_link, ingest, visitor_ingest),
        session_ttl_s=cfg.console.session_hours * 3600.0,
        routers=routers,
    )
    ingest.start()
    ingest_link.start()
    gallery_link.start()
    for part, link in ((visitor_ingest, visitor_link), (ha, ha_link)):
        if part is not None:
            part.start()
            link.start()
    log.info(
        "enrollment server: site %s, database %s, broker %s, signing key id %s",
        cfg.site,
        store.dialect,
        cfg.mqtt.url,
        signer.key_id,
    )
    return ServerParts(
        store, ingest, ingest_link, gallery_link, publisher, app, visitor_ingest, visitor_link, ha, ha_link
    )


def stop_parts(parts: ServerParts) -> bool:
    """Stop in the safe order; True when every received event was stored."""
    for link in (parts.home_assistant_link, parts.visitor_link):
        if link is not None:
            link.stop()
    if parts.visitor_ingest is not None:
        parts.visitor_ingest.stop()
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


def _health(gallery_link: Any, ingest_link: Any, ingest: Ingest, visitor_ingest: Any) -> dict[str, Any]:
    stats = ingest.stats()
    extra = {} if visitor_ingest is None else {"unknown_visitors": visitor_ingest.health()}
    return {
        **extra,
        "mqtt": {"ingest_connected": ingest_link.is_connected(), "gallery_connected": gallery_link.is_connected()},
        "ingest": {
            "received": stats.received,
            "stored": stats.stored,
            "duplicates": stats.duplicates,
            "rejected": dict(stats.rejected),
            "queue_depth": stats.queue_depth,
        },
    }
