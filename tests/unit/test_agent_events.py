"""The agent's decision -> event step (EdgeAgent._on_decision) with a real outbox: an event the outbox refuses (full
with `overflow: refuse_new`, a full disk) is counted by reason and does not suppress its person for the attendance
window (fix 7). The agent is built from a real config but not started (no models, cameras or broker: the step
under test touches none of them); its outbox and publisher are the real ones. The whole agent path runs in
tests/integration/test_agent_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_attendance import decision

from edge_agent.agent import EdgeAgent
from edge_agent.config import config_from_dict
from edge_agent.delivery.event_publisher import EventPublisher
from edge_agent.delivery.outbox import Outbox
from models.contract.mqtt_link import MqttConfig, PahoMqttLink
from models.contract.signing import Signer

DEVICE = "door-1"


def make_agent(tmp_path: Path, outbox: Outbox) -> EdgeAgent:
    key = tmp_path / "gallery.pub.pem"
    Signer.generate().save_public(key)
    cfg = config_from_dict(
        {
            "device_id": DEVICE,
            "site": "hq",
            "state_dir": str(tmp_path / "state"),
            "gallery": {"public_key": str(key)},
            "cameras": [{"name": "front", "source": "0"}],
            "snapshots": {"mode": "off"},
            "attendance": {"window_s": 300},
        },
        tmp_path,
    )
    agent = EdgeAgent(cfg)
    # what _start_parts would wire for this step: the outbox, the publisher it wakes (never started: nothing
    # is published here), no painter
    agent.outbox = outbox
    link = PahoMqttLink(MqttConfig(host="127.0.0.1"))
    agent.publisher = EventPublisher(outbox, link, DEVICE)
    agent.style = None
    return agent


@pytest.fixture
def full_outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path / "outbox.db", max_events=1, overflow="refuse_new")
    yield box
    box.close()


def people_in(box: Outbox) -> list[str | None]:
    from models.contract.events import AttendanceEvent

    return [AttendanceEvent.from_json(item.payload).person_id for item in box.pending(100)]


def test_an_event_refused_by_a_full_outbox_does_not_suppress_its_person(tmp_path: Path, full_outbox: Outbox):
    agent = make_agent(tmp_path, full_outbox)
    agent._on_decision(decision("ann", 1000.0, track=1))  # fills the outbox
    agent._on_decision(decision("bob", 1001.0, track=2))  # refused: the outbox is full
    assert people_in(full_outbox) == ["ann"]
    # the server confirms ann's event: room again. Bob is still at the door, well within his window
    full_outbox.confirm(item.event_id for item in full_outbox.pending(10))
    agent._on_decision(decision("bob", 1010.0, track=3))
    assert people_in(full_outbox) == ["bob"], "bob's refused event suppressed his next decision"
    counts = agent.event_counts()
    assert counts["stored_total"] == 2 and counts["refused_total"] == 1
    assert counts["refused_outbox_full_total"] == 1 and counts["refused_outbox_error_total"] == 0
    gate = agent.gate.stats()
    assert (gate.admitted_known, gate.revoked, gate.suppressed_repeat) == (2, 1, 0)


def test_an_event_refused_by_a_full_disk_is_counted_and_does_not_suppress_its_person(tmp_path: Path):
    box = Outbox.open(tmp_path / "outbox.db")
    try:
        agent = make_agent(tmp_path, box)
        # SQLITE_FULL, the error a full disk gives: the file may not grow past its current pages
        pages = box._conn.execute("PRAGMA page_count").fetchone()[0]
        box._conn.execute(f"PRAGMA max_page_count = {pages}")
        people = [f"p{i:03d}" for i in range(200)]
        for i, person in enumerate(people):
            agent._on_decision(decision(person, 1000.0 + i, track=i))
            if agent.event_counts()["refused_total"]:
                break
        counts = agent.event_counts()
        assert counts["refused_outbox_error_total"] == 1 and counts["refused_outbox_full_total"] == 0
        refused = person
        assert refused not in people_in(box)
        box._conn.execute("PRAGMA max_page_count = 1073741823")  # space again
        agent._on_decision(decision(refused, 1000.0 + i + 5, track=999))
        assert refused in people_in(box), "the refused person's next decision was suppressed"
        assert agent.event_counts()["refused_total"] == 1
    finally:
        box.close()
