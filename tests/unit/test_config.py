"""Strict configuration loading: unknown keys and wrong types name the offending key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from models.config import load_dataclass, load_yaml
from models.errors import ConfigError


@dataclass(frozen=True)
class Mqtt:
    url: str = "mqtt://127.0.0.1:1883"
    keepalive: int = 30
    tls: bool = False


@dataclass(frozen=True)
class Root:
    site: str = "main"
    mode: Literal["fast", "accurate"] = "fast"
    threshold: float = 0.6
    key: Path | None = None
    sizes: tuple[int, ...] = (1, 8)
    window: tuple[float, float] = (0.3, 0.9)
    mqtt: Mqtt = field(default_factory=Mqtt)


def test_defaults_and_conversion():
    cfg = load_dataclass(Root, {"mqtt": {"keepalive": 10}, "threshold": 1, "key": "/k.pem", "sizes": [4]})
    assert cfg.mqtt == Mqtt(keepalive=10) and cfg.threshold == 1.0 and isinstance(cfg.threshold, float)
    assert cfg.key == Path("/k.pem") and cfg.sizes == (4,) and cfg.site == "main"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sight": "x"}, r"^sight: unknown key; allowed: "),
        ({"mqtt": {"keepalive": "ten"}}, r"^mqtt\.keepalive: expected an integer, got 'ten'"),
        ({"mqtt": {"tls": "yes"}}, r"^mqtt\.tls: expected true or false"),
        ({"mqtt": {"port": 1}}, r"^mqtt\.port: unknown key"),
        ({"mode": "slow"}, r"^mode: expected one of 'fast', 'accurate'"),
        ({"threshold": True}, r"^threshold: expected a number"),
        ({"sizes": [1, "x"]}, r"^sizes\[1\]: expected an integer"),
        ({"window": [1.0]}, r"^window: expected 2 values"),
        ({"mqtt": 5}, r"^mqtt: expected a mapping"),
        ({"key": ""}, r"^key: expected a path"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        load_dataclass(Root, data)


def test_yaml_file(tmp_path):
    good = tmp_path / "ok.yaml"
    good.write_text("site: door-a\nmqtt:\n  url: mqtt://broker:1883\n")
    assert load_yaml(Root, good).site == "door-a"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(Root, empty) == Root()
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(Root, bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(Root, tmp_path / "absent.yaml")
