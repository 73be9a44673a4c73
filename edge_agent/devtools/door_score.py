"""Scoring a door run against its video's ground truth: who walked in, and who the system said they were.

Input: the video's appearances (each a person, either an enrolled *walk-in* or a *stranger*) and the *verdicts*: one
per decision the system made (an event the consumer received, or the peer's call on an appearance), each attributed
to the appearance whose face it was (None: to none) and naming a person or nobody (an unknown visitor).

Per appearance, from the people its verdicts name:

- a walk-in is **correct** when they name that person and nobody else, **wrong** when they name anyone else (even
  beside the right person: someone else was credited), **missed** when they name nobody (unknown visitor events
  only, or no decision at all);
- a stranger is **accepted** when they name anyone, **rejected** otherwise.

Verdicts attributed to no appearance are counted apart (`unattributed`; `unattributed_named` when they name someone:
a credit the ground truth cannot explain, which the table shows beside the strangers accepted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from models.errors import FaceAttendError

Kind = Literal["walk-in", "stranger"]
Outcome = Literal["correct", "wrong", "missed", "accepted", "rejected"]


class DoorScoreError(FaceAttendError):
    """A verdict names an appearance the ground truth does not have."""


@dataclass(frozen=True)
class Walk:
    """One appearance of the ground truth, as the scorer sees it."""

    person: str
    kind: Kind
    note: str | None = None  # e.g. "enrollment photo rejected": why a walk-in could not be recognised


@dataclass(frozen=True)
class Verdict:
    appearance: int | None  # index into the appearances; None: attributed to none
    person_id: str | None  # who it names; None: an unknown visitor
    detail: dict[str, Any] | None = None  # distances, rule, ... (reported, not scored)


@dataclass(frozen=True)
class AppearanceOutcome:
    index: int
    person: str
    kind: Kind
    outcome: Outcome
    named: tuple[str, ...]  # the people its verdicts name (sorted)
    decisions: int  # verdicts attributed to it
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "person": self.person,
            "kind": self.kind,
            "outcome": self.outcome,
            "named": list(self.named),
            "decisions": self.decisions,
            "note": self.note,
        }


@dataclass(frozen=True)
class DoorScore:
    walk_ins: int
    correct: int
    wrong: int
    missed: int
    strangers: int
    strangers_accepted: int
    unattributed: int
    unattributed_named: int
    outcomes: tuple[AppearanceOutcome, ...] = ()

    def __add__(self, other: DoorScore) -> DoorScore:
        """Totals over runs (the outcomes of both, in order)."""
        return DoorScore(
            *(getattr(self, f) + getattr(other, f) for f in _COUNTS),
            outcomes=self.outcomes + other.outcomes,
        )

    def counts(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in _COUNTS}

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts(), "appearances": [o.to_dict() for o in self.outcomes]}

    def line(self) -> str:
        """The table row's figures, under TABLE_HEAD."""
        extra = f"  (+{self.unattributed_named} unattributed credits)" if self.unattributed_named else ""
        return (
            f"{f'{self.correct} / {self.walk_ins}':>11} {self.wrong:>6} {self.missed:>7} "
            f"{f'{self.strangers_accepted} / {self.strangers}':>19}{extra}"
        )


_COUNTS = (
    "walk_ins",
    "correct",
    "wrong",
    "missed",
    "strangers",
    "strangers_accepted",
    "unattributed",
    "unattributed_named",
)
TABLE_HEAD = f"{'correct':>11} {'wrong':>6} {'missed':>7} {'strangers accepted':>19}"


def score_door(appearances: Sequence[Walk], verdicts: Sequence[Verdict]) -> DoorScore:
    """Score `verdicts` against `appearances` (see the module docstring)."""
    named: list[set[str]] = [set() for _ in appearances]
    decisions = [0] * len(appearances)
    unattributed = unattributed_named = 0
    for v in verdicts:
        if v.appearance is None:
            unattributed += 1
            unattributed_named += v.person_id is not None
            continue
        if not 0 <= v.appearance < len(appearances):
            raise DoorScoreError(f"a verdict names appearance {v.appearance}; the video has {len(appearances)}")
        decisions[v.appearance] += 1
        if v.person_id is not None:
            named[v.appearance].add(v.person_id)
    outcomes = []
    for i, walk in enumerate(appearances):
        names = named[i]
        outcome: Outcome
        if walk.kind == "stranger":
            outcome = "accepted" if names else "rejected"
        elif names - {walk.person}:
            outcome = "wrong"
        elif names:
            outcome = "correct"
        else:
            outcome = "missed"
        outcomes.append(
            AppearanceOutcome(i, walk.person, walk.kind, outcome, tuple(sorted(names)), decisions[i], walk.note)
        )
    count = {o: sum(1 for x in outcomes if x.outcome == o) for o in ("correct", "wrong", "missed", "accepted")}
    return DoorScore(
        walk_ins=sum(1 for w in appearances if w.kind == "walk-in"),
        correct=count["correct"],
        wrong=count["wrong"],
        missed=count["missed"],
        strangers=sum(1 for w in appearances if w.kind == "stranger"),
        strangers_accepted=count["accepted"],
        unattributed=unattributed,
        unattributed_named=unattributed_named,
        outcomes=tuple(outcomes),
    )
