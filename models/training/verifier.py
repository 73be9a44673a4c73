"""The siamese binary verifier of the lecture notes, fitted by logistic regression, run through ONNX.

    p(same) = sigmoid(sum_k w_k |f(x_i)_k - f(x_j)_k| + b)                      (form "abs")
    p(same) = sigmoid(sum_k w_k (f(x_i)_k - f(x_j)_k)^2 / (|f(x_i)_k| + |f(x_j)_k|) + b)   (form "chi2")

The notes' chi-square form divides by f_i + f_j, which assumes non-negative features (histograms); dlib's embedding
components are signed, so that sum can vanish or turn negative. The magnitudes are used instead (the same where
both are non-negative); each term is then bounded by |f_i| + |f_j| and never blows up.

Fitting: numpy Newton iterations (IRLS) on dim + 1 parameters, features standardised (folded back into w, b), an L2
penalty on w, and genuine / impostor pairs weighted to equal total weight, since impostor pairs outnumber genuine
ones by far. Convex, deterministic, no torch.

As a decision: the matcher's rules work on distances, so the verifier provides one, the verifier distance
-ln p(same) = softplus(-logit) >= 0 (lower = more alike). A distance-rule threshold t on it accepts exactly when
p(same) >= exp(-t), and ``models.decision.rules`` / ``models.evaluation.scoring`` apply unchanged
(``evaluate(metric=...)``). With several templates per identity, the most probable template counts (the identity's
minimum distance).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from models.cache import atomic_write_bytes
from models.config import load_dataclass
from models.decision.rules import DecisionRule, Decisions, Neighbours, template_to_identity_distances
from models.errors import ConfigError, DatasetError, FaceAttendError, ModelError
from models.registry import sha256_bytes

if TYPE_CHECKING:
    from models.backends.base import InferenceBackend, ShapeProfile
    from models.training.dataset import LabelledEmbeddings

log = logging.getLogger(__name__)

FormName = Literal["abs", "chi2"]
FORMS: Final[tuple[FormName, ...]] = ("abs", "chi2")
VERIFIER_ONNX: Final[str] = "verifier.onnx"
VERIFIER_MANIFEST: Final[str] = "verifier.json"
SCHEMA: Final[str] = "faceattend.verifier"
SCHEMA_VERSION: Final[int] = 1
MAX_BATCH: Final[int] = 4096  # pairs per backend call


# keeps 0/0 out of the chi-square form where both components are exactly zero; the term is then 0
CHI2_EPS = 1e-12


def pair_features(a: ArrayLike, b: ArrayLike, form: str) -> NDArray[np.float64]:
    """The per-component features of the notes' two forms; rows over the last axis, leading axes broadcast."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if form == "abs":
        return np.abs(x - y)
    if form == "chi2":
        return (x - y) ** 2 / (np.abs(x) + np.abs(y) + CHI2_EPS)
    raise ConfigError(f"verifier: unknown form {form!r} (known: {', '.join(FORMS)})")


@dataclass(frozen=True, eq=False)
class VerifierWeights:
    form: FormName
    w: NDArray[np.float32]  # (dim,)
    b: float

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"verifier: unknown form {self.form!r} (known: {', '.join(FORMS)})")
        if self.w.ndim != 1 or self.w.size < 1 or not np.isfinite(self.w).all() or not math.isfinite(self.b):
            raise ModelError(f"verifier: weights must be a finite 1-D vector and a finite bias, got {self.w.shape}")

    @property
    def dim(self) -> int:
        return int(self.w.shape[0])


@dataclass(frozen=True)
class VerifierFit:
    weights: VerifierWeights
    iterations: int
    converged: bool
    loss: float  # the balanced, penalised log loss at the end
    n_genuine: int
    n_impostor: int


def _balanced_loss(z: NDArray[np.float64], y: NDArray[np.float64], s: NDArray[np.float64]) -> float:
    # log(1 + e^-z) for y = 1 and log(1 + e^z) for y = 0, stably
    return float(np.sum(s * np.logaddexp(0.0, np.where(y > 0, -z, z))))


def fit_verifier(
    data: LabelledEmbeddings,
    form: FormName = "abs",
    *,
    l2: float = 1e-1,
    max_impostors: int = 50_000,
    max_iter: int = 100,
    tol: float = 1e-8,
    seed: int = 0,
) -> VerifierFit:
    """Logistic regression on every genuine pair of ``data`` and (up to ``max_impostors``, drawn at random) its
    impostor pairs. ``l2`` penalises the standardised weights; the loss is a weighted mean (weights sum to 1)."""
    if form not in FORMS:
        raise ConfigError(f"verifier: unknown form {form!r} (known: {', '.join(FORMS)})")
    if not (l2 > 0 and math.isfinite(l2)):
        raise ConfigError(f"verifier: l2 must be > 0, got {l2!r}")
    codes = data.label_codes()
    i, j = np.triu_indices(len(data), 1)
    same = codes[i] == codes[j]
    gi = np.flatnonzero(same)
    ii = np.flatnonzero(~same)
    if gi.size == 0 or ii.size == 0:
        raise DatasetError(
            f"too few identities to fit a verifier: {gi.size} genuine and {ii.size} impostor pairs (needs both)"
        )
    if ii.size > max_impostors:
        ii = np.sort(np.random.default_rng(seed).choice(ii, size=max_impostors, replace=False))
    rows = np.r_[gi, ii]
    X = pair_features(data.vectors[i[rows]], data.vectors[j[rows]], form)
    y = np.r_[np.ones(gi.size), np.zeros(ii.size)]
    s = np.r_[np.full(gi.size, 0.5 / gi.size), np.full(ii.size, 0.5 / ii.size)]
    mu = (s[:, None] * X).sum(axis=0)
    sd = np.sqrt((s[:, None] * (X - mu) ** 2).sum(axis=0))
    sd = np.where(sd > 1e-12, sd, 1.0)  # a constant feature carries nothing; leave it unscaled
    Z = np.c_[(X - mu) / sd, np.ones(X.shape[0])]
    ridge = np.r_[np.full(X.shape[1], l2), 0.0]
    beta = np.zeros(Z.shape[1])

    def objective(bt: NDArray[np.float64]) -> float:
        return _balanced_loss(Z @ bt, y, s) + 0.5 * float(np.sum(ridge * bt * bt))

    current = objective(beta)
    converged, iterations = False, 0
    while iterations < max_iter:
        iterations += 1
        z = Z @ beta
        p = 1.0 / (1.0 + np.exp(-z))
        grad = Z.T @ (s * (p - y)) + ridge * beta
        hess = (Z * (s * p * (1.0 - p))[:, None]).T @ Z + np.diag(ridge + 1e-12)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while True:  # damped Newton: halve the step until the objective does not rise
            candidate = beta - scale * step
            value = objective(candidate)
            if value <= current or scale < 1e-6:
                break
            scale /= 2
        if value > current:  # no descent left at floating-point precision: this is the optimum
            converged = True
            break
        beta, current = candidate, value
        if float(np.max(np.abs(scale * step))) < tol:
            converged = True
            break
    if not converged:
        log.warning("verifier fit: not converged after %d Newton steps (loss %.6g)", iterations, current)
    w = beta[:-1] / sd
    b = float(beta[-1] - np.sum(beta[:-1] * mu / sd))
    weights = VerifierWeights(form, w.astype(np.float32), b)
    return VerifierFit(weights, iterations, converged, current, int(gi.size), int(ii.size))


@dataclass(frozen=True)
class VerifierManifest:
    """``verifier.json``, read strictly. ``threshold``: the verifier distance (-ln p) accepted at ``target_far``,
    calibrated on pairs of people the fit never saw."""

    schema: str
    schema_version: int
    form: FormName
    dim: int
    onnx_sha256: str
    base_fingerprint: str
    target_far: float
    threshold: float


def verifier_profile(dim: int) -> ShapeProfile:
    from models.backends.base import ShapeProfile

    return ShapeProfile((1, 2, dim), (256, 2, dim), (MAX_BATCH, 2, dim))


class SiameseVerifier:
    """The verifier at run time: ONNX through ``models.backends``; callable as a pair metric (verifier distance)."""

    def __init__(self, backend: InferenceBackend, dim: int) -> None:
        self._backend = backend
        self.dim = dim

    @classmethod
    def from_onnx(
        cls, onnx: bytes, dim: int, *, backend: str = "onnxruntime", threads: int | None = None
    ) -> SiameseVerifier:
        from models.backends import create_backend

        engine = create_backend(backend, onnx, label="siamese-verifier", profile=verifier_profile(dim), threads=threads)
        return cls(engine, dim)

    @classmethod
    def load(
        cls, directory: str | Path, *, base_fingerprint: str, backend: str = "onnxruntime", threads: int | None = None
    ) -> tuple[SiameseVerifier, VerifierManifest]:
        """A saved verifier and its manifest; refused (ModelError) if tampered with or trained in another space."""
        folder = Path(directory)
        try:
            data = json.loads((folder / VERIFIER_MANIFEST).read_text(encoding="utf-8"))
            onnx = (folder / VERIFIER_ONNX).read_bytes()
            manifest = load_dataclass(VerifierManifest, data, VERIFIER_MANIFEST)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, FaceAttendError) as exc:
            raise ModelError(f"verifier {folder}: cannot load it ({exc})") from exc
        if manifest.schema != SCHEMA or manifest.schema_version != SCHEMA_VERSION:
            raise ModelError(f"verifier {folder}: schema {manifest.schema} v{manifest.schema_version} is not ours")
        if sha256_bytes(onnx) != manifest.onnx_sha256:
            raise ModelError(f"verifier {folder}: {VERIFIER_ONNX} does not match the manifest's sha256")
        if manifest.base_fingerprint != base_fingerprint:
            raise ModelError(
                f"verifier {folder} was fitted on encoder fingerprint {manifest.base_fingerprint}; "
                f"this encoder is {base_fingerprint}"
            )
        return cls.from_onnx(onnx, manifest.dim, backend=backend, threads=threads), manifest

    def logit(self, a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
        """log-odds of "same person" for rows of ``a`` and ``b`` (last axis: the embedding; leading axes broadcast)."""
        x, y = np.broadcast_arrays(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
        if x.shape[-1] != self.dim:
            raise ModelError(f"verifier expects {self.dim}-d embeddings, got {x.shape}")
        lead = x.shape[:-1]
        pairs = np.stack([x.reshape(-1, self.dim), y.reshape(-1, self.dim)], axis=1)
        out = np.empty(pairs.shape[0], dtype=np.float64)
        for s in range(0, pairs.shape[0], MAX_BATCH):
            out[s : s + MAX_BATCH] = self._backend.run(pairs[s : s + MAX_BATCH])[0]
        return out.reshape(lead)

    def __call__(self, a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
        """The verifier distance -ln p(same) (NaN where an embedding is missing): a ``PairMetric``."""
        return np.logaddexp(0.0, -self.logit(a, b))

    def neighbours(self, probes: ArrayLike, gallery: ArrayLike, labels: ArrayLike) -> Neighbours:
        """Per probe, the most probable identity and the runner-up, in verifier distance."""
        p = np.atleast_2d(np.asarray(probes, dtype=np.float32))
        g = np.asarray(gallery, dtype=np.float32)
        dist, identities = template_to_identity_distances(self(p[:, None, :], g[None, :, :]), labels)
        return Neighbours.from_identity_distances(dist, identities)

    def decide(self, probes: ArrayLike, gallery: ArrayLike, labels: ArrayLike, threshold: float) -> Decisions:
        """The matcher's decision with the verifier in place of the Euclidean distance (a distance rule on -ln p)."""
        return DecisionRule.distance(threshold).decide(self.neighbours(probes, gallery, labels))

    def close(self) -> None:
        self._backend.close()


def threshold_for_probability(p_same: float) -> float:
    """The verifier-distance threshold that accepts exactly the pairs with p(same) >= ``p_same``."""
    if not 0.0 < p_same <= 1.0:
        raise ConfigError(f"verifier: a probability threshold is in (0, 1], got {p_same!r}")
    return -math.log(p_same)


def save_verifier(directory: str | Path, onnx: bytes, manifest: VerifierManifest) -> Path:
    if sha256_bytes(onnx) != manifest.onnx_sha256:
        raise ModelError("verifier: the ONNX bytes do not match the manifest's sha256")
    folder = Path(directory)
    atomic_write_bytes(folder / VERIFIER_ONNX, onnx)
    atomic_write_bytes(folder / VERIFIER_MANIFEST, (json.dumps(asdict(manifest), indent=2) + "\n").encode())
    return folder
