"""The site's calibrated rule at the door: `enrollment-server calibrate --apply` publishes it in the signed manifest
through a real Mosquitto, and an edge agent without a decision section decides under it (status, metrics and its
recognizer); an agent whose config names a rule keeps its own and says so once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import edge_config
from conftest import MosquittoBroker
from server_process import Server
from test_site_calibration import SITE, generate_site
from waiting import wait_until

from edge_agent.agent import EdgeAgent
from edge_agent.config import config_from_dict
from edge_agent.recognition.recognizer import DEFAULT_RULE, rule_in_force
from models.decision.rules import DecisionRule

GALLERY_TIMEOUT_S = 60.0
CONFIG_RULE = DecisionRule.ratio(0.7, 0.5)


@pytest.fixture
def server(tmp_path: Path, mosquitto: MosquittoBroker) -> Server:
    server = Server(tmp_path / "server", mosquitto.url, SITE)
    server.cli("init")
    generate_site(server.config, server.database, people=80, second_photos=40, unknown=60)
    return server


@pytest.fixture
def agents(tmp_path: Path, mosquitto: MosquittoBroker, server: Server) -> Iterator[Callable[..., EdgeAgent]]:
    started: list[EdgeAgent] = []

    def start(device: str, **sections: Any) -> EdgeAgent:
        # a camera whose file never appears: the agent runs, with its gallery sync and status, and decides nothing
        camera = {"name": "entrance", "source": str(tmp_path / "no-video.avi"), "realtime": False}
        config = edge_config(
            device=device,
            site=SITE,
            state_dir=tmp_path / device,
            broker_url=mosquitto.url,
            public_key=server.public_key,
            cameras=[camera],
            **sections,
        )
        agent = EdgeAgent(config_from_dict(config, tmp_path))
        started.append(agent)
        agent.start()
        return agent

    yield start
    for agent in reversed(started):
        agent.stop()


def wait_version(agent: EdgeAgent, version: int) -> None:
    assert wait_until(lambda: agent.gallery_version() == version, timeout=GALLERY_TIMEOUT_S), agent.sync.status()


def test_the_door_applies_the_sites_rule_and_an_explicit_config_wins(server: Server, agents, caplog) -> None:
    first = server.cli("publish")[0]["gallery"]["version"]
    door = agents("door-1")
    pinned = agents("door-2", decision=CONFIG_RULE.to_dict())
    wait_version(door, first)
    wait_version(pinned, first)
    default = DEFAULT_RULE.to_dict()
    assert door.decision_in_force() == {"source": "encoder default", **default}
    assert pinned.decision_in_force() == {"source": "config", **CONFIG_RULE.to_dict()}

    with caplog.at_level(logging.INFO, logger="edge_agent.agent"):
        out = server.cli("calibrate", "--rule", "ratio", "--apply")
        fit, version = out[0], out[1]["gallery"]["version"]
        wait_version(door, version)
        wait_version(pinned, version)
    site_rule = DecisionRule.from_dict(fit["decision"])
    assert site_rule.rule == "ratio" and site_rule != DEFAULT_RULE
    # the gallery in service carries the rule exactly as the server fitted it
    decision = door.holder.current.gallery.decision
    assert decision is not None and decision.rule == site_rule and decision.strangers == fit["strangers"]
    assert door.decision_in_force() == {"source": "site", **site_rule.to_dict()}
    assert door.health()["decision"]["source"] == "site"  # what the retained status and the metrics carry
    # the recognizers of the worker decide under what rule_in_force gives for the gallery in service
    assert rule_in_force(door.worker.rule, door.holder.current, site_rules=door.worker.site_rules)[0] == site_rule
    assert rule_in_force(pinned.worker.rule, pinned.holder.current, site_rules=pinned.worker.site_rules) == (
        CONFIG_RULE,
        "config",
    )
    assert pinned.decision_in_force()["source"] == "config"
    overrides = [r for r in caplog.records if "overrides the site's calibrated rule" in r.getMessage()]
    assert len(overrides) == 1  # door-2 says it once; door-1 has nothing to override

    # the metrics say the same (a string figure is an info gauge)
    lines = door.metrics.render().splitlines()
    assert 'faceattend_edge_decision_source_info{value="site"} 1' in lines
    [threshold] = [line.split()[1] for line in lines if line.startswith("faceattend_edge_decision_threshold ")]
    assert float(threshold) == pytest.approx(site_rule.threshold)

    # back to the encoder default: the next gallery carries no rule and the door follows
    version = server.cli("calibrate", "--reset")[1]["gallery"]["version"]
    wait_version(door, version)
    assert door.holder.current.gallery.decision is None
    assert door.decision_in_force() == {"source": "encoder default", **default}
