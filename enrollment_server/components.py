"""Build the server's parts from its configuration: store, enroller, signing key, MQTT links, gallery publisher.

Shared by the CLI's one-shot commands and the long-running service, so both see the same database, key,
encoder fingerprint and broker settings.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import TYPE_CHECKING, Any

from enrollment_server.config import ServerConfig
from models.errors import ConfigError, FaceAttendError

if TYPE_CHECKING:
    from enrollment_server.enrollment import Enroller
    from enrollment_server.gallery_publisher import GalleryPublisher
    from enrollment_server.store import Store
    from models.contract.mqtt_link import MqttConfig, MqttLink, PahoMqttLink
    from models.contract.signing import Signer
    from models.face.pipeline import FacePipeline

log = logging.getLogger(__name__)

TOKEN_ENV = "FACEATTEND_ADMIN_TOKEN"


def open_store(cfg: ServerConfig) -> Store:
    from enrollment_server.store import Store

    return Store.open(
        cfg.database.url, keep_photos=cfg.enrollment.keep_photos, busy_timeout_s=cfg.database.busy_timeout_s
    )


def make_pipeline(cfg: ServerConfig) -> FacePipeline:
    """The face pipeline of the server's encoder (enrollment, reencode)."""
    from models.face.pipeline import FacePipeline, PipelineConfig

    e = cfg.enrollment
    return FacePipeline.create(
        PipelineConfig(encoder=e.encoder, accept_licence=e.accept_licence, alignment=e.alignment)
    )


def make_enroller(cfg: ServerConfig, store: Store) -> Enroller:
    from enrollment_server.enrollment import Enroller

    return Enroller(store, make_pipeline(cfg), cfg.enrollment)


def fingerprint(cfg: ServerConfig) -> str:
    from models.face.encoders import encoder_spec
    from models.face.fingerprint import encoder_fingerprint

    return encoder_fingerprint(encoder_spec(cfg.enrollment.encoder), alignment=cfg.enrollment.alignment).value


def signer_for(cfg: ServerConfig, *, create: bool) -> Signer:
    """The gallery signing key; generated (0600, public half beside it) on first use when `create`."""
    from models.contract.signing import Signer

    path = cfg.gallery.signing_key
    if not create:
        if not path.is_file():
            raise FaceAttendError(f"no signing key at {path}: run `enrollment-server init` first")
        return Signer.load(path)
    signer, created = Signer.load_or_create(path)  # atomic: two first starts end with one key
    public = path.with_suffix(".pub.pem")
    if created or not public.is_file():
        # every process writes the same bytes (the public half of the one key on disk), atomically
        signer.save_public(public)
    if created:
        log.warning("generated the gallery signing key %s (public key: %s)", path, public)
    return signer


def tls_options(cfg: ServerConfig) -> dict[str, Any]:
    m = cfg.mqtt
    return {k: v for k, v in (("ca_file", m.ca_file), ("cert_file", m.cert_file), ("key_file", m.key_file)) if v}


def link_options(cfg: ServerConfig) -> dict[str, Any]:
    """TLS files and protocol: what every link of the server shares."""
    return {**tls_options(cfg), "protocol": cfg.mqtt.protocol}


def client_id(cfg: ServerConfig, client_suffix: str) -> str:
    """`{mqtt.client_id}-{suffix}`; with a shared group also this process's host and pid, so that the servers of
    one site never share a client id (the broker would keep kicking one off for the other)."""
    base = f"{cfg.mqtt.client_id}-{client_suffix}"
    if not cfg.mqtt.shared_group:
        return base
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:48] or "host"
    return f"{base}-{host}-{os.getpid()}"


def mqtt_config(cfg: ServerConfig, client_suffix: str, **options: Any) -> MqttConfig:
    from models.contract.mqtt_link import MqttConfig

    return MqttConfig.from_url(cfg.mqtt.url, client_id=client_id(cfg, client_suffix), **link_options(cfg), **options)


def make_link(config: MqttConfig) -> PahoMqttLink:
    from models.contract.mqtt_link import PahoMqttLink

    return PahoMqttLink(config)


def make_publisher(cfg: ServerConfig, store: Store, link: MqttLink, signer: Signer) -> GalleryPublisher:
    from enrollment_server.gallery_publisher import GalleryPublisher
    from models.face.encoders import encoder_spec

    return GalleryPublisher(
        store,
        link,
        signer,
        fingerprint(cfg),
        dtype=cfg.gallery.dtype,
        chunk_size=cfg.gallery.chunk_kib * 1024,
        dim=encoder_spec(cfg.enrollment.encoder).dim,  # an empty gallery's; a non-empty one has its templates'
    )


def admin_token(cfg: ServerConfig) -> str:
    """api.token, else the FACEATTEND_ADMIN_TOKEN environment variable (keeps the secret out of config files)."""
    token = cfg.api.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ConfigError(f"api.token: no admin token configured (set api.token or the {TOKEN_ENV} variable)")
    return token
