"""Our whole pipeline (RetinaFace -> dlib5 alignment -> converted encoder) against dlib's own, on real photos."""

from pathlib import Path

import facesets
import numpy as np
import pytest

from models.face.pipeline import FacePipeline, PipelineConfig


@pytest.fixture(scope="module")
def sample() -> list[Path]:
    """Two photos of every person of the test face set (the one of a single-photo person): 40-odd faces."""
    return [p for person in facesets.people() for p in facesets.photos(person)[:2]]


def _fit(method: str, images: list[Path]):
    from models.face.template_fit import DlibReference, fit_alignment, pair_faces

    pipe = FacePipeline.create(PipelineConfig(alignment=method))
    paired, n, skipped = pair_faces(images, pipe, DlibReference())
    return fit_alignment(paired, n, skipped)


def test_dlib5_embeddings_are_close_to_dlibs_full_pipeline(sample):
    fit = _fit("dlib5", sample)
    assert fit.faces >= 0.9 * len(sample)
    # dlib's same-person threshold is 0.6; a 1 px shift of dlib's own chip already moves an embedding by ~0.07
    assert float(np.median(fit.distances)) < 0.07
    assert float(np.percentile(fit.distances, 90)) < 0.15


def test_template_alignment_is_the_cruder_approximation(sample):
    fit = _fit("template", sample)
    median = float(np.median(fit.distances))
    assert 0.07 < median < 0.25
    # the fitted template agrees with the shipped one (fitted on the development set) within the landmark spread
    from models.face.alignment import TEMPLATE

    assert (np.linalg.norm(fit.template - TEMPLATE, axis=1) < fit.spread_px).all()
