"""P identities x K images per batch (FaceNet's sampling): every batch holds positives and negatives to mine."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike, NDArray

from models.errors import ConfigError, DatasetError
from models.training.dataset import MIN_IMAGES


class PKSampler:
    """Batches of row indices: ``p`` identities, up to ``k`` images of each (all of them when fewer).

    One epoch visits every identity with two or more images once, in a random order; identities with a single
    image cannot be anchors and are left out. A last group of one identity joins the previous batch (a batch needs
    two identities to hold a negative). Deterministic for a given generator state.
    """

    def __init__(self, labels: ArrayLike, p: int, k: int, rng: np.random.Generator) -> None:
        if p < 2 or k < 2:
            raise ConfigError(f"a P x K batch needs p >= 2 identities and k >= 2 images, got p={p}, k={k}")
        codes = np.asarray(labels)
        self._rows = [np.flatnonzero(codes == c) for c in np.unique(codes)]
        self._rows = [r for r in self._rows if r.size >= MIN_IMAGES]
        if len(self._rows) < 2:
            raise DatasetError(
                f"too few identities to train on: {len(self._rows)} with >= {MIN_IMAGES} images, at least 2 needed"
            )
        self._p, self._k, self._rng = p, k, rng

    def __len__(self) -> int:
        """Batches per epoch."""
        full, last = divmod(len(self._rows), self._p)
        return full + (1 if last > 1 or full == 0 else 0)

    def epoch(self) -> Iterator[NDArray[np.int64]]:
        order = self._rng.permutation(len(self._rows))
        groups = [order[s : s + self._p] for s in range(0, order.size, self._p)]
        if len(groups) > 1 and groups[-1].size == 1:
            last = groups.pop()
            groups[-1] = np.concatenate([groups[-1], last])
        for group in groups:
            picks = [
                self._rng.choice(self._rows[g], size=min(self._k, self._rows[g].size), replace=False) for g in group
            ]
            yield np.concatenate(picks).astype(np.int64)
