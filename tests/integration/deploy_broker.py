"""A real Mosquitto running the SHIPPED deployment config (deploy/mosquitto/mosquitto.conf and acl), with a PKI
generated here (the `cryptography` package) and users made by the real provisioning code.

Only what cannot be the same on a test machine is rewritten in the shipped config: the two listeners' ports (and
binding to 127.0.0.1), the certificate / auth / persistence paths, and logging (to a file, everything). Each
rewrite names a directive that must be in the shipped file, so a config that drifts from these tests fails them
instead of being silently bypassed.
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import CONNECT_TIMEOUT_S, FAST_RECONNECT, MosquittoBroker, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from models.contract.mqtt_link import MqttConfig, PahoMqttLink, Will

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = REPO / "deploy" / "mosquitto" / "acl"
SERVER_CN = "enrollment-server"


# --- PKI ----------------------------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class CertAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_path: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> CertAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, _write_cert(cert, directory / "ca.crt"))

    def issue(self, directory: Path, name: str, cn: str, *, server: bool) -> tuple[Path, Path]:
        """(cert, key) files: a broker server certificate (SAN 127.0.0.1, localhost) or a client certificate."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write_cert(cert, directory / f"{name}.crt"), _write_key(key, directory / f"{name}.key")


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    broker_cert: Path
    broker_key: Path
    server_cert: Path  # the enrollment server's client certificate, CN=enrollment-server
    server_key: Path


def make_pki(directory: Path) -> Pki:
    ca = CertAuthority.create(directory, "faceattend test CA")
    broker_cert, broker_key = ca.issue(directory, "broker", "localhost", server=True)
    server_cert, server_key = ca.issue(directory, "server-client", SERVER_CN, server=False)
    return Pki(ca.cert_path, broker_cert, broker_key, server_cert, server_key)


def pki_from_make_certs(site_dir: Path) -> Pki:
    """What deploy/mosquitto/make-certs.sh wrote into `site_dir`."""
    broker, server = site_dir / "broker-certs", site_dir / "server-certs"
    return Pki(
        broker / "ca.crt", broker / "broker.crt", broker / "broker.key", server / "client.crt", server / "client.key"
    )


# --- the shipped config, run -----------------------------------------------------------------------------------


def render_shipped_config(
    text: str, *, public_port: int, internal_port: int, pki: Pki, auth_dir: Path, data_dir: Path, log_path: Path
) -> str:
    rewrites = {
        r"listener 8883": f"listener {public_port} 127.0.0.1",
        r"listener 8884": f"listener {internal_port} 127.0.0.1",
        r"cafile /mosquitto/certs/ca\.crt": f"cafile {pki.ca_file}",
        r"certfile /mosquitto/certs/broker\.crt": f"certfile {pki.broker_cert}",
        r"keyfile /mosquitto/certs/broker\.key": f"keyfile {pki.broker_key}",
        r"password_file /mosquitto/auth/passwords": f"password_file {auth_dir / 'passwords'}",
        r"acl_file /mosquitto/auth/acl": f"acl_file {auth_dir / 'acl'}",
        r"persistence_location /mosquitto/data/": f"persistence_location {data_dir}/",
        r"log_dest stdout": f"log_dest file {log_path}",
    }
    for pattern, replacement in rewrites.items():
        text, n = re.subn(rf"^{pattern}$", replacement, text, flags=re.MULTILINE)
        assert n >= 1, f"the shipped mosquitto.conf has no line {pattern!r}: update tests/integration/deploy_broker.py"
    # run as root (containers), mosquitto would drop to user "mosquitto", who cannot read the test's keys
    return text + f"\nlog_type all\nuser {getpass.getuser()}\n"


class DeployBroker(MosquittoBroker):
    """The shipped config: `port` is the edges' / consumers' TLS listener, `internal_port` the server's."""

    def __init__(self, workdir: Path, binary: str, pki: Pki, auth_dir: Path) -> None:
        super().__init__(workdir, binary)
        self.pki = pki
        self.auth_dir = auth_dir
        self.internal_port = free_port()
        (workdir / "data").mkdir(exist_ok=True)
        self.config_path.write_text(
            render_shipped_config(
                SHIPPED_CONF.read_text(),
                public_port=self.port,
                internal_port=self.internal_port,
                pki=pki,
                auth_dir=auth_dir,
                data_dir=workdir / "data",
                log_path=self.log_path,
            )
        )

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def internal_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.internal_port}"

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP: Mosquitto re-reads the password and ACL files (what operators do after provisioning)."""
        assert self._proc is not None and self.running
        before = self.log_text().count("Reloading config")
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count("Reloading config") <= before:
            assert time.monotonic() < deadline, "mosquitto did not log a config reload"
            time.sleep(0.05)
        time.sleep(0.1)  # the log line comes first, then the files are read


def new_auth_dir(directory: Path) -> Path:
    """A broker auth directory as deploy/central/init-site.sh makes it: the shipped ACL, no users yet."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHIPPED_ACL, directory / "acl")
    (directory / "passwords").write_text("")
    return directory


# --- clients ---------------------------------------------------------------------------------------------------


class Links:
    """PahoMqttLinks against a DeployBroker; every link made is stopped by `stop_all()`."""

    def __init__(self) -> None:
        self.made: list[PahoMqttLink] = []

    def make(self, config: MqttConfig, *, will: Will | None = None) -> PahoMqttLink:
        link = PahoMqttLink(config, will=will)
        self.made.append(link)
        return link

    def connect(
        self, config: MqttConfig, *, will: Will | None = None, timeout: float = CONNECT_TIMEOUT_S
    ) -> PahoMqttLink:
        link = self.make(config, will=will)
        link.start()
        assert link.wait_connected(timeout), f"{config.url} ({config.client_id}) did not connect"
        return link

    def refused(self, config: MqttConfig, wait: float = 2.0) -> bool:
        """True when a link with `config` does not get connected within `wait` seconds."""
        link = self.make(config)
        link.start()
        try:
            return not link.wait_connected(wait)
        finally:
            link.stop()

    def stop_all(self) -> None:
        for link in reversed(self.made):
            link.stop()


def device_config(broker: DeployBroker, username: str, password: str, /, **options: object) -> MqttConfig:
    fields: dict = {"host": "127.0.0.1", "port": broker.port, "tls": True, "username": username, "password": password}
    fields.update(ca_file=str(broker.pki.ca_file), **FAST_RECONNECT)
    fields.update(options)
    return MqttConfig(**fields)


def server_config(broker: DeployBroker, client_id: str, /, **options: object) -> MqttConfig:
    fields: dict = {
        "host": "127.0.0.1",
        "port": broker.internal_port,
        "tls": True,
        "ca_file": str(broker.pki.ca_file),
        "cert_file": str(broker.pki.server_cert),
        "key_file": str(broker.pki.server_key),
        "client_id": client_id,
    }
    fields.update(FAST_RECONNECT)
    fields.update(options)
    return MqttConfig(**fields)
