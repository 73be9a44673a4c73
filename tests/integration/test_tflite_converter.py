"""Our TFLite -> ONNX converter against Google's own runtime (LiteRT, `ai-edge-litert`) executing the .tflite, on
real aligned chips of the test faces; deterministic output; malformed and unsupported models refused."""

from __future__ import annotations

import hashlib

import facesets
import numpy as np
import onnx
import pytest

from models.errors import ModelFormatError
from models.face.alignment import Aligner
from models.face.detector import RetinaFaceDetector
from models.face.encoders import MOBILEFACENET_192, encoder_onnx_path
from models.face.tflite_onnx import CONVERTER_VERSION, convert_tflite_bytes
from models.imageio import load_image
from models.npm_package import member_bytes
from models.registry import NpmFile

SOURCE = MOBILEFACENET_192.manifest.source
assert isinstance(SOURCE, NpmFile)
PROLOGUE = MOBILEFACENET_192.prologue
assert PROLOGUE is not None


@pytest.fixture(scope="module")
def tflite_model(mobilefacenet_tarball: bytes) -> bytes:
    return member_bytes(SOURCE, mobilefacenet_tarball)


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    """ArcFace-aligned 112x112 chips of the largest face of every test photo (RetinaFace landmarks)."""
    detector = RetinaFaceDetector.create(threads=2)
    aligner = Aligner("arcface112")
    out = []
    try:
        for person in facesets.people():
            for photo in facesets.photos(person):
                image = load_image(photo)
                faces = detector.detect(image)
                if faces:
                    out.append(aligner.align(image, [max(faces, key=lambda f: f.width * f.height)])[0])
    finally:
        detector.close()
    assert len(out) >= 70
    return np.stack(out)


def litert_embeddings(model: bytes, chips: np.ndarray) -> np.ndarray:
    """LiteRT running the .tflite as shipped: its input is fixed at a batch of 2, normalised as the network expects."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=2)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    batch = int(inp["shape"][0])
    x = (chips.astype(np.float32) - PROLOGUE.mean) * np.float32(PROLOGUE.scale)
    padded = np.concatenate([x, np.zeros((-len(x) % batch, *x.shape[1:]), np.float32)])
    rows = []
    for start in range(0, len(padded), batch):
        interpreter.set_tensor(inp["index"], padded[start : start + batch])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"]).copy())
    return np.concatenate(rows)[: len(chips)]


def onnx_embeddings(model: bytes, chips: np.ndarray) -> np.ndarray:
    from models.backends import create_backend

    with create_backend("onnxruntime", model, label="converted", threads=2) as backend:
        return backend.run(np.ascontiguousarray(chips.transpose(0, 3, 1, 2), dtype=np.float32))[0]


def test_the_converted_graph_computes_what_litert_computes(tflite_model: bytes, chips: np.ndarray) -> None:
    converted = convert_tflite_bytes(tflite_model, PROLOGUE)
    ours, reference = onnx_embeddings(converted, chips), litert_embeddings(tflite_model, chips)
    assert ours.shape == reference.shape == (len(chips), 192)
    worst = float(np.abs(ours - reference).max())
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"\n{len(chips)} real chips: max |ONNX - LiteRT| {worst:.2e} (largest value {np.abs(reference).max():.1f}), "
          f"min cosine {cosine.min():.8f}")  # fmt: skip
    assert worst < 1e-4 * float(np.abs(reference).max()) and cosine.min() > 0.999999
    # and on chips the detector never produces: uniform noise, black, white (dynamic batch of 5)
    rng = np.random.default_rng(3)
    odd = np.concatenate(
        [rng.integers(0, 256, (3, 112, 112, 3)), np.zeros((1, 112, 112, 3)), np.full((1, 112, 112, 3), 255)]
    )
    odd = odd.astype(np.uint8)
    assert np.abs(onnx_embeddings(converted, odd) - litert_embeddings(tflite_model, odd)).max() < 1e-3


def test_the_conversion_is_deterministic_and_is_what_the_cache_holds(mobilefacenet, tflite_model: bytes) -> None:
    first, second = convert_tflite_bytes(tflite_model, PROLOGUE), convert_tflite_bytes(tflite_model, PROLOGUE)
    assert first == second
    assert encoder_onnx_path(mobilefacenet).read_bytes() == first
    graph = onnx.load_model_from_string(first).graph
    kinds = [n.op_type for n in graph.node]
    # the 33 PReLUs TF1 wrote as five ops each are three (Relu + slope * Min(x, 0)); nothing else was rewritten
    assert kinds.count("Min") == 33 and "Abs" not in kinds and kinds.count("Conv") == 52
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["N", 3, 112, 112]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["N", 192]
    model = onnx.load_model_from_string(first)
    assert (model.producer_name, model.producer_version) == ("faceattend.tflite_onnx", str(CONVERTER_VERSION))
    print(f"\nconverted ONNX sha256 {hashlib.sha256(first).hexdigest()}, {len(first)} bytes")


def test_malformed_and_unsupported_models_are_refused(tflite_model: bytes, mobilefacenet_tarball: bytes) -> None:
    for junk in (b"", b"TFL3" + bytes(64), tflite_model[:4096], bytes(reversed(tflite_model[:200_000]))):
        with pytest.raises(ModelFormatError, match="TFLite model"):
            convert_tflite_bytes(junk, PROLOGUE)
    # another model of the same package (quantised weights, operators this converter does not map, two outputs)
    spoof = member_bytes(
        NpmFile(SOURCE.package, SOURCE.version, "", "", "android/src/main/assets/FaceAntiSpoofing.tflite"),
        mobilefacenet_tarball,
    )
    with pytest.raises(ModelFormatError, match=r"TFLite model: 1 inputs and 2 outputs, expected 1 and 1"):
        convert_tflite_bytes(spoof, PROLOGUE)
