"""The door bench's scorer on synthetic verdict lists (every outcome, totals over runs), the peer's two ways of
turning per-frame calls into verdicts, and the seeded plan of who is enrolled and who walks in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.devtools.door_bench import DoorBenchInputError, DoorBenchOptions, peer_gallery, plan_door
from edge_agent.devtools.door_peer import PeerCall, PeerRun
from edge_agent.devtools.door_score import TABLE_HEAD, DoorScoreError, Verdict, Walk, score_door

WALKS = [
    Walk("ann", "walk-in"),  # 0: recognised
    Walk("bob", "walk-in"),  # 1: credited as carl
    Walk("cid", "walk-in"),  # 2: an unknown-visitor event only
    Walk("dee", "walk-in", "not enrolled: too_small"),  # 3: no decision at all
    Walk("eve", "walk-in"),  # 4: two tracks, one right, one wrong: someone else was credited
    Walk("fay", "walk-in"),  # 5: two tracks, both right (a split track)
    Walk("gus", "stranger"),  # 6: let in as ann
    Walk("hal", "stranger"),  # 7: an unknown visitor
    Walk("ida", "stranger"),  # 8: no decision
]
VERDICTS = [
    Verdict(0, "ann"),
    Verdict(1, "carl"),
    Verdict(2, None),
    Verdict(4, "eve"),
    Verdict(4, "bob"),
    Verdict(5, "fay"),
    Verdict(5, "fay"),
    Verdict(6, "ann"),
    Verdict(7, None),
    Verdict(None, None),  # an event whose box matches no face
    Verdict(None, "ann"),  # ... naming someone
]


def test_every_outcome_is_counted() -> None:
    score = score_door(WALKS, VERDICTS)
    assert score.counts() == {
        "walk_ins": 6,
        "correct": 2,
        "wrong": 2,
        "missed": 2,
        "strangers": 3,
        "strangers_accepted": 1,
        "unattributed": 2,
        "unattributed_named": 1,
    }
    got = [(o.person, o.outcome, o.named, o.decisions) for o in score.outcomes]
    assert got == [
        ("ann", "correct", ("ann",), 1),
        ("bob", "wrong", ("carl",), 1),
        ("cid", "missed", (), 1),
        ("dee", "missed", (), 0),
        ("eve", "wrong", ("bob", "eve"), 2),
        ("fay", "correct", ("fay",), 2),
        ("gus", "accepted", ("ann",), 1),
        ("hal", "rejected", (), 1),
        ("ida", "rejected", (), 0),
    ]
    assert score.outcomes[3].note == "not enrolled: too_small"
    row = score.line()
    assert row.split() == ["2", "/", "6", "2", "2", "1", "/", "3", "(+1", "unattributed", "credits)"]
    assert len(TABLE_HEAD) == len(score_door(WALKS[:1], VERDICTS[:1]).line())  # the columns line up


def test_totals_over_runs_add_up_and_keep_every_outcome() -> None:
    a = score_door(WALKS, VERDICTS)
    b = score_door(WALKS[:2], [Verdict(0, "ann"), Verdict(1, "bob")])
    total = a + b
    assert total.correct == 4 and total.walk_ins == 8 and total.wrong == 2 and total.strangers == 3
    assert len(total.outcomes) == len(WALKS) + 2
    assert total.to_dict()["appearances"][-1]["outcome"] == "correct"


def test_nothing_at_the_door_and_a_verdict_out_of_range() -> None:
    empty = score_door(WALKS, [])
    assert (empty.correct, empty.missed, empty.strangers_accepted) == (0, 6, 0)
    with pytest.raises(DoorScoreError, match="appearance 9; the video has 9"):
        score_door(WALKS, [Verdict(9, "ann")])


def call(frame: int, label: str | None) -> PeerCall:
    return PeerCall(frame, label, label or "zed", 0.4 if label else 0.7)


def test_the_peers_calls_become_verdicts_by_majority_and_by_any_frame() -> None:
    run = PeerRun(
        calls={
            0: (call(1, "ann"), call(2, "ann"), call(3, None)),  # ann by majority
            1: (call(5, "bob"), call(6, "carl")),  # a tie: unknown by majority, both by any frame
            2: (call(8, None), call(9, None), call(10, "ann")),  # unknown by majority, ann on one frame
        },
        frames=12,
        faces=9,
        unattributed=1,
        seconds=1.0,
    )
    walks = [Walk("ann", "walk-in"), Walk("bob", "walk-in"), Walk("gus", "stranger")]
    majority = score_door(walks, run.verdicts("majority"))
    assert [o.outcome for o in majority.outcomes] == ["correct", "missed", "rejected"]
    assert majority.unattributed == 1 and majority.unattributed_named == 0
    first = run.verdicts("majority")[0]
    assert first.detail == {"frames": 3, "votes": {"ann": 2, "None": 1}, "mean_distance": pytest.approx(0.4)}
    anyframe = score_door(walks, run.verdicts("any"))
    assert [o.outcome for o in anyframe.outcomes] == ["correct", "wrong", "accepted"]
    assert run.to_dict()["appearances"]["1"][1] == {"frame": 6, "label": "carl", "nearest": "carl", "distance": 0.4}


def test_the_plan_enrolls_one_photo_and_shows_another() -> None:
    people = {f"m{i}": (Path(f"m{i}/1.jpg"), Path(f"m{i}/2.jpg"), Path(f"m{i}/3.jpg")) for i in range(12)}
    people |= {f"s{i}": (Path(f"s{i}/1.jpg"),) for i in range(10)}
    plan = plan_door(people, enrolled=15, walk_ins=5, strangers=4, seed=3)
    assert len(plan.enrolled) == 15 and len(plan.walk_ins) == 5 and len(plan.strangers) == 4
    assert all(len(photos) == 1 for photos in plan.enrolled.values())
    for person, shown in plan.walk_ins.items():
        assert person.startswith("m") and shown != plan.enrolled[person][0] and shown.parent.name == person
    assert not set(plan.strangers) & set(plan.enrolled)
    assert plan_door(people, enrolled=15, walk_ins=5, strangers=4, seed=3) == plan
    assert plan_door(people, enrolled=15, walk_ins=5, strangers=4, seed=4) != plan
    with pytest.raises(DoorBenchInputError, match="--walk-ins 13: only 12 people have two photos"):
        plan_door(people, enrolled=15, walk_ins=13, strangers=4, seed=0)
    with pytest.raises(DoorBenchInputError, match=r"--enrolled 20 \+ --strangers 3: the people folder has 22"):
        plan_door(people, enrolled=20, walk_ins=5, strangers=3, seed=0)


def test_spare_photos_never_change_the_draw_nor_include_the_photo_shown() -> None:
    """An admin told why a photo was refused offers another: at most enroll_tries - 1 spares per person, never the
    photo the walk-in shows at the door, never the enrolled one, and the same draw as with one try."""
    people = {f"m{i}": tuple(Path(f"m{i}/{j}.jpg") for j in range(1, 5)) for i in range(12)}
    people |= {f"s{i}": (Path(f"s{i}/1.jpg"),) for i in range(10)}
    once = plan_door(people, enrolled=15, walk_ins=5, strangers=4, seed=3)
    plan = plan_door(people, enrolled=15, walk_ins=5, strangers=4, seed=3, enroll_tries=3)
    assert once.spares == {}
    assert (plan.enrolled, plan.walk_ins, plan.strangers) == (once.enrolled, once.walk_ins, once.strangers)
    for person, spares in plan.spares.items():
        assert person in plan.enrolled and len(spares) == 2  # 3 photos offered in all
        assert plan.enrolled[person][0] not in spares and plan.walk_ins.get(person) not in spares
        assert len(set(spares)) == len(spares) and all(s.parent.name == person for s in spares)
    assert not any(p.startswith("s") for p in plan.spares)  # one photo: nothing else to offer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"walk_ins": 0, "strangers": 0}, "somebody walking in"),
        ({"enrolled": 3, "walk_ins": 5}, "--enrolled 3: must be >= 1 and >= --walk-ins"),
        ({"seeds": ()}, "seeds"),
        ({"peer_every": 0}, "--peer-every"),
        ({"enroll_tries": 0}, "--enroll-tries"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(DoorBenchInputError, match=message):
        DoorBenchOptions(Path("people"), **kwargs)


def test_the_peer_enrolls_exactly_each_seeds_enrollment_photos() -> None:
    """Another seed may enroll the same person from another photo (perhaps the one this seed shows at the door):
    the peer's gallery holds this plan's photos only."""
    root = Path("people")
    people = {f"m{i}": tuple(root / f"m{i}" / f"{j}.jpg" for j in range(4)) for i in range(6)}
    encodings = {f"m{i}/{j}.jpg": np.full(128, 10.0 * i + j) for i in range(6) for j in range(4)}
    encodings["m0/0.jpg"] = None  # a photo the peer found no face in
    options = DoorBenchOptions(root, enrolled=4, walk_ins=2, strangers=1)
    for seed in range(6):
        plan = plan_door(people, enrolled=4, walk_ins=2, strangers=1, seed=seed)
        names, rows = peer_gallery(options, plan, encodings)
        expected = [(p, photos[0]) for p, photos in plan.enrolled.items() if photos[0].name != "0.jpg" or p != "m0"]
        assert names == [p for p, _ in expected]
        for (person, photo), row in zip(expected, rows, strict=True):
            assert row[0] == 10.0 * int(person[1:]) + int(photo.stem)


def test_the_bench_scores_against_the_default_of_the_encoder_the_server_runs() -> None:
    from models.decision.rules import DecisionRule
    from models.face.encoders import DLIB_RESNET, MOBILEFACENET_192

    assert DoorBenchOptions(Path("people")).rule == DLIB_RESNET.default_decision
    mobile = {"encoder": "mobilefacenet-192", "accept_licence": "non-commercial-research"}
    assert DoorBenchOptions(Path("people"), enrollment=mobile).rule == MOBILEFACENET_192.default_decision
    given = DecisionRule.distance(0.5)
    assert DoorBenchOptions(Path("people"), enrollment=mobile, decision=given).rule == given
