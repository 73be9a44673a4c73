"""The trained network as ONNX: input `image` (N x 3 x H x W, RGB 0..1, H and W multiples of 4, all dynamic),
output `stylized` (same shape, RGB 0..1). What the model is (style, training, the held-out verdict) travels in
the ONNX metadata under `faceattend.style`, read back by models/style/runtime.py without torch.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import torch

from models.cache import atomic_write_bytes
from models.style.runtime import INPUT_NAME, METADATA_KEY, OUTPUT_NAME, StyleModelInfo
from models.style.train import HeldoutReport, load_checkpoint, model_from_checkpoint
from models.style.transformer import TransformerNet

log = logging.getLogger(__name__)

OPSET = 17


def export_onnx(model: TransformerNet, info: StyleModelInfo) -> bytes:
    import onnx

    model = model.cpu().eval()
    buf = io.BytesIO()
    dynamic = {0: "N", 2: "H", 3: "W"}
    with warnings.catch_warnings():  # the TorchScript exporter's notes on constant folding and instance norm
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(1, 3, 64, 64),),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load_from_string(buf.getvalue())
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info.to_json(), sort_keys=True)
    graph.producer_name = "faceattend"
    return graph.SerializeToString()


def export_checkpoint(checkpoint: str | Path, out: str | Path, heldout: HeldoutReport | None = None) -> StyleModelInfo:
    """Write the checkpoint's network to `out` as ONNX; returns what went into its metadata."""
    data = load_checkpoint(checkpoint)
    model = model_from_checkpoint(data)
    info = StyleModelInfo(
        style_label=str(data["style"]["label"]),
        style_sha256=str(data["style"]["sha256"]),
        iterations=int(data["iteration"]),
        transformer=dict(data["transformer"]),
        weights=dict(data["weights"]),
        heldout=heldout.to_json() if heldout else None,
    )
    atomic_write_bytes(Path(out), export_onnx(model, info))
    log.info("exported %s -> %s", checkpoint, out)
    return info
