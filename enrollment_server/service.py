"""The long-running server: MQTT ingest, gallery publication and the admin API in one process.

Parts and why they are separate:

- the ingest link: manual acknowledgement (the broker's PUBACK goes out after the commit) and a persistent session
  under a stable client id (`ingest_config`), so the broker keeps edges' events while the server is down or
  restarting; with `mqtt.shared_group` a shared subscription instead (several servers, one site);
- the gallery link: a clean session of its own, so that a gallery publication waiting for PUBACKs never queues
  behind ingest traffic;
- gallery leadership (`enrollment_server.leadership`): one publisher per database. Every change that alters a
  site's gallery publishes a new version at once when this server holds the publisher lease and the broker is
  connected; on a standby server the change is handed to the lease holder. When the broker is not connected the
  change is stored and the publisher's reconnect hook (`republish_on_connect`, run for every site after each
  connect, on the lease holder only) publishes it: the data no longer matches the latest recorded version, so a
  new version goes out. SQLite allows one server per database: a second `serve` refuses to start;
- the web console (/console) on the API's port, with the same token (enrollment_server/console/);
- unknown visitors, when some site opted in (`unknown_visitors.sites`): a clean-session link of their own
  (enrollment_server/visitor_ingest.py), absent otherwise;
- Home Assistant discovery, when `home_assistant.discovery` is on: a clean-session link of its own
  (enrollment_server/home_assistant.py);
- the admin API (FastAPI on uvicorn): uvicorn owns SIGINT / SIGTERM; once it has drained its requests the parts
  are stopped in the order `Ingest.stop` documents (the ingest stores and acknowledges what it took while its
  link is still up, then the links go).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any

from enrollment_server import components as c
from enrollment_server.config import ServerConfig
from enrollment_server.ingest import Ingest, ingest_config
from enrollment_server.leadership import GalleryLeadership, PgAdvisoryLease, lease_for
from models import extras
from models.errors import ConfigError, MqttError
from models.face.encoders import encoder_spec

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
    leadership: GalleryLeadership
    app: Any
    visitor_ingest: Any = None  # with its link, only when some site shares unknown visitors
    visitor_link: Any = None
    home_assistant: Any = None  # with its link, only when Home Assistant discovery is on
    home_assistant_link: Any = None


def start_parts(cfg: ServerConfig) -> ServerParts:
    """Open the store, take or wait for the publisher lease, load the key and models, connect the links
    (asynchronously) and build the API and console. ConfigError / LeaseError when this server may not serve the
    database."""
    from enrollment_server.api import create_app
    from enrollment_server.console.pages import console_pages
    from enrollment_server.console_api import console_views
    from enrollment_server.visitors import Visitors

    token = c.admin_token(cfg)  # fail on a missing token before anything connects
    store = c.open_store(cfg)
    try:
        lease = lease_for(store.url)
        if cfg.mqtt.shared_group and not isinstance(lease, PgAdvisoryLease):
            raise ConfigError(
                "mqtt.shared_group: several servers on one site need PostgreSQL; on SQLite one server is the rule"
            )
        store.ensure_site(cfg.site)
        signer = c.signer_for(cfg, create=True)
        gallery_link = c.make_link(c.mqtt_config(cfg, "gallery"))
        publisher = c.make_publisher(cfg, store, gallery_link, signer)
        leadership = GalleryLeadership(
            publisher, lease, lambda: [s.site_id for s in store.list_sites()], gallery_link.is_connected
        )
        leadership.start()  # a second server on one SQLite file stops here, before loading models or connecting
    except BaseException:
        store.close()
        raise
    try:
        enroller = c.make_enroller(cfg, store)
    except BaseException:
        leadership.stop()
        store.close()
        raise
    # sites are read at each connect, so that sites created through the API are covered after a broker loss
    publisher.republish_on_connect(leadership.sites_to_republish)

    def publish(site: str) -> None:
        if not gallery_link.is_connected():
            raise MqttError(f"broker {cfg.mqtt.url} not connected: the gallery is published when it reconnects")
        published = publisher.publish(site)
        log.info("site %s: gallery v%d published (%d templates)", site, published.version, published.count)

    group = cfg.mqtt.shared_group or None
    ingest_link = c.make_link(
        ingest_config(cfg.mqtt.url, c.client_id(cfg, "ingest"), shared_group=group, **c.link_options(cfg))
    )
    ingest = Ingest(store, ingest_link, shared_group=group)
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
    routers = [
        console_views(
            visitors,
            stale_after_s=cfg.console.stale_after_s,
            default_rule=encoder_spec(cfg.enrollment.encoder).default_decision,
            fingerprint=c.fingerprint(cfg),
        )
    ]
    if cfg.console.enabled:
        routers.append(console_pages(default_site=cfg.site))
    app = create_app(
        store,
        enroller,
        token=token,
        max_upload_bytes=cfg.api.max_upload_mib * 1024 * 1024,
        on_change=lambda site: leadership.on_change(site, publish),
        devices_site=cfg.site,
        health=lambda: _health(gallery_link, ingest_link, ingest, leadership, visitor_ingest),
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
        "enrollment server: site %s, database %s, broker %s%s, signing key id %s",
        cfg.site,
        store.dialect,
        cfg.mqtt.url,
        f" (shared subscription group {group})" if group else "",
        signer.key_id,
    )
    return ServerParts(
        store, ingest, ingest_link, gallery_link, publisher, leadership, app, visitor_ingest, visitor_link, ha, ha_link
    )


def stop_parts(parts: ServerParts) -> bool:
    """Stop in the safe order; True when every event taken off the wire was stored."""
    parts.leadership.stop()
    for link in (parts.home_assistant_link, parts.visitor_link):
        if link is not None:
            link.stop()
    if parts.visitor_ingest is not None:
        parts.visitor_ingest.stop()
    parts.gallery_link.stop()
    clean = parts.ingest.stop(INGEST_STOP_TIMEOUT_S)  # acks and confirmations still need the ingest link
    parts.ingest_link.stop()
    stats = parts.ingest.stats()
    log.info(
        "enrollment server stopped: %d events stored, %d duplicates, %d rejected, %d left with the broker",
        stats.stored,
        stats.duplicates,
        stats.rejected_total,
        stats.deferred + stats.abandoned,
    )
    parts.store.close()
    return clean


def run_server(cfg: ServerConfig) -> int:
    """Serve until SIGINT / SIGTERM; 0 after a clean stop, 1 when taken events were left unstored (the broker
    redelivers them to the next start)."""
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


def _health(
    gallery_link: Any, ingest_link: Any, ingest: Ingest, leadership: GalleryLeadership, visitor_ingest: Any
) -> dict[str, Any]:
    stats = ingest.stats()
    extra = {} if visitor_ingest is None else {"unknown_visitors": visitor_ingest.health()}
    return {
        **extra,
        "mqtt": {"ingest_connected": ingest_link.is_connected(), "gallery_connected": gallery_link.is_connected()},
        "gallery_publisher": {"leader": leadership.is_leader()},
        "ingest": {
            "received": stats.received,
            "stored": stats.stored,
            "duplicates": stats.duplicates,
            "rejected": dict(stats.rejected),
            "queue_depth": stats.queue_depth,
            "confirmed": stats.confirmed,
            "store_retries": stats.store_retries,
        },
    }
