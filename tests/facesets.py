"""Where the tests find faces: the one place that knows.

- The test face set ships with the repository (MIT photos; tests/data/faces/NOTICE.md): the demo people of
  `edge_agent/devtools/demo_people/` plus `tests/data/faces/`, 22 people, 79 photos. Every test that needs real
  faces uses it, so the suite's verdict never depends on data outside the clone. `photos(person)` lists one
  person's photos; the `test_faces` fixture (tests/conftest.py) is the whole set as one folder per person.
- The development sets in ../shared/data (the 27-person set and lfw-dev, never committed or shipped) are for
  tests marked `evaluation`, which run where they are present (CI has them) and are deselected, not skipped,
  where they are not (a clone on its own). $FACEATTEND_SHARED points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACE_ROOTS = (REPO / "edge_agent" / "devtools" / "demo_people", REPO / "tests" / "data" / "faces")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

SHARED = Path(os.environ.get("FACEATTEND_SHARED") or REPO.parent / "shared")
DEV_FACES = SHARED / "data" / "faces"
LFW_DEV = SHARED / "data" / "lfw-dev"
REFERENCE_EVAL = SHARED / "eval"


def people() -> list[str]:
    """Everyone in the test face set, sorted."""
    return sorted({d.name for root in FACE_ROOTS for d in root.iterdir() if d.is_dir()})


def photos(person: str) -> list[Path]:
    """One person's photos across both folders, sorted by file name."""
    found = [p for root in FACE_ROOTS for p in (root / person).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise LookupError(f"{person} is not in the test face set")
    return sorted(found, key=lambda p: p.name)


def build_face_folder(dest: Path) -> Path:
    """The test face set as one folder per person (symbolic links), what `import` / `eval` style commands take."""
    for person in people():
        (dest / person).mkdir(parents=True, exist_ok=True)
        for photo in photos(person):
            (dest / person / photo.name).symlink_to(photo)
    return dest


def evaluation_data_present() -> bool:
    return DEV_FACES.is_dir() and LFW_DEV.is_dir() and REFERENCE_EVAL.is_dir()
