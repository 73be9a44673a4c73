"""model-tool's style-transfer commands: stylize, train-style, export-style, bench-style, visualize-units.

torch is imported only by the commands that need it (inside the models.style modules they call); `stylize
--model` and `bench-style --model` run the exported ONNX through models/backends without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models.cli.common import EXIT_OK, emit
from models.errors import StyleError

log = logging.getLogger("model-tool")


def _write_png(path: str, image: np.ndarray) -> str:
    from models.face.drawing import write_png

    write_png(Path(path), image)
    return str(path)


def cmd_stylize(args: argparse.Namespace) -> int:
    from models.imageio import load_image
    from models.style.images import grid, load_style, resize_long_side

    content = load_image(args.content)
    if args.model is None and args.style is None:
        raise StyleError("give --style (optimiser mode) or --model (a trained network)")
    style, style_label = load_style(args.style, size=args.size) if args.style else (None, None)
    record: dict = {"content": args.content}
    if args.model:
        from models.style.runtime import Stylizer

        started = time.perf_counter()
        with Stylizer.from_onnx(args.model, args.backend, threads=args.threads, max_side=args.size) as stylizer:
            result = stylizer.stylize_rgb(resize_long_side(content, args.size))
            info = stylizer.info
            record |= {"mode": "network", "model": args.model, "style": info.style_label}
            record["undertrained"] = info.undertrained  # None: never checked (export-style of a bare checkpoint)
        record["seconds"] = round(time.perf_counter() - started, 3)
    else:
        from models.style.optimize import OptimizeConfig, stylize_optimize

        config = OptimizeConfig(
            size=args.size,
            strength=args.strength,
            method=args.method,
            iterations=args.iterations,
            tv=args.tv,
            style_scale=args.style_scale,
            threads=args.threads,
        )
        out = stylize_optimize(content, style, config, progress=not args.quiet)
        result = out.image
        record |= {
            "mode": "optimiser",
            "style": style_label,
            "method": config.method,
            "scales": list(out.scales),
            "evaluations": out.evaluations,
            "restarts": out.restarts,
            "J_start": {k: round(v, 5) for k, v in out.start.items()},
            "J_end": {k: round(v, 5) for k, v in out.end.items()},
            "seconds": round(out.seconds, 2),
        }
    record["out"] = _write_png(args.out, result)
    if args.grid:
        cells = [("content", resize_long_side(content, args.size))]
        cells += [(f"style {style_label}", style)] if style is not None else []
        record["grid"] = _write_png(args.grid, grid([*cells, ("result", result)]))
    emit(record)
    return EXIT_OK


def _transformer_config(args: argparse.Namespace):
    from models.style.transformer import TransformerConfig

    return TransformerConfig(width=args.width, residual_blocks=args.residual_blocks)


def _mean_losses(rows: list[tuple[int, float, float, float]]) -> dict[str, float] | None:
    """Mean J and style loss over some (iteration, J, content, style) history rows; None without any."""
    if not rows:
        return None
    return {"J": float(np.mean([h[1] for h in rows])), "style": float(np.mean([h[3] for h in rows]))}


def cmd_train_style(args: argparse.Namespace) -> int:
    from models.style.images import grid, load_style
    from models.style.train import TrainConfig, heldout_report, load_contents, split_holdout, train_style

    config = TrainConfig(
        size=args.size,
        batch_size=args.batch_size,
        iterations=args.iterations,
        lr=args.lr,
        strength=args.strength,
        tv=args.tv,
        style_size=args.style_size,
        holdout=args.holdout,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
        seed=args.seed,
        device=args.device,
        transformer=_transformer_config(args),
    )
    style, label = load_style(args.style, size=args.style_size)
    contents = load_contents(args.content_dir, with_samples=args.skimage_samples, max_side=2 * args.size)
    train_items, heldout = split_holdout(contents, config.holdout, config.seed)
    log.info("%d training images, %d held out", len(train_items), len(heldout))
    result = train_style(
        config, style, label, train_items, Path(args.checkpoint), resume=args.resume, progress=not args.quiet
    )
    history = result.state.history
    window = max(1, len(history) // 10)
    record: dict = {
        "style": label,
        "checkpoint": args.checkpoint,
        "iterations": result.state.iteration,
        "iterations_run": result.iterations_run,
        "seconds": round(result.seconds, 1),
        "training_images": len(train_items),
        "heldout_images": len(heldout),
        "loss_first": _mean_losses(history[:window]),
        "loss_last": _mean_losses(history[-window:]),
    }
    report = None
    if args.check_iterations > 0 and heldout:
        report = heldout_report(
            result.model,
            style,
            result.state.weights,
            heldout,
            size=args.check_size,
            style_size=args.style_size,
            optimizer_iterations=args.check_iterations,
            threads=args.threads,
            progress=not args.quiet,
        )
        record["heldout"] = report.to_json()
        print(f"model-tool: {report.verdict()}", file=sys.stderr)
        if args.grid:
            cells = [
                cell
                for c, ours, theirs in report.examples
                for cell in (("content", c), ("network", ours), ("optimiser", theirs))
            ]
            record["grid"] = _write_png(args.grid, grid(cells, columns=3))
    if args.onnx:
        from models.style.export import export_checkpoint

        export_checkpoint(args.checkpoint, args.onnx, report)
        record["onnx"] = args.onnx
    emit(record)
    return EXIT_OK


def cmd_export_style(args: argparse.Namespace) -> int:
    from models.style.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out)
    emit({"checkpoint": args.checkpoint, "onnx": args.out} | info.to_json())
    return EXIT_OK


def _bench_image(size: int) -> tuple[np.ndarray, str]:
    import cv2

    try:
        from skimage import data

        image, name = np.ascontiguousarray(data.astronaut()[:, :, :3]), "skimage astronaut"
    except ImportError:
        from models.style.procedural import make_style

        image, name = make_style("swirl", size), "procedural swirl"
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA), name


def cmd_bench_style(args: argparse.Namespace) -> int:
    from models.style.runtime import Stylizer

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:  # timing needs only the architecture: an untrained network of the default shape
            from models.style.export import export_onnx
            from models.style.runtime import StyleModelInfo
            from models.style.transformer import TransformerNet

            config = _transformer_config(args)
            model = str(Path(tmp) / "untrained.onnx")
            info = StyleModelInfo("untrained (architecture only)", "", 0, config.to_json(), {})
            Path(model).write_bytes(export_onnx(TransformerNet(config), info))
        image, image_name = _bench_image(args.size)
        stylizer = Stylizer.from_onnx(
            model, args.backend, threads=args.threads, max_side=args.size, precision=args.precision
        )
        with stylizer:
            for _ in range(2):  # warm-up: first runs pay for allocations (and TensorRT's lazy init)
                stylizer.stylize_rgb(image)
            times = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                stylizer.stylize_rgb(image)
                times.append((time.perf_counter() - started) * 1e3)
            info = stylizer.info
    emit(
        {
            "model": args.model or "untrained network (default architecture)",
            "transformer": info.transformer,
            "backend": args.backend,
            "precision": args.precision if args.backend == "tensorrt" else "fp32",
            "threads": args.threads,
            "image": f"{image_name}, {args.size}x{args.size}",
            "rounds": args.rounds,
            "ms_median": round(float(np.median(times)), 1),
            "ms_min": round(float(np.min(times)), 1),
        }
    )
    return EXIT_OK


def cmd_visualize_units(args: argparse.Namespace) -> int:
    from models.style.visualize import visualize_units

    image, found, rf = visualize_units(
        args.model,
        args.layer,
        args.images,
        units=args.units,
        size=args.size,
        limit=args.limit,
        threads=args.threads,
        progress=not args.quiet,
    )
    emit(
        {
            "model": args.model,
            "layer": args.layer,
            "receptive_field_px": rf.size,
            "stride_px": rf.jump,
            "out": _write_png(args.out, image),
            "units": [{"unit": u.unit, "max": round(u.activations[0], 4), "top_image": u.sources[0]} for u in found],
        }
    )
    return EXIT_OK


# ---- argument parsing -----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=1, help="torch / ONNX Runtime threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_architecture(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=_positive_int, default=16, help="transformer channels after the first conv")
    p.add_argument("--residual-blocks", type=int, default=5)


def add_style_commands(sub: argparse._SubParsersAction) -> None:
    from models.style.optimize import DEFAULT_STRENGTH
    from models.style.procedural import STYLES

    style_help = f"style image path, or procedural:NAME[:SEED] (NAME: {', '.join(STYLES)}) made without files"

    p = sub.add_parser("stylize", help="neural style transfer of one image (optimiser mode, or a trained --model)")
    p.add_argument("--content", required=True, help="content image")
    p.add_argument("--style", help=style_help)
    p.add_argument("--model", help="a trained network (ONNX from train-style / export-style) instead of optimising")
    p.add_argument("--out", required=True, help="result PNG")
    p.add_argument("--grid", help="also write a PNG grid: content, style, result")
    p.add_argument("--size", type=_positive_int, default=256, help="long side of the result (default 256)")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="style strength (calibrated beta)")
    p.add_argument("--method", choices=("lbfgs", "adam"), default="lbfgs")
    p.add_argument("--iterations", type=_positive_int, default=300, help="cost evaluations per scale")
    p.add_argument("--tv", type=float, default=0.0, help="total-variation weight")
    p.add_argument("--style-scale", type=float, default=1.0, help="style image size relative to the content")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"), help="with --model")
    _add_common(p)
    p.set_defaults(func=cmd_stylize)

    p = sub.add_parser("train-style", help="train the feed-forward network for one style (checkpoints, resume)")
    p.add_argument("--style", required=True, help=style_help)
    p.add_argument("--content-dir", action="append", default=[], help="folder of content photos (repeatable)")
    p.add_argument("--skimage-samples", action="store_true", help="add scikit-image's sample photos")
    p.add_argument("--checkpoint", default="style.ckpt", help="checkpoint file (written, or resumed)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint if it exists")
    p.add_argument("--onnx", help="export the trained network here (with the held-out verdict in its metadata)")
    p.add_argument("--grid", help="PNG of the held-out images: content, network, optimiser")
    p.add_argument("--size", type=_positive_int, default=256, help="training crop side (multiple of 4)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--iterations", type=_positive_int, default=2000, help="total iterations (a resumed run too)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    p.add_argument("--tv", type=float, default=0.0)
    p.add_argument("--style-size", type=_positive_int, default=512, help="long side of the style image")
    p.add_argument("--holdout", type=int, default=4, help="content images kept out for the held-out check")
    p.add_argument("--check-iterations", type=int, default=150, help="optimiser evaluations per held-out image")
    p.add_argument("--check-size", type=_positive_int, default=256, help="held-out check image size")
    p.add_argument("--checkpoint-every", type=_positive_int, default=100)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    _add_architecture(p)
    _add_common(p)
    p.set_defaults(func=cmd_train_style)

    p = sub.add_parser("export-style", help="a train-style checkpoint as ONNX (dynamic N, H, W)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="ONNX file")
    p.set_defaults(func=cmd_export_style)

    p = sub.add_parser("bench-style", help="ms per image of the feed-forward network (default 512x512)")
    p.add_argument("--model", help="ONNX style model (default: an untrained network of the chosen architecture)")
    p.add_argument("--size", type=_positive_int, default=512)
    p.add_argument("--rounds", type=_positive_int, default=10)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32"), help="TensorRT only")
    _add_architecture(p)
    _add_common(p)
    p.set_defaults(func=cmd_bench_style)

    p = sub.add_parser("visualize-units", help="the image patches that excite a layer's first units most (PNG)")
    p.add_argument("--model", choices=("style", "face"), default="style")
    p.add_argument("--layer", required=True, help="e.g. features.0, features.7.conv.0 (style); l2_relu (face)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="PNG grid")
    p.add_argument("--units", type=_positive_int, default=9, help="how many units (the first N)")
    p.add_argument("--size", type=_positive_int, default=224, help="style network input long side")
    p.add_argument("--limit", type=_positive_int, help="at most this many images")
    _add_common(p)
    p.set_defaults(func=cmd_visualize_units)
