"""The edge agent's strict configuration, the files it names, its MQTT settings and systemd notifications."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from edge_agent.agent import check_files, mqtt_config
from edge_agent.cli import main
from edge_agent.config import config_from_dict, load_config
from edge_agent.recognition.recognizer import DEFAULT_RULE
from edge_agent.systemd_notify import notify
from models.contract.signing import Signer
from models.decision.rules import DecisionRule
from models.errors import ConfigError, ContractError
from models.face.encoders import MOBILEFACENET_192
from models.training.calibration import parse_decision_fragment


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A provisioned device's folder: config, gallery public key, CA, password file, a video."""
    Signer.generate().save_public(tmp_path / "gallery.pub.pem")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "broker.password").write_text("s3cret\n")
    (tmp_path / "door.avi").write_bytes(b"")
    return tmp_path


NC = MOBILEFACENET_192.licence_acknowledgement


def minimal() -> dict:
    return {
        "device_id": "door-1",
        "site": "hq",
        "gallery": {"public_key": "gallery.pub.pem"},
        "cameras": [{"name": "entrance", "source": "door.avi"}],
    }


def write(folder: Path, data: dict, name: str = "edge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_config_takes_the_defaults_and_resolves_paths_beside_the_file(site: Path) -> None:
    cfg = load_config(write(site, minimal()))
    assert cfg.gallery.public_key == site / "gallery.pub.pem"
    assert cfg.cameras[0].source == str(site / "door.avi")
    assert cfg.state_dir == site / "state"
    assert cfg.outbox_path == site / "state" / "outbox.db"
    assert cfg.gallery_dir == site / "state" / "gallery"
    assert cfg.snapshots.dir == site / "state" / "snapshots"
    assert cfg.client_id == "door-1"
    assert cfg.decision is None and cfg.rule == DEFAULT_RULE  # no decision section: the encoder's default
    assert (cfg.models.encoder, cfg.models.alignment, cfg.models.accept_licence) == ("dlib-resnet-v1", "dlib5", "")
    assert cfg.models.backend == "onnxruntime" and not cfg.metrics.enabled and not cfg.style.enabled
    assert cfg.worker.clock == "capture"  # live cameras: tracks in real time
    assert config_from_dict(minimal() | {"worker": {"clock": "media"}}, site).worker.clock == "media"
    check_files(cfg)


def test_absolute_paths_and_network_sources_are_kept(site: Path, tmp_path: Path) -> None:
    data = minimal() | {"state_dir": "/var/lib/faceattend"}
    data["cameras"] = [
        {"name": "a", "source": "rtsp://user:pw@10.0.0.5/stream"},
        {"name": "b", "source": "/dev/video0"},
    ]
    cfg = config_from_dict(data, site)
    assert cfg.state_dir == Path("/var/lib/faceattend")
    assert [c.source for c in cfg.cameras] == ["rtsp://user:pw@10.0.0.5/stream", "/dev/video0"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, r"colour: unknown key"),
        ({"mqtt": {"keepalive": 30, "qos": 2}}, r"mqtt\.qos: unknown key"),
        ({"device_id": ""}, r"device_id: required"),
        ({"device_id": "door/1"}, r"device_id: .*not a valid id"),
        ({"site": None}, r"site: expected a string"),
        ({"gallery": {}}, r"gallery\.public_key: required"),
        ({"cameras": []}, r"cameras: at least one camera"),
        (
            {"cameras": [{"name": "a", "source": "x.avi"}, {"name": "a", "source": "y.avi"}]},
            r"cameras: camera names must be unique, 'a'",
        ),
        ({"cameras": [{"name": "a", "source": "x.avi", "speed": 2}]}, r"cameras\[0\]\.speed: unknown key"),
        ({"models": {"backend": "openvino"}}, r"models\.backend: expected one of onnxruntime, tensorrt"),
        ({"decision": {"rule": "cosine", "threshold": 0.5}}, r"decision: decision rule: unknown rule 'cosine'"),
        ({"mqtt": {"url": "mqtt://door:pw@broker:1883"}}, r"mqtt\.url: must not carry a password"),
        ({"mqtt": {"keepalive": 1}}, r"mqtt\.keepalive: must be in \[5, 65535\]"),
        ({"mqtt": {"protocol": "3"}}, r"mqtt\.protocol: expected one of"),
        ({"mqtt": {"reconnect_min_s": 10, "reconnect_max_s": 5}}, r"mqtt\.reconnect_min_s / reconnect_max_s"),
        ({"gallery": {"public_key": "k.pem", "wait_at_start_s": -1}}, r"gallery\.wait_at_start_s: must be"),
        ({"outbox": {"max_events": 0}}, r"outbox\.max_events: must be >= 1"),
        ({"outbox": {"overflow": "block"}}, r"outbox\.overflow: expected one of"),
        ({"attendance": {"window_s": -1}}, r"attendance\.window_s"),
        ({"snapshots": {"mode": "video"}}, r"snapshots\.mode: expected one of"),
        ({"log_level": "CHATTY"}, r"log_level: expected one of"),
        ({"recognition": {"decision": {"rule": "distance", "threshold": 0.5}}}, r"recognition\.decision: unknown"),
        ({"models": {"encoder": "arcface-r100"}}, r"models\.encoder: unknown encoder 'arcface-r100'; known encoders: "),
        ({"models": {"encoder": "mobilefacenet-192"}}, r"models\.encoder: mobilefacenet-192's weights may not be used"),
        (
            {"models": {"encoder": "mobilefacenet-192", "accept_licence": "commercial"}},
            r"set models\.accept_licence to non-commercial-research",
        ),
        (
            {"models": {"encoder": "mobilefacenet-192", "accept_licence": NC, "alignment": "dlib5"}},
            r"models\.alignment: encoder mobilefacenet-192 takes alignment arcface112, not 'dlib5'",
        ),
        ({"models": {"alignment": "arcface112"}}, r"models\.alignment: encoder dlib-resnet-v1 takes alignment dlib5"),
        ({"models": {"accept_licence": NC}}, r"models\.accept_licence: encoder dlib-resnet-v1 needs no licence"),
        # the cap is a distance in the encoder's space: never a silent default
        ({"decision": {"rule": "ratio", "threshold": 0.8}}, r"decision.*missing key 'max_distance' for the ratio rule"),
        ({"worker": {"clock": "moon"}}, r"worker\.clock: expected one of"),
        ({"worker": {"frame_timeout_s": 0}}, r"worker\.frame_timeout_s: must be a finite number > 0"),
    ],
)
def test_bad_values_name_the_key(site: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(minimal() | change, site)


def test_the_non_commercial_encoder_is_chosen_with_its_licence_acknowledged(site: Path) -> None:
    cfg = config_from_dict(minimal() | {"models": {"encoder": "mobilefacenet-192", "accept_licence": NC}}, site)
    assert (cfg.models.encoder, cfg.models.alignment) == ("mobilefacenet-192", "arcface112")
    assert cfg.decision is None and cfg.rule == MOBILEFACENET_192.default_decision  # its own calibrated default
    explicit = {"rule": "margin", "threshold": 0.15, "max_distance": 1.1}
    cfg = config_from_dict(
        minimal() | {"models": {"encoder": "mobilefacenet-192", "accept_licence": NC}, "decision": explicit}, site
    )
    assert cfg.rule == DecisionRule.margin(0.15, 1.1)


def test_the_calibrate_fragment_appended_to_a_config_is_its_decision(site: Path) -> None:
    fragment = (
        "# calibrated by model-tool calibrate\ndecision:\n  rule: ratio\n  threshold: 0.71\n  max_distance: 0.6\n"
    )
    path = site / "edge.yaml"
    path.write_text(yaml.safe_dump(minimal()) + fragment)
    cfg = load_config(path)
    assert cfg.rule == cfg.decision == DecisionRule.ratio(0.71, 0.6) == parse_decision_fragment(fragment)


def test_unreadable_or_bad_files_are_named(site: Path) -> None:
    cfg = config_from_dict(minimal() | {"gallery": {"public_key": "missing.pem"}}, site)
    with pytest.raises(ConfigError, match=r"gallery\.public_key: .*missing\.pem is not a file"):
        check_files(cfg)
    (site / "junk.pem").write_text("not a key")
    cfg = config_from_dict(minimal() | {"gallery": {"public_key": "junk.pem"}}, site)
    with pytest.raises(ConfigError, match=r"gallery\.public_key:"):
        check_files(cfg)
    cfg = config_from_dict(minimal() | {"mqtt": {"url": "mqtts://door-1@broker", "ca_file": "nope.pem"}}, site)
    with pytest.raises(ConfigError, match=r"mqtt\.ca_file: .*nope\.pem is not a file"):
        check_files(cfg)


def test_mqtt_settings_take_the_password_from_its_file(site: Path) -> None:
    data = minimal() | {
        "mqtt": {
            "url": "mqtts://door-1@broker.example:8883",
            "password_file": "broker.password",
            "ca_file": "ca.pem",
            "protocol": "5",
            "reconnect_max_s": 10,
        }
    }
    m = mqtt_config(config_from_dict(data, site))
    assert (m.host, m.port, m.tls, m.username, m.password) == ("broker.example", 8883, True, "door-1", "s3cret")
    assert m.ca_file == str(site / "ca.pem") and m.client_id == "door-1" and m.protocol == "5"
    assert (m.reconnect_min_delay, m.reconnect_max_delay) == (1, 10)
    assert "s3cret" not in repr(m)
    no_user = minimal() | {"mqtt": {"password_file": "broker.password"}}
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: needs a username"):
        mqtt_config(config_from_dict(no_user, site))


def test_check_config_cli(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(write(site, minimal()))]) == 0
    out = capsys.readouterr().out
    assert '"ok": true' in out and '"device_id": "door-1"' in out
    assert '"decision_source": "encoder default"' in out  # no decision section: a site's rule may replace it
    pinned = minimal() | {"decision": {"rule": "distance", "threshold": 0.5}}
    assert main(["check-config", str(write(site, pinned))]) == 0
    assert '"decision_source": "config"' in capsys.readouterr().out
    data = minimal()
    data["cameras"] = [{"name": "a", "source": "rtsp://admin:hunter2@10.1.1.1/live"}]
    assert main(["check-config", str(write(site, data))]) == 0
    assert "hunter2" not in capsys.readouterr().out  # camera credentials are redacted
    assert main(["check-config", str(write(site, minimal() | {"typo": 1}))]) == 2
    assert "typo: unknown key" in capsys.readouterr().err
    assert main(["check-config", str(site / "absent.yaml")]) == 2
    assert "cannot read the configuration" in capsys.readouterr().err
    (site / "broken.yaml").write_text("device_id: [unclosed\n")
    assert main(["check-config", str(site / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_check_config_says_when_the_chosen_encoder_is_not_fetched_on_this_machine(
    site: Path, capsys: pytest.CaptureFixture[str], cache_root: Path
) -> None:
    from models.face import encoders

    mobile = minimal() | {"models": {"encoder": "mobilefacenet-192", "accept_licence": NC}}
    encoders.encoder_onnx_path.cache_clear()
    try:
        assert main(["check-config", str(write(site, mobile))]) == 3  # a runtime piece missing here, not a bad config
        assert "run `model-tool fetch-encoder mobilefacenet-192`" in capsys.readouterr().err
    finally:
        encoders.encoder_onnx_path.cache_clear()
    assert main(["check-config", str(write(site, mobile | {"models": {"encoder": "mobilefacenet-192"}}))]) == 2
    assert "models.encoder: mobilefacenet-192's weights may not be used commercially" in capsys.readouterr().err


def test_systemd_notify_reaches_the_socket_and_is_silent_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1") is True
        assert notify("WATCHDOG=1") is True
        assert server.recv(64) == b"READY=1" and server.recv(64) == b"WATCHDOG=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("WATCHDOG=1") is False  # logged, never raised


def test_a_camera_name_the_event_contract_cannot_carry_is_refused_by_check_config(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every attendance event carries its camera's name; a name longer than the contract allows would make the
    codec refuse every event of that camera, so the config must refuse it first, naming the key."""
    from models.contract import limits
    from models.contract.events import new_event

    longest = "c" * limits.MAX_CAMERA_CHARS
    data = minimal()
    data["cameras"] = [{"name": longest, "source": "door.avi"}]
    assert config_from_dict(data, site).cameras[0].name == longest
    data["cameras"] = [{"name": "x", "source": "door.avi"}, {"name": longest + "s", "source": "door.avi"}]
    with pytest.raises(ConfigError, match=r"cameras\[1\]\.name: .*65 characters.*at most 64"):
        config_from_dict(data, site)
    assert main(["check-config", str(write(site, data))]) == 2
    assert "cameras[1].name" in capsys.readouterr().err
    # what the codec would have done with every event of that camera
    with pytest.raises(ContractError, match="camera"):
        new_event(
            seq=1,
            device_id="door-1",
            site="hq",
            camera=longest + "s",
            track_id=1,
            person_id=None,
            name=None,
            distance=None,
            margin=None,
            threshold=0.5,
            gallery_version=0,
            fingerprint="fp",
        )


def test_check_config_of_a_door_on_the_fetched_option(
    site: Path, capsys: pytest.CaptureFixture[str], mobilefacenet
) -> None:  # type: ignore[no-untyped-def]
    mobile = minimal() | {"models": {"encoder": "mobilefacenet-192", "accept_licence": NC}}
    assert main(["check-config", str(write(site, mobile))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["encoder"], report["alignment"]) == ("mobilefacenet-192", "arcface112")
    assert report["decision"] == {"rule": "distance", "threshold": 0.92}  # the encoder's calibrated default
