"""What the model-tool command modules share: exit codes, JSON-lines output, the pipeline and its arguments,
progress bars. Its own module so that model_tool (the parser) and the command modules it registers import it,
not each other."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

EXIT_OK, EXIT_PARTIAL, EXIT_FATAL, EXIT_UNAVAILABLE = 0, 1, 2, 3


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def encoder_from_args(args: argparse.Namespace):
    """The EncoderSpec and alignment method --encoder / --alignment / --accept-licence choose (ConfigError naming
    the flag when they do not go together)."""
    from models.face.encoders import check_choice

    return check_choice(args.encoder, args.alignment, args.accept_licence, lambda f: "--" + f.replace("_", "-"))


def pipeline_from_args(args: argparse.Namespace):
    from models.face.detector import DetectorConfig
    from models.face.pipeline import FacePipeline, PipelineConfig

    spec, method = encoder_from_args(args)
    det = DetectorConfig(max_side=args.max_side, score_threshold=args.score_threshold)
    return FacePipeline.create(
        PipelineConfig(
            backend=args.backend,
            threads=args.threads,
            encoder=spec.name,
            accept_licence=args.accept_licence,
            alignment=method,
            detector=det,
        )
    )


def progress_bar(total: int, desc: str, enabled: bool = True) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled or total < 2, leave=False)

    def step(n: int = 1) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return step


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: runtime's choice)")
    p.add_argument("--max-side", type=int, default=640, help="detector input long-side cap in pixels")
    p.add_argument("--score-threshold", type=float, default=0.7, help="detector confidence threshold")
    add_encoder_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    from models.face.encoders import DEFAULT_ENCODER, ENCODERS

    p.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        choices=tuple(ENCODERS),
        help=f"face encoder (default {DEFAULT_ENCODER}; `model-tool inspect` shows each one's licence)",
    )
    p.add_argument(
        "--accept-licence",
        default="",
        metavar="TERMS",
        help="acknowledge the licence of an encoder whose weights may not be used commercially (e.g. "
        "non-commercial-research for mobilefacenet-192)",
    )
    p.add_argument(
        "--alignment",
        default="",
        choices=("", *dict.fromkeys(m for spec in ENCODERS.values() for m in spec.alignments)),
        help="chip alignment (default: the encoder's own; see models/face/alignment.py)",
    )
