"""Hand-made detections for tracker / recognizer tests: a square face box with plausible 5-point landmarks."""

from __future__ import annotations

from models.types import Detection


def det(x: float, y: float = 100.0, size: float = 100.0, score: float = 0.99) -> Detection:
    """A face box of `size` px with its top-left corner at (x, y)."""
    s = size
    return Detection(
        bbox=(x, y, x + s, y + s),
        score=score,
        landmarks=(
            (x + 0.3 * s, y + 0.4 * s),
            (x + 0.7 * s, y + 0.4 * s),
            (x + 0.5 * s, y + 0.6 * s),
            (x + 0.35 * s, y + 0.8 * s),
            (x + 0.65 * s, y + 0.8 * s),
        ),
    )
