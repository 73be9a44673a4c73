"""The embedding adapter as an artefact: its weights, fingerprint, run-time application, and the shipping rule.

An adapter is a small network on the frozen encoder's embedding (``models.training.heads``), exported to ONNX
(``models.training.export``) and applied through ``models.backends`` like every other model, so edges and the
server never need torch. It changes the embedding space, so it gets its own fingerprint, derived from the base
encoder's fingerprint and the adapter ONNX's sha256: a gallery built through the adapter is refused by an edge
running the bare encoder (or another adapter), and vice versa, so gallery and edges switch together.

Shipping rule, enforced here and not left to the CLI: an adapter whose held-out people's evaluation figures
(``HEADLINE``) get worse by more than a tolerance, or improve nowhere, is refused with ``AdapterRejectedError``
and nothing is written. An adapter that changes nothing would still force every gallery and edge to switch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from models.cache import atomic_write_bytes
from models.config import load_dataclass
from models.errors import AdapterRejectedError, ConfigError, FaceAttendError, ModelError
from models.registry import sha256_bytes

if TYPE_CHECKING:
    from models.backends.base import InferenceBackend, ShapeProfile
    from models.evaluation.scoring import EvaluationReport

log = logging.getLogger(__name__)

HEAD_KINDS: Final[tuple[str, ...]] = ("linear", "mlp")
ADAPTER_ONNX: Final[str] = "adapter.onnx"
ADAPTER_MANIFEST: Final[str] = "adapter.json"
SCHEMA: Final[str] = "faceattend.adapter"
SCHEMA_VERSION: Final[int] = 1
MAX_BATCH: Final[int] = 256


@dataclass(frozen=True, eq=False)
class AdapterWeights:
    """``layers``: (weight (out, in), bias (out,)) float32 per layer; one for ``linear``, two for ``mlp`` (whose
    output is added to its input)."""

    kind: Literal["linear", "mlp"]
    layers: tuple[tuple[NDArray[np.float32], NDArray[np.float32]], ...]

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"adapter: unknown head {self.kind!r} (known: {', '.join(HEAD_KINDS)})")
        shapes = [(w.shape, b.shape) for w, b in self.layers]
        d = self.layers[0][0].shape[1] if self.layers and self.layers[0][0].ndim == 2 else -1
        if self.kind == "linear":
            ok = shapes == [((d, d), (d,))]
        else:
            h = self.layers[0][0].shape[0] if d > 0 else -1
            ok = shapes == [((h, d), (h,)), ((d, h), (d,))]
        if d < 1 or not ok:
            raise ModelError(f"adapter: {self.kind} layers of shapes {shapes} do not make a dim -> dim map")

    @property
    def dim(self) -> int:
        return int(self.layers[0][0].shape[1])


def adapter_fingerprint(base_fingerprint: str, onnx_sha256: str) -> str:
    """``<base fingerprint>+adapter-<16 hex>``: the hash covers the base and the adapter graph's sha256."""
    canonical = json.dumps({"base": base_fingerprint, "adapter_onnx_sha256": onnx_sha256}, sort_keys=True)
    return f"{base_fingerprint}+adapter-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class AdapterManifest:
    """``adapter.json``, read strictly (``models.config.load_dataclass``)."""

    schema: str
    schema_version: int
    kind: Literal["linear", "mlp"]
    dim: int
    onnx_sha256: str
    base_fingerprint: str
    fingerprint: str

    @classmethod
    def for_onnx(cls, onnx: bytes, kind: Literal["linear", "mlp"], dim: int, base_fingerprint: str) -> AdapterManifest:
        sha = sha256_bytes(onnx)
        return cls(SCHEMA, SCHEMA_VERSION, kind, dim, sha, base_fingerprint, adapter_fingerprint(base_fingerprint, sha))


def adapter_profile(dim: int, max_batch: int = MAX_BATCH) -> ShapeProfile:
    from models.backends.base import ShapeProfile

    return ShapeProfile((1, dim), (min(32, max_batch), dim), (max_batch, dim))


class EmbeddingAdapter:
    """Applies a shipped adapter to encoder embeddings through an inference backend (ONNX Runtime, TensorRT)."""

    def __init__(self, backend: InferenceBackend, manifest: AdapterManifest, max_batch: int = MAX_BATCH) -> None:
        self._backend = backend
        self.manifest = manifest
        self._max_batch = max_batch

    @classmethod
    def from_onnx(
        cls,
        onnx: bytes,
        manifest: AdapterManifest,
        *,
        backend: str = "onnxruntime",
        threads: int | None = None,
    ) -> EmbeddingAdapter:
        from models.backends import create_backend

        if sha256_bytes(onnx) != manifest.onnx_sha256:
            raise ModelError(f"adapter: ONNX sha256 {sha256_bytes(onnx)} differs from its manifest's")
        if adapter_fingerprint(manifest.base_fingerprint, manifest.onnx_sha256) != manifest.fingerprint:
            raise ModelError("adapter: the manifest's fingerprint is not derived from its base and ONNX sha256")
        engine = create_backend(
            backend, onnx, label=f"adapter-{manifest.kind}", profile=adapter_profile(manifest.dim), threads=threads
        )
        return cls(engine, manifest)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        base_fingerprint: str,
        backend: str = "onnxruntime",
        threads: int | None = None,
    ) -> EmbeddingAdapter:
        """A shipped adapter folder; refused (ModelError) unless it was trained on ``base_fingerprint``'s space."""
        folder = Path(directory)
        try:
            data = json.loads((folder / ADAPTER_MANIFEST).read_text(encoding="utf-8"))
            onnx = (folder / ADAPTER_ONNX).read_bytes()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"adapter {folder}: cannot read {ADAPTER_MANIFEST} / {ADAPTER_ONNX} ({exc})") from exc
        try:
            manifest = load_dataclass(AdapterManifest, data, ADAPTER_MANIFEST)
        except FaceAttendError as exc:
            raise ModelError(f"adapter {folder}: {exc}") from exc
        if manifest.schema != SCHEMA or manifest.schema_version != SCHEMA_VERSION:
            raise ModelError(f"adapter {folder}: schema {manifest.schema} v{manifest.schema_version} is not ours")
        if manifest.base_fingerprint != base_fingerprint:
            raise ModelError(
                f"adapter {folder} was trained on encoder fingerprint {manifest.base_fingerprint}; "
                f"this encoder is {base_fingerprint}"
            )
        return cls.from_onnx(onnx, manifest, backend=backend, threads=threads)

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def apply(self, embeddings: NDArray[np.floating]) -> NDArray[np.float32]:
        """(n, dim) encoder embeddings -> (n, dim) adapted embeddings (float32)."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.manifest.dim:
            raise ModelError(f"adapter expects (n, {self.manifest.dim}) embeddings, got {x.shape}")
        out = np.empty_like(x)
        for s in range(0, x.shape[0], self._max_batch):
            out[s : s + self._max_batch] = self._backend.run(x[s : s + self._max_batch])[0]
        return out

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> EmbeddingAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the shipping rule --------------------------------------------------------------------------------------------
def _dir(rule: str) -> Callable[[EvaluationReport], float | None]:
    def figure(report: EvaluationReport) -> float | None:
        try:
            return report.point(rule, "loo_all", 1e-2).dir
        except KeyError:  # an evaluation without that rule
            return None

    return figure


# The figures of the DESIGN.md protocol that decide; open-set DIR on the leave-one-identity-out strangers
HEADLINE: Final[tuple[tuple[str, Callable[[EvaluationReport], float | None]], ...]] = (
    ("verification accuracy", lambda r: r.reference.verif_acc),
    ("TAR @ FAR 1e-2", lambda r: r.reference.tar_far1e2),
    ("TAR @ FAR 1e-3", lambda r: r.reference.tar_far1e3),
    ("rank-1", lambda r: r.reference.rank1),
    ("DIR @ FPIR 1e-2, distance rule", _dir("distance")),
    ("DIR @ FPIR 1e-2, ratio rule", _dir("ratio")),
)


@dataclass(frozen=True)
class MetricChange:
    name: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass(frozen=True)
class AdapterVerdict:
    changes: tuple[MetricChange, ...]
    tolerance: float

    @property
    def worse(self) -> tuple[MetricChange, ...]:
        return tuple(c for c in self.changes if c.delta < -self.tolerance)

    @property
    def better(self) -> tuple[MetricChange, ...]:
        return tuple(c for c in self.changes if c.delta > self.tolerance)

    @property
    def ship(self) -> bool:
        return not self.worse and bool(self.better)

    def reason(self) -> str:
        def fmt(cs: tuple[MetricChange, ...]) -> str:
            return "; ".join(f"{c.name} {c.before:.4f} -> {c.after:.4f}" for c in cs)

        if self.worse:
            return f"the adapter makes the held-out people worse: {fmt(self.worse)}"
        if not self.better:
            return f"the adapter improves no figure on the held-out people by more than {self.tolerance:g}"
        return f"better on the held-out people: {fmt(self.better)}; nothing worse"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ship": self.ship,
            "reason": self.reason(),
            "tolerance": self.tolerance,
            "changes": [asdict(c) | {"delta": c.delta} for c in self.changes],
        }


def judge_adapter(before: EvaluationReport, after: EvaluationReport, tolerance: float = 0.0) -> AdapterVerdict:
    """Compare the held-out evaluation without and with the adapter on ``HEADLINE``'s figures."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"adapter: tolerance must be a finite number >= 0, got {tolerance!r}")
    changes = []
    for name, figure in HEADLINE:
        b, a = figure(before), figure(after)
        if b is None or a is None or not (math.isfinite(b) and math.isfinite(a)):
            log.warning("adapter verdict: %s is not measurable on this split; not compared", name)
            continue
        changes.append(MetricChange(name, float(b), float(a)))
    return AdapterVerdict(tuple(changes), float(tolerance))


def ship_adapter(directory: str | Path, onnx: bytes, manifest: AdapterManifest, verdict: AdapterVerdict) -> Path:
    """Write ``adapter.onnx`` + ``adapter.json`` into ``directory``, or raise AdapterRejectedError (nothing written)."""
    if not verdict.ship:
        raise AdapterRejectedError(f"adapter refused, not written: {verdict.reason()}")
    if sha256_bytes(onnx) != manifest.onnx_sha256:
        raise ModelError("adapter: the ONNX bytes do not match the manifest's sha256")
    folder = Path(directory)
    atomic_write_bytes(folder / ADAPTER_ONNX, onnx)
    atomic_write_bytes(folder / ADAPTER_MANIFEST, (json.dumps(asdict(manifest), indent=2) + "\n").encode())
    log.info("adapter shipped to %s, fingerprint %s", folder, manifest.fingerprint)
    return folder
