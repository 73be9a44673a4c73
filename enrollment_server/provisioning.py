"""Broker credentials and device bundles: `enrollment-server provision-device`, `broker-user`, `revoke-broker-user`.

The broker (deploy/mosquitto/mosquitto.conf) authenticates edges and consumers with a Mosquitto password file and
authorises them with an ACL file, both in one directory (`--broker-auth`, the broker's /mosquitto/auth). These
commands are the only writers of those files' managed parts:

- `passwords`: one `username:$7$...` line per user (Mosquitto 2's PBKDF2-SHA512 format, written here so that
  the server's container needs no mosquitto_passwd). Passwords are random (192 bits) and never logged.
- `acl`: the shipped deploy/mosquitto/acl (the enrollment server's rights) followed by one block per device or
  consumer between `# BEGIN faceattend KIND NAME` and `# END faceattend KIND NAME` lines. A device may publish
  only under `faceattend/v1/edge/{device}/` (its events, status, gallery acks, stylised snapshots and, where its
  site shares them, unknown visitors' faces) and read only its own site's gallery and the server's confirmations
  of its own events (`faceattend/v1/device/{device}/stored`); a consumer may only read events, statuses and
  stylised snapshots, never unknown visitors' faces; a Home Assistant consumer (`--home-assistant`) also reads the
  discovery configs under its prefix and publishes its birth and will message there. Provisioning a device again
  rewrites its block to the current rules (how a device provisioned before contract 1.1 gets the confirmations'
  read rule). Users named outside the blocks (the server's `enrollment-server`) are never touched, and no device or
  consumer can take their name.

`provision-device` also records the device's site in the server's database (`Store.register_device`): the
ingest files the device's events under that site only, whatever their payload says.

Every change happens under an exclusive lock on `<auth dir>/.provision.lock`; each file is replaced atomically
(readers see the old or the new file, never a torn one), keeping its mode and owner. The broker reads the files
at start and on SIGHUP: the commands say so but do not signal it.

Idempotent. Provisioning a device again with the same arguments rewrites the same files: its password is kept
when the bundle from the last run still holds it (checked against the stored hash), a new one is issued only
with `--rotate-password` (then the device needs the new bundle). A user with no stored hash (revoked, or new)
always gets a new password, even when an old bundle still holds one: a revoked door must stay out. Changing the
site rewrites the device's ACL block; a device moved to another site reads only the new site's gallery.

This module must not import edge_agent (the two deployables never import each other): the edge config it writes
is plain YAML, checked against `edge_agent.config.load_config` by tests/integration/test_deploy_provisioning.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from enrollment_server.config import ServerConfig
from models.contract import topics
from models.contract.mqtt_link import MqttConfig
from models.errors import ConfigError, FaceAttendError

PASSWORDS_FILE = "passwords"
ACL_FILE = "acl"
LOCK_FILE = ".provision.lock"
SERVER_USERNAME = "enrollment-server"  # the CN of the server's client certificate (deploy/mosquitto/acl)
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's own choice; the passwords are random, so cost adds nothing
PASSWORD_BYTES = 24  # 192 random bits, base64url: 32 characters
AUTH_FILE_MODE = 0o640  # the broker reads them through its group (deploy/central/init-site.sh sets the owner)

# Bundle files: what a device needs, with paths relative to its edge.yaml (the agent resolves them so).
BUNDLE_CONFIG = "edge.yaml"
BUNDLE_PASSWORD = "mqtt.password"
BUNDLE_CA = "ca.crt"
BUNDLE_PUBLIC_KEY = "gallery-signing.pub.pem"
BUNDLE_INSTRUCTIONS = "INSTALL.txt"
DEVICE_CONFIG_DIR = "/etc/faceattend"  # where deploy/jetson/install.sh puts the bundle
DEVICE_STATE_DIR = "/var/lib/faceattend"

ENV_BROKER_AUTH = "FACEATTEND_BROKER_AUTH"
ENV_PROVISION_OUT = "FACEATTEND_PROVISION_OUT"
ENV_BROKER_URL = "FACEATTEND_BROKER_PUBLIC_URL"
# where --out is seen from the host, for the instructions (compose: the server writes inside its container)
ENV_PROVISION_HOST_OUT = "FACEATTEND_PROVISION_HOST_OUT"

RELOAD_HINT = (
    "reload the broker so that it reads the new files: `docker compose kill -s SIGHUP mosquitto` "
    "(a broker outside compose: `kill -HUP <pid>` or `systemctl reload mosquitto`)"
)

_BEGIN = re.compile(r"# BEGIN faceattend (device|consumer) (\S+)(.*)")
_END = "# END faceattend {kind} {name}"
_USER_LINE = re.compile(r"\s*user\s+(\S.*?)\s*")


class ProvisioningError(FaceAttendError):
    """The broker's files or a bundle cannot be changed as asked (name taken, lost password, broken file)."""


# ---- Mosquitto password hashes --------------------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2's `$7$` format: `$7$<iterations>$<base64 12-byte salt>$<base64 PBKDF2-HMAC-SHA512>`."""
    if not password or "\n" in password:
        raise ConfigError("a broker password must be non-empty and on one line")
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """True when `password` matches a `$7$` (PBKDF2-SHA512) or `$6$` (salted SHA512, Mosquitto 1.x) hash."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
        elif len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode("utf-8") + salt).digest()
        else:
            return False
    except ValueError:  # bad base64 or iteration count: not a hash we can check
        return False
    return hmac.compare_digest(got, want)


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def _ident(value: str, what: str) -> str:
    """A device / site / user name: the contract's id rules (it becomes a topic level and a broker username)."""
    try:
        return topics.validate_id(value, what)
    except FaceAttendError as exc:
        raise ConfigError(str(exc)) from None


# ---- ACL blocks -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AclBlock:
    kind: str  # "device" or "consumer"
    name: str  # the broker username
    site: str | None  # devices only
    rules: tuple[str, ...]  # `topic ...` lines

    def render(self) -> list[str]:
        head = f"# BEGIN faceattend {self.kind} {self.name}" + (f" site={self.site}" if self.site else "")
        return [head, f"user {self.name}", *self.rules, _END.format(kind=self.kind, name=self.name)]


def device_acl(device: str, site: str) -> AclBlock:
    """Publish only its own edge topics (events, status and its last will, gallery acks); read only its site's
    gallery (manifest and chunks) and the server's confirmations of its own events."""
    device = _ident(device, "device")
    site = _ident(site, "site")
    return AclBlock(
        "device",
        device,
        site,
        (
            f"topic write {topics.ROOT}/edge/{device}/#",
            f"topic read {topics.site_gallery_filter(site)}",
            f"topic read {topics.events_stored(device)}",
        ),
    )


CONSUMER_READS = (topics.ALL_EDGE_EVENTS, topics.ALL_EDGE_STATUS, topics.ALL_EDGE_STYLIZED)
HOME_ASSISTANT_PREFIX = "homeassistant"  # Home Assistant's default discovery prefix

# The enrollment server's rights, as deploy/mosquitto/acl ships them (tests/unit/test_deploy_broker_auth.py keeps
# the two in step): it publishes galleries and Home Assistant discovery, reads what every edge sends the server, and
# Home Assistant's birth message.
SERVER_RULES = (
    f"topic write {topics.ROOT}/site/+/gallery/#",
    f"topic write {topics.ALL_EVENTS_STORED}",
    *(f"topic read {f}" for f in topics.SERVER_FILTERS),
    f"topic read {topics.ALL_EDGE_UNKNOWN}",
    f"topic write {HOME_ASSISTANT_PREFIX}/#",
    f"topic read {HOME_ASSISTANT_PREFIX}/status",
)


def consumer_acl(username: str, *, home_assistant_prefix: str | None = None) -> AclBlock:
    """Read-only: every edge's events, statuses and stylised snapshots (never unknown visitors' faces); no gallery,
    nothing to publish. With `home_assistant_prefix` (a Home Assistant instance): also the discovery configs under
    that prefix, and its own birth / will message `<prefix>/status`."""
    username = _ident(username, "username")
    rules = [f"topic read {f}" for f in CONSUMER_READS]
    if home_assistant_prefix is not None:
        prefix = _ident(home_assistant_prefix, "home assistant prefix")
        rules += [f"topic read {prefix}/#", f"topic write {prefix}/status"]
    return AclBlock("consumer", username, None, tuple(rules))


def _parse_acl(text: str, path: Path) -> list[str | AclBlock]:
    """Free lines (kept verbatim) and managed blocks, in file order."""
    parts: list[str | AclBlock] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _BEGIN.fullmatch(lines[i].rstrip())
        if not m:
            parts.append(lines[i])
            i += 1
            continue
        kind, name, rest = m.group(1), m.group(2), m.group(3).strip()
        site = rest[len("site=") :] if rest.startswith("site=") else None
        end = _END.format(kind=kind, name=name)
        try:
            j = next(k for k in range(i + 1, len(lines)) if lines[k].rstrip() == end)
        except StopIteration:
            raise ProvisioningError(
                f"{path}:{i + 1}: block {kind} {name!r} has no {end!r} line; fix the file"
            ) from None
        body = [ln.strip() for ln in lines[i + 1 : j] if ln.strip() and not ln.lstrip().startswith("#")]
        if not body or body[0] != f"user {name}":
            raise ProvisioningError(f"{path}:{i + 2}: block {kind} {name!r} must start with 'user {name}'")
        parts.append(AclBlock(kind, name, site, tuple(body[1:])))
        i = j + 1
    return parts


def _render_acl(parts: Sequence[str | AclBlock]) -> str:
    out: list[str] = []
    for part in parts:
        for line in part.render() if isinstance(part, AclBlock) else [part]:
            if not (line == "" and out and out[-1] == ""):  # a removed block leaves one blank line, not two
                out.append(line)
    return "\n".join(out).rstrip("\n") + "\n"


def _password_text(lines: Sequence[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


# ---- the broker's auth directory ------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` at once, keeping the mode and owner of the file it replaces (`mode` for a new file)."""
    try:
        st = path.stat()
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        owner = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(fh.fileno(), *owner)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Credential:
    username: str
    password: str  # the cleartext: for the bundle / the operator, never for a log
    status: str  # "created", "kept" or "rotated"


class BrokerAuth:
    """The broker's `passwords` and `acl` files in one directory."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self.passwords = self.dir / PASSWORDS_FILE
        self.acl = self.dir / ACL_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if not self.dir.is_dir():
            raise ProvisioningError(f"broker auth directory {self.dir} does not exist")
        with open(self.dir / LOCK_FILE, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- reading (callers hold the lock) --

    def _read_passwords(self) -> list[str]:
        try:
            return self.passwords.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def _read_acl(self) -> list[str | AclBlock]:
        try:
            text = self.acl.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProvisioningError(
                f"no ACL file at {self.acl}: copy deploy/mosquitto/acl there first (it grants the enrollment "
                "server its rights)"
            ) from None
        return _parse_acl(text, self.acl)

    @staticmethod
    def _hashes(lines: Sequence[str]) -> dict[str, str]:
        found = {}
        for line in lines:
            if line.strip() and not line.startswith("#") and ":" in line:
                user, _, hashed = line.partition(":")
                found[user] = hashed.strip()
        return found

    @staticmethod
    def _unmanaged_users(parts: Sequence[str | AclBlock]) -> set[str]:
        users = set()
        for part in parts:
            if isinstance(part, str) and not part.lstrip().startswith("#"):
                m = _USER_LINE.fullmatch(part)
                if m:
                    users.add(m.group(1))
        return users

    def blocks(self) -> list[AclBlock]:
        with self.locked():
            return [p for p in self._read_acl() if isinstance(p, AclBlock)]

    # -- changing --

    def upsert(self, block: AclBlock, *, known_password: str | None = None, rotate: bool = False) -> Credential:
        """Create or update a device / consumer: its password line and its ACL block.

        The password is kept when `known_password` (from the last bundle) matches the stored hash; a user that
        exists without it needs `rotate` (a new password, which the client must then get)."""
        name = block.name
        with self.locked():
            parts = self._read_acl()
            lines = self._read_passwords()
            if name in self._unmanaged_users(parts) or name == SERVER_USERNAME:
                raise ProvisioningError(f"{name!r} is a broker user not managed by these commands; choose another name")
            current = next((p for p in parts if isinstance(p, AclBlock) and p.name == name), None)
            if current is not None and current.kind != block.kind:
                raise ProvisioningError(f"{name!r} is already a {current.kind}, not a {block.kind}")
            stored = self._hashes(lines).get(name)
            if stored is not None and current is None:
                raise ProvisioningError(
                    f"{name!r} is in {self.passwords} but has no faceattend ACL block: a user added by hand; "
                    "remove it there first or choose another name"
                )
            if stored is None:
                # never the bundle's old password: a user without a hash was revoked (or never existed), and a
                # revoked device's copy of its bundle must not log in again once its replacement is provisioned
                password, status = new_password(), "created"
            elif rotate:
                password, status = new_password(), "rotated"
            elif known_password is not None and check_password(known_password, stored):
                password, status = known_password, "kept"
            else:
                raise ProvisioningError(
                    f"{block.kind} {name!r} exists and its password is not at hand (no matching earlier bundle); "
                    "pass --rotate-password to issue a new one (the old one stops working at the broker's reload)"
                )
            if status != "kept":
                entry = f"{name}:{hash_password(password)}"
                idx = next((i for i, ln in enumerate(lines) if ln.partition(":")[0] == name), None)
                if idx is None:
                    lines.append(entry)
                else:
                    lines[idx] = entry
                _write_atomic(self.passwords, _password_text(lines), AUTH_FILE_MODE)
            if current is None:
                while parts and parts[-1] == "":
                    parts.pop()
                parts = [*parts, "", block]
            else:
                parts = [block if p is current else p for p in parts]
            if current != block:
                _write_atomic(self.acl, _render_acl(parts).encode(), AUTH_FILE_MODE)
            return Credential(name, password, status)

    def revoke(self, username: str) -> bool:
        """Remove a device / consumer: its password line and its ACL block. False when it was not there."""
        with self.locked():
            parts = self._read_acl()
            lines = self._read_passwords()
            if username in self._unmanaged_users(parts) or username == SERVER_USERNAME:
                raise ProvisioningError(f"{username!r} is not managed by these commands")
            kept_parts = [p for p in parts if not (isinstance(p, AclBlock) and p.name == username)]
            kept_lines = [ln for ln in lines if ln.partition(":")[0] != username]
            if len(kept_parts) == len(parts) and len(kept_lines) == len(lines):
                return False
            _write_atomic(self.passwords, _password_text(kept_lines), AUTH_FILE_MODE)
            _write_atomic(self.acl, _render_acl(kept_parts).encode(), AUTH_FILE_MODE)
            return True


# ---- device bundles -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    device: str
    site: str
    bundle: Path
    broker_url: str  # with the username, never the password
    password_status: str
    key_id: str
    instructions: str


def edge_broker_url(broker_url: str, username: str) -> str:
    """The edges' broker URL (mqtts only, no credentials in it) with `username` put in."""
    cfg = MqttConfig.from_url(broker_url)  # checks scheme, host, port
    if not cfg.tls:
        raise ConfigError(f"--broker-url {broker_url!r}: the broker only listens with TLS, use mqtts://")
    if cfg.username is not None or cfg.password is not None:
        raise ConfigError("--broker-url: give the broker's address only; the credentials are made here")
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"mqtts://{username}@{host}:{cfg.port}"


def _camera_list(cameras: Sequence[str]) -> list[tuple[str, str]]:
    result = []
    for spec in cameras:
        name, sep, source = spec.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ConfigError(f"--camera {spec!r}: expected NAME=SOURCE (e.g. door=/dev/video0)")
        result.append((name.strip(), source.strip()))
    return result


def render_edge_config(
    *,
    device: str,
    site: str,
    broker_url: str,
    cameras: Sequence[tuple[str, str]],
    backend: str,
    encoder: str,
    accept_licence: str,
    alignment: str,
    state_dir: str,
) -> str:
    """The device's edge_agent config (see edge_agent/config.py). Strings are written as JSON strings, which are
    valid YAML scalars whatever they hold."""
    q = json.dumps
    camera_lines = []
    for name, source in cameras:
        camera_lines += [f"  - name: {q(name)}", f"    source: {q(source)}"]
    stamp = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return "\n".join(
        [
            f"# faceattend edge agent: device {device}, site {site}.",
            f"# Written by `enrollment-server provision-device` ({stamp}). Install it with the files beside it",
            f"# ({DEVICE_CONFIG_DIR} on the device): relative paths below are taken relative to this file's folder.",
            "# Check it on the device with `edge-agent check-config edge.yaml`.",
            f"device_id: {q(device)}",
            f"site: {q(site)}",
            f"state_dir: {q(state_dir)}  # outbox, last good gallery, snapshots",
            "mqtt:",
            f"  url: {q(broker_url)}  # the username is the device id; the broker forces it as client id",
            f"  password_file: {BUNDLE_PASSWORD}",
            f"  ca_file: {BUNDLE_CA}",
            '  protocol: "5"  # a publish the ACL refuses is then refused out loud and stays in the outbox',
            "gallery:",
            f"  public_key: {BUNDLE_PUBLIC_KEY}  # the enrollment server's gallery signing key (public half)",
            "models:",
            f"  backend: {q(backend)}",
            f"  encoder: {q(encoder)}  # = the server's enrollment.encoder: encoder fingerprints must agree",
            *(
                [f"  accept_licence: {q(accept_licence)}  # = the server's: see the encoder's licence"]
                if accept_licence
                else []
            ),
            f"  alignment: {q(alignment)}  # = the server's enrollment.alignment",
            "cameras:  # V4L2 device, RTSP URL or GStreamer pipeline",
            *camera_lines,
            "",
        ]
    )


def _read_known_password(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def _public_key_pem(cfg: ServerConfig, given: Path | None) -> tuple[str, str]:
    """(PEM, key id) of the gallery signing key's public half."""
    from models.contract.signing import Verifier

    if given is not None:
        verifier = Verifier.from_pem_file(given)
    else:
        pub = cfg.gallery.signing_key.with_suffix(".pub.pem")
        if pub.is_file():
            verifier = Verifier.from_pem_file(pub)
        else:
            from enrollment_server.components import signer_for

            verifier = signer_for(cfg, create=False).verifier
    return verifier.public_pem(), verifier.key_id


def _check_ca(path: Path) -> bytes:
    from cryptography import x509

    try:
        data = path.read_bytes()
        x509.load_pem_x509_certificates(data)
    except OSError as exc:
        raise ConfigError(f"cannot read the CA certificate {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate: {exc}") from exc
    return data


def provision_device(
    cfg: ServerConfig,
    *,
    auth_dir: Path,
    out_dir: Path,
    site: str,
    device: str,
    broker_url: str,
    ca_file: Path,
    public_key: Path | None = None,
    cameras: Sequence[str] = ("door=/dev/video0",),
    backend: str = "tensorrt",
    state_dir: str = DEVICE_STATE_DIR,
    rotate: bool = False,
    shown_out_dir: Path | None = None,
) -> Provisioned:
    """Broker credentials + ACL block for `device`, and its bundle in `out_dir/<device>/` (named in the
    instructions as `shown_out_dir/<device>/` when given: the same folder as the operator sees it)."""
    device = _ident(device, "device")
    site = _ident(site, "site")
    url = edge_broker_url(broker_url, device)
    camera_list = _camera_list(cameras)
    ca = _check_ca(ca_file)
    pem, key_id = _public_key_pem(cfg, public_key)
    bundle = out_dir / device

    cred = BrokerAuth(auth_dir).upsert(
        device_acl(device, site), known_password=_read_known_password(bundle / BUNDLE_PASSWORD), rotate=rotate
    )
    _register(cfg, device, site)
    bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(bundle, 0o700)
    _write_atomic(bundle / BUNDLE_PASSWORD, (cred.password + "\n").encode(), 0o600)
    _write_atomic(bundle / BUNDLE_CA, ca, 0o644)
    _write_atomic(bundle / BUNDLE_PUBLIC_KEY, pem.encode(), 0o644)
    config = render_edge_config(
        device=device,
        site=site,
        broker_url=url,
        cameras=camera_list,
        backend=backend,
        encoder=cfg.enrollment.encoder,
        accept_licence=cfg.enrollment.accept_licence,
        alignment=cfg.enrollment.alignment,
        state_dir=state_dir,
    )
    config_path = bundle / BUNDLE_CONFIG
    if config_path.is_file():
        old = config_path.read_text(encoding="utf-8")
        # the timestamp line aside, an unchanged config is left alone; a changed one is kept as .bak
        if _without_stamp(old) != _without_stamp(config):
            _write_atomic(bundle / (BUNDLE_CONFIG + ".bak"), old.encode(), 0o640)
            _write_atomic(config_path, config.encode(), 0o640)
    else:
        _write_atomic(config_path, config.encode(), 0o640)
    instructions = _instructions(device, site, (shown_out_dir or out_dir) / device, url, cred.status, key_id)
    _write_atomic(bundle / BUNDLE_INSTRUCTIONS, instructions.encode(), 0o644)
    return Provisioned(device, site, bundle, url, cred.status, key_id, instructions)


def _register(cfg: ServerConfig, device: str, site: str) -> None:
    """The device's site in the server's registry: the ingest accepts its events under this site only."""
    from enrollment_server.components import open_store

    with open_store(cfg) as store:
        store.register_device(device, site)


def _without_stamp(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("# Written by"))


def _instructions(device: str, site: str, bundle: Path, url: str, status: str, key_id: str) -> str:
    password_note = {
        "created": "a new broker password was created",
        "kept": "the device's broker password is unchanged",
        "rotated": "a NEW broker password was issued: the device stops connecting at the broker's reload until it "
        "has this bundle",
    }[status]
    d = DEVICE_CONFIG_DIR
    return f"""\
Device {device} (site {site}) provisioned: {password_note}.
Broker URL for the device: {url} ; gallery signing key id {key_id}.

1. On the broker: {RELOAD_HINT}.
2. Copy the bundle {bundle}/ to the device, e.g.
     scp -r {bundle} admin@<device>:/tmp/faceattend-bundle
   It holds:
     {BUNDLE_CONFIG:<26}-> {d}/{BUNDLE_CONFIG}   (set `cameras` there; check: edge-agent check-config)
     {BUNDLE_PASSWORD:<26}-> {d}/{BUNDLE_PASSWORD}   SECRET: mode 0640, owner root:faceattend
     {BUNDLE_CA:<26}-> {d}/{BUNDLE_CA}   the broker's CA
     {BUNDLE_PUBLIC_KEY:<26}-> {d}/{BUNDLE_PUBLIC_KEY}   verifies galleries
3. On the device (JetPack host): sudo deploy/jetson/install.sh --bundle /tmp/faceattend-bundle
   (the container instead: docs/deployment.md, section 3), then remove /tmp/faceattend-bundle.
4. Check from the server: enrollment-server devices   (the device online, its gallery version, lag 0).
Keep this bundle only as long as needed: it holds the device's password (re-running this command without it
needs --rotate-password).
"""


# ---- commands -------------------------------------------------------------------------------------------------


def _required(value: str | None, flag: str, env: str) -> str:
    if not value:
        raise ConfigError(f"{flag} is required (or set {env})")
    return value


def cmd_provision_device(args: argparse.Namespace, cfg: ServerConfig) -> int:
    ca = args.ca_file or cfg.mqtt.ca_file
    if ca is None:
        raise ConfigError("--ca-file is required (the server config has no mqtt.ca_file)")
    result = provision_device(
        cfg,
        auth_dir=Path(_required(args.broker_auth, "--broker-auth", ENV_BROKER_AUTH)),
        out_dir=Path(_required(args.out, "--out", ENV_PROVISION_OUT)),
        site=args.site or cfg.site,
        device=args.device,
        broker_url=_required(args.broker_url, "--broker-url", ENV_BROKER_URL),
        ca_file=Path(ca),
        public_key=Path(args.public_key) if args.public_key else None,
        cameras=args.camera or ["door=/dev/video0"],
        backend=args.backend,
        state_dir=args.state_dir,
        rotate=args.rotate_password,
        shown_out_dir=Path(os.environ[ENV_PROVISION_HOST_OUT]) if os.environ.get(ENV_PROVISION_HOST_OUT) else None,
    )
    if args.json:
        summary = {
            "device": result.device,
            "site": result.site,
            "bundle": str(result.bundle),
            "broker_url": result.broker_url,
            "password": result.password_status,
            "key_id": result.key_id,
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        sys.stdout.write(result.instructions)
    return 0


def cmd_broker_user(args: argparse.Namespace, cfg: ServerConfig) -> int:
    out = Path(args.password_out)
    prefix = args.discovery_prefix if args.home_assistant else None
    cred = BrokerAuth(_required(args.broker_auth, "--broker-auth", ENV_BROKER_AUTH)).upsert(
        consumer_acl(args.username, home_assistant_prefix=prefix),
        known_password=_read_known_password(out),
        rotate=args.rotate_password,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, (cred.password + "\n").encode(), 0o600)
    rights = (
        f"It may read {topics.ALL_EDGE_EVENTS}, {topics.ALL_EDGE_STATUS} and {topics.ALL_EDGE_STYLIZED}, and\n"
        "publish nothing."
        if prefix is None
        else f"It may read {topics.ALL_EDGE_EVENTS}, {topics.ALL_EDGE_STATUS}, {topics.ALL_EDGE_STYLIZED} and\n"
        f"{prefix}/# (the discovery configs), and publish {prefix}/status only (Home Assistant's birth and will)."
    )
    sys.stdout.write(
        f"consumer {cred.username}: password {cred.status}, written to {out} (mode 0600).\n"
        f"{rights} It connects with\n"
        f"mqtts://{cred.username}@<broker>:8883, the site CA, and the password from that file (the broker uses the\n"
        f"username as client id: one connection at a time per consumer user).\n{RELOAD_HINT}.\n"
    )
    return 0


def cmd_revoke_broker_user(args: argparse.Namespace, cfg: ServerConfig) -> int:
    auth = BrokerAuth(_required(args.broker_auth, "--broker-auth", ENV_BROKER_AUTH))
    if not auth.revoke(args.username):
        raise ProvisioningError(f"no device or consumer {args.username!r} in {auth.dir}")
    sys.stdout.write(f"{args.username}: password and ACL block removed; {RELOAD_HINT}.\n")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The provisioning subcommands of `enrollment-server` (called by enrollment_server/cli.py)."""

    def auth_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--broker-auth",
            default=os.environ.get(ENV_BROKER_AUTH),
            help=f"the broker's directory with `passwords` and `acl` (default: ${ENV_BROKER_AUTH})",
        )

    p = sub.add_parser(
        "provision-device",
        help="create a device's broker credentials and ACL entry, and its bundle (edge config, CA, gallery key)",
    )
    p.set_defaults(func=cmd_provision_device)
    p.add_argument("--device", required=True, help="device id (also its broker username)")
    p.add_argument("--site", help="its site (default: the config's site)")
    p.add_argument(
        "--broker-url",
        default=os.environ.get(ENV_BROKER_URL),
        help=f"the broker as the device reaches it, mqtts://host:8883 (default: ${ENV_BROKER_URL})",
    )
    auth_arg(p)
    p.add_argument(
        "--out",
        default=os.environ.get(ENV_PROVISION_OUT),
        help=f"bundles go to OUT/<device>/ (default: ${ENV_PROVISION_OUT})",
    )
    p.add_argument("--ca-file", help="the broker's CA certificate (default: the config's mqtt.ca_file)")
    p.add_argument("--public-key", help="gallery public key PEM (default: beside the config's gallery.signing_key)")
    p.add_argument("--camera", action="append", metavar="NAME=SOURCE", help="repeatable (default: door=/dev/video0)")
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime"), default="tensorrt")
    p.add_argument(
        "--state-dir", default=DEVICE_STATE_DIR, help=f"the agent's state on the device ({DEVICE_STATE_DIR})"
    )
    p.add_argument("--rotate-password", action="store_true", help="issue a new broker password")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the instructions")

    p = sub.add_parser("broker-user", help="create a read-only consumer user (events and statuses) on the broker")
    p.set_defaults(func=cmd_broker_user)
    p.add_argument("--username", required=True)
    p.add_argument("--password-out", required=True, help="file that receives the password (mode 0600)")
    auth_arg(p)
    p.add_argument("--rotate-password", action="store_true", help="issue a new password")
    p.add_argument(
        "--home-assistant",
        action="store_true",
        help="a Home Assistant instance: also reads the discovery configs and publishes its birth message",
    )
    p.add_argument(
        "--discovery-prefix",
        default=HOME_ASSISTANT_PREFIX,
        help=f"Home Assistant's discovery prefix (default {HOME_ASSISTANT_PREFIX})",
    )

    p = sub.add_parser(
        "revoke-broker-user", help="remove a device or consumer from the broker's password and ACL files"
    )
    p.set_defaults(func=cmd_revoke_broker_user)
    p.add_argument("username")
    auth_arg(p)
