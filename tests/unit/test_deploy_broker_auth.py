"""enrollment_server/provisioning.py without a broker: Mosquitto password hashes, ACL blocks, the files it keeps,
and the edge config it writes (checked with the edge agent's own loader)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent import agent
from edge_agent import config as edge_config
from enrollment_server.config import config_from_dict
from enrollment_server.provisioning import (
    SERVER_RULES,
    AclBlock,
    BrokerAuth,
    ProvisioningError,
    _parse_acl,
    check_password,
    consumer_acl,
    device_acl,
    edge_broker_url,
    hash_password,
    provision_device,
    render_edge_config,
)
from models.contract import topics
from models.contract.signing import Signer
from models.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED_ACL = REPO / "deploy" / "mosquitto" / "acl"


def auth_dir(tmp_path: Path) -> BrokerAuth:
    d = tmp_path / "auth"
    d.mkdir()
    shutil.copyfile(SHIPPED_ACL, d / "acl")
    return BrokerAuth(d)


# --- password hashes ----------------------------------------------------------------------------------------------


def test_hash_is_mosquitto_2_pbkdf2_sha512_format():
    salt = bytes(range(12))
    hashed = hash_password("s3cret", salt=salt)
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/=]{16}\$[A-Za-z0-9+/=]{88}", hashed)
    expected = base64.b64encode(hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 101)).decode()
    assert hashed.split("$")[4] == expected
    assert check_password("s3cret", hashed) and not check_password("s3cret ", hashed)
    assert hash_password("s3cret") != hash_password("s3cret")  # a fresh salt each time
    for bad in ("", "two\nlines"):
        with pytest.raises(ConfigError):
            hash_password(bad)
    assert not check_password("x", "not a hash") and not check_password("x", "$7$many$!!$!!")


def test_hashes_made_by_mosquitto_passwd_check_and_ours_have_its_shape(tmp_path):
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    pwfile = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(pwfile), "alice", "correct horse"], check=True, capture_output=True)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert check_password("correct horse", theirs) and not check_password("wrong", theirs)
    ours = hash_password("correct horse")
    assert [len(p) for p in ours.split("$")] == [len(p) for p in theirs.split("$")]


# --- ACL blocks and the files ---------------------------------------------------------------------------------------


def test_the_shipped_acl_grants_the_server_exactly_its_contract_topics():
    parts = _parse_acl(SHIPPED_ACL.read_text(), SHIPPED_ACL)
    rules = [ln.strip() for ln in parts if isinstance(ln, str) and ln.strip() and not ln.lstrip().startswith("#")]
    assert rules[0] == "user enrollment-server"  # nothing before the first user line (that would be anonymous)
    assert sorted(rules[1:]) == sorted(SERVER_RULES)
    assert f"topic write {topics.ALL_EVENTS_STORED}" in rules
    assert f"topic read {topics.ALL_EDGE_UNKNOWN}" in rules and "topic write homeassistant/#" in rules
    assert not any(isinstance(p, AclBlock) for p in parts)
    assert "pattern" not in " ".join(rules)


def test_device_and_consumer_blocks():
    assert device_acl("door-1", "hq").render() == [
        "# BEGIN faceattend device door-1 site=hq",
        "user door-1",
        "topic write faceattend/v1/edge/door-1/#",
        "topic read faceattend/v1/site/hq/gallery/#",
        "topic read faceattend/v1/device/door-1/stored",
        "# END faceattend device door-1",
    ]
    consumer = consumer_acl("reports")
    assert all(r.startswith("topic read ") for r in consumer.rules)
    assert f"topic read {topics.ALL_EDGE_EVENTS}" in consumer.rules
    assert not any("unknown" in r for r in consumer.rules)  # faces of unknown visitors are the server's alone
    ha = consumer_acl("home-assistant", home_assistant_prefix="homeassistant")
    assert ha.rules == (
        *consumer.rules,
        "topic read homeassistant/#",
        "topic write homeassistant/status",
    )
    with pytest.raises(ConfigError):
        consumer_acl("ha", home_assistant_prefix="home/assistant")
    for bad in ("", "a/b", "#", "+", "door 1", "x" * 65):
        with pytest.raises(ConfigError):
            device_acl(bad, "hq")
        with pytest.raises(ConfigError):
            device_acl("door-1", bad)


def test_upsert_appends_updates_and_revokes_blocks_keeping_everything_else(tmp_path):
    auth = auth_dir(tmp_path)
    shipped = SHIPPED_ACL.read_text()
    first = auth.upsert(device_acl("door-1", "hq"))
    second = auth.upsert(consumer_acl("reports"))
    assert (first.status, second.status) == ("created", "created")
    text = auth.acl.read_text()
    assert text.startswith(shipped.rstrip("\n"))
    assert auth.blocks() == [device_acl("door-1", "hq"), consumer_acl("reports")]
    assert stat.S_IMODE(auth.passwords.stat().st_mode) == 0o640

    # again with the known password: nothing changes, byte for byte
    before = (auth.passwords.read_bytes(), auth.acl.read_bytes())
    assert auth.upsert(device_acl("door-1", "hq"), known_password=first.password).status == "kept"
    assert (auth.passwords.read_bytes(), auth.acl.read_bytes()) == before
    # a site move rewrites the block in place
    assert auth.upsert(device_acl("door-1", "annex"), known_password=first.password).status == "kept"
    assert auth.blocks() == [device_acl("door-1", "annex"), consumer_acl("reports")]
    # without the password: refused, unless rotating
    with pytest.raises(ProvisioningError, match="--rotate-password"):
        auth.upsert(device_acl("door-1", "annex"))
    with pytest.raises(ProvisioningError, match="--rotate-password"):
        auth.upsert(device_acl("door-1", "annex"), known_password="wrong")
    rotated = auth.upsert(device_acl("door-1", "annex"), rotate=True)
    assert rotated.status == "rotated" and rotated.password != first.password
    hashes = dict(ln.split(":", 1) for ln in auth.passwords.read_text().splitlines())
    assert check_password(rotated.password, hashes["door-1"]) and not check_password(first.password, hashes["door-1"])

    assert auth.revoke("door-1") and not auth.revoke("door-1")
    assert auth.blocks() == [consumer_acl("reports")]
    assert "door-1" not in auth.passwords.read_text() and "door-1" not in auth.acl.read_text()
    assert auth.revoke("reports")
    assert auth.acl.read_text() == shipped and auth.passwords.read_text() == ""  # back to the shipped state


def test_names_taken_by_others_and_broken_files_are_refused(tmp_path):
    auth = auth_dir(tmp_path)
    with pytest.raises(ProvisioningError, match="not managed"):
        auth.upsert(device_acl("enrollment-server", "hq"))
    auth.upsert(device_acl("door-1", "hq"))
    with pytest.raises(ProvisioningError, match="already a device"):
        auth.upsert(consumer_acl("door-1"))
    with auth.passwords.open("a") as fh:
        fh.write("legacy:$7$101$AAAAAAAAAAAAAAAA$AAAA\n")
    with pytest.raises(ProvisioningError, match="by hand"):
        auth.upsert(device_acl("legacy", "hq"))
    with auth.acl.open("a") as fh:
        fh.write("\nuser admin\ntopic readwrite #\n")
    with pytest.raises(ProvisioningError, match="not managed"):
        auth.upsert(consumer_acl("admin"))
    with pytest.raises(ProvisioningError, match="not managed"):
        auth.revoke("admin")
    with auth.acl.open("a") as fh:
        fh.write("# BEGIN faceattend device door-9 site=hq\nuser door-9\n")
    with pytest.raises(ProvisioningError, match="has no"):
        auth.upsert(device_acl("door-2", "hq"))
    missing = BrokerAuth(tmp_path / "nowhere")
    with pytest.raises(ProvisioningError, match="does not exist"):
        missing.upsert(device_acl("door-2", "hq"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProvisioningError, match="deploy/mosquitto/acl"):
        BrokerAuth(tmp_path / "empty").upsert(device_acl("door-2", "hq"))


def test_edge_broker_url_takes_mqtts_addresses_only():
    assert edge_broker_url("mqtts://broker.example.org:8883", "door-1") == "mqtts://door-1@broker.example.org:8883"
    assert edge_broker_url("mqtts://10.1.2.3", "door-1") == "mqtts://door-1@10.1.2.3:8883"
    assert edge_broker_url("mqtts://[fd00::1]:8883", "d") == "mqtts://d@[fd00::1]:8883"
    for bad in ("mqtt://broker:1883", "mqtts://u:p@broker:8883", "mqtts://u@broker", "https://broker", "mqtts://b/x"):
        with pytest.raises(ConfigError):
            edge_broker_url(bad, "door-1")


# --- the bundle and its edge config -------------------------------------------------------------------------------


def self_signed_ca(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def server_cfg(tmp_path: Path):
    key = tmp_path / "keys" / "gallery-signing.pem"
    signer = Signer.generate()
    signer.save(key)
    signer.save_public(key.with_suffix(".pub.pem"))
    return config_from_dict(
        {"site": "hq", "gallery": {"signing_key": str(key)}, "enrollment": {"alignment": "template"}}
    )


def test_the_edge_config_loads_with_the_edge_agents_loader(tmp_path, server_cfg):
    ca = self_signed_ca(tmp_path / "ca.crt")
    result = provision_device(
        server_cfg,
        auth_dir=auth_dir(tmp_path).dir,
        out_dir=tmp_path / "out",
        site="hq",
        device="door-7",
        broker_url="mqtts://broker.example.org:8883",
        ca_file=ca,
        cameras=["door=/dev/video0", 'odd "name"=rtsp://user:pa:ss@cam/1?x=#y'],
        backend="onnxruntime",
        state_dir="state",
        shown_out_dir=Path("/srv/site/provisioned"),
    )
    assert result.bundle == tmp_path / "out" / "door-7"
    assert "scp -r /srv/site/provisioned/door-7 " in result.instructions  # the host's view of the folder
    cfg = edge_config.load_config(result.bundle / "edge.yaml")
    assert agent.check_files(cfg).key_id == result.key_id  # the files exist, parse, and the key is the server's
    mqtt = agent.mqtt_config(cfg)
    assert (mqtt.username, mqtt.client_id, mqtt.tls, mqtt.port) == ("door-7", "door-7", True, 8883)
    assert mqtt.password == cfg.mqtt.password_file.read_text().strip()
    assert (cfg.device_id, cfg.site, cfg.mqtt.url) == ("door-7", "hq", "mqtts://door-7@broker.example.org:8883")
    assert cfg.mqtt.password_file.read_text().strip() and cfg.mqtt.ca_file.read_bytes() == ca.read_bytes()
    assert cfg.gallery.public_key.read_text() == Signer.load(server_cfg.gallery.signing_key).verifier.public_pem()
    assert cfg.models.alignment == "template" and cfg.models.backend == "onnxruntime"
    assert [(c.name, c.source) for c in cfg.cameras] == [
        ("door", "/dev/video0"),
        ('odd "name"', "rtsp://user:pa:ss@cam/1?x=#y"),
    ]
    assert cfg.state_dir == result.bundle / "state"
    assert result.password_status == "created" and result.key_id in result.instructions
    text = render_edge_config(
        device="d", site="s", broker_url="mqtts://d@b:8883", cameras=[("c", "0")], backend="tensorrt",
        encoder="dlib-resnet-v1", accept_licence="", alignment="dlib5", state_dir="/var/lib/faceattend",
    )  # fmt: skip
    data = yaml.safe_load(text)
    assert set(data) == {"device_id", "site", "state_dir", "mqtt", "gallery", "models", "cameras"}
    assert data["models"] == {"backend": "tensorrt", "encoder": "dlib-resnet-v1", "alignment": "dlib5"}


def test_a_site_on_the_non_commercial_encoder_provisions_doors_that_run_it(tmp_path):
    edge_config = pytest.importorskip("edge_agent.config")
    from enrollment_server.components import fingerprint
    from models.face.encoders import encoder_spec
    from models.face.fingerprint import encoder_fingerprint

    key = tmp_path / "keys" / "gallery-signing.pem"
    Signer.generate().save(key)
    enrollment = {"encoder": "mobilefacenet-192", "accept_licence": "non-commercial-research"}
    server = config_from_dict({"site": "hq", "gallery": {"signing_key": str(key)}, "enrollment": enrollment})
    assert server.enrollment.alignment == "arcface112"  # the encoder's own
    result = provision_device(
        server,
        auth_dir=auth_dir(tmp_path).dir,
        out_dir=tmp_path / "out",
        site="hq",
        device="door-8",
        broker_url="mqtts://broker.example.org:8883",
        ca_file=self_signed_ca(tmp_path / "ca.crt"),
        cameras=["door=/dev/video0"],
        backend="onnxruntime",
    )
    cfg = edge_config.load_config(result.bundle / "edge.yaml")
    models = cfg.models
    assert (models.encoder, models.accept_licence, models.alignment) == (
        "mobilefacenet-192",
        "non-commercial-research",
        "arcface112",
    )
    door = encoder_fingerprint(encoder_spec(models.encoder), alignment=models.alignment).value
    assert door == fingerprint(server) and door.startswith("mobilefacenet_192-")


def test_bad_inputs_write_nothing(tmp_path, server_cfg):
    auth = auth_dir(tmp_path)
    ca = self_signed_ca(tmp_path / "ca.crt")
    common = {"auth_dir": auth.dir, "out_dir": tmp_path / "out", "site": "hq", "device": "door-1", "ca_file": ca}
    with pytest.raises(ConfigError):
        provision_device(server_cfg, broker_url="mqtt://broker:1883", **common)
    with pytest.raises(ConfigError):
        provision_device(server_cfg, broker_url="mqtts://broker:8883", cameras=["nocamera"], **common)
    (tmp_path / "bad.crt").write_text("not a certificate")
    with pytest.raises(ConfigError):
        provision_device(server_cfg, broker_url="mqtts://broker:8883", **{**common, "ca_file": tmp_path / "bad.crt"})
    assert not (tmp_path / "out").exists() and auth.blocks() == []
