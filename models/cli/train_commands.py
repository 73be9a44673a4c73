"""model-tool commands that learn from a site's own faces: calibrate, train-adapter, train-verifier.

Registered by ``model_tool.build_parser``. Library errors (bad dataset, too few identities, a corrupt image, a bad
rate, a refused adapter) reach ``model_tool.main`` as typed exceptions and become a message and exit code 2.
torch is imported only when train-adapter runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.cli.common import EXIT_OK, add_pipeline_args, encoder_from_args, pipeline_from_args, progress_bar

if TYPE_CHECKING:
    from models.evaluation.scoring import EvaluationReport
    from models.training.dataset import LabelledEmbeddings
    from models.training.site_adapter import AdapterConfig


def _embed(args: argparse.Namespace, root: Path) -> LabelledEmbeddings:
    from models.training.dataset import embed_dataset, scan_dataset

    total = sum(len(v) for v in scan_dataset(root).values())  # a bad folder fails here, before models load
    pipe = pipeline_from_args(args)
    try:
        return embed_dataset(
            root, pipe, progress=progress_bar(total, "embed", not args.quiet), use_cache=not args.no_cache
        )
    finally:
        pipe.close()


def _figures(reports: Sequence[EvaluationReport]) -> str:
    """The headline figures (those the adapter verdict rests on), one column per system."""
    from models.training.adapter import HEADLINE

    width = max(len(name) for name, _ in HEADLINE) + 2
    lines = [f"{'':<{width}}" + "".join(f"{r.system:>26}" for r in reports)]
    for name, figure in HEADLINE:
        cells = [figure(r) for r in reports]
        lines.append(f"{name:<{width}}" + "".join(f"{'-' if c is None else f'{c:.3f}':>26}" for c in cells))
    n = reports[0]
    sets = next(s for s in n.stranger_sets if s.name == "loo_all")
    lines.append(
        f"({n.verification.n_genuine} genuine / {n.verification.n_impostor} impostor pairs, {n.n_mates} mates, "
        f"{sets.n_strangers} leave-one-identity-out strangers)"
    )
    return "\n".join(lines)


# ---- calibrate ---------------------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    from models.cache import atomic_write_bytes
    from models.training.calibration import (
        CalibrationSettings,
        calibrate_open_set,
        calibrate_pairs,
        check_target,
        decision_fragment,
        pair_scores,
    )
    from models.training.plots import HistogramPanel, plot_histograms

    far = check_target("--far", args.far)
    settings = CalibrationSettings(n_bootstrap=args.bootstrap, level=args.level, seed=args.seed)
    root = Path(args.dataset)
    spec, _ = encoder_from_args(args)
    data = _embed(args, root)
    scores = pair_scores(data)
    calibrations = [
        calibrate_pairs(scores, far, settings),
        calibrate_open_set(data, spec.rule("margin"), far, settings),  # capped at the encoder's loose distance
        calibrate_open_set(data, spec.rule("ratio"), far, settings),
    ]
    fragment = decision_fragment(
        calibrations, args.rule, fingerprint=data.fingerprint, source=f"model-tool calibrate {root} --far {far:g}"
    )
    sys.stdout.write(fragment)
    if args.out:
        atomic_write_bytes(Path(args.out), fragment.encode("utf-8"))
        print(f"decision fragment: {args.out}", file=sys.stderr)
    if args.json:
        summary = {
            "fingerprint": data.fingerprint,
            "dataset": str(root),
            "images": len(data),
            "identities": len(data.identities),
            "no_face": list(data.missing),
            "calibrations": [c.to_dict() for c in calibrations],
        }
        atomic_write_bytes(Path(args.json), (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    if args.plot:
        distance = calibrations[0]
        iv = distance.threshold_interval
        panel = HistogramPanel(
            f"{len(data)} images, {len(data.identities)} identities",
            scores.genuine,
            scores.impostor,
            marks={f"threshold @ FAR {far:g}": distance.rule.threshold},
            band=None if iv is None else (iv.low, iv.high),
        )
        plot_histograms([panel], args.plot)
        print(f"distance histograms: {args.plot}", file=sys.stderr)
    return EXIT_OK


# ---- train-adapter -----------------------------------------------------------------------------------------------

_TRAIN_FLAGS = ("mining", "alpha", "epochs", "p", "k", "lr", "regularisation", "patience", "seed", "threads")
_ADAPTER_FLAGS = ("head", "hidden", "test_fraction", "val_fraction", "tolerance", "pairs")


def _adapter_config(args: argparse.Namespace) -> AdapterConfig:
    import importlib.util

    from models.config import load_yaml
    from models.errors import ModelError

    if importlib.util.find_spec("torch") is None:
        raise ModelError("train-adapter needs torch: pip install 'faceattend[train]' (the CPU wheel, torch==2.13.0)")
    from models.training.site_adapter import AdapterConfig

    config = load_yaml(AdapterConfig, args.config) if args.config else AdapterConfig()
    train = dataclasses.replace(
        config.train, **{k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    )
    top = {k: getattr(args, k) for k in _ADAPTER_FLAGS if getattr(args, k) is not None}
    return dataclasses.replace(config, train=train, **top)


def cmd_train_adapter(args: argparse.Namespace) -> int:
    from models.evaluation.scoring import plot_roc, write_summary
    from models.training.adapter import ship_adapter
    from models.training.calibration import pair_scores
    from models.training.plots import HistogramPanel, plot_histograms
    from models.training.site_adapter import train_site_adapter

    config = _adapter_config(args)  # a bad config fails before the models load
    root, out = Path(args.dataset), Path(args.out)
    data = _embed(args, root)
    outcome = train_site_adapter(
        data, root, config, checkpoint_dir=out / "checkpoints", progress=not args.quiet, backend=args.backend
    )
    s, t = outcome.split, outcome.training
    print(f"split (seed {s.seed}): {len(s.train)} train / {len(s.val)} validation / {len(s.test)} test identities")
    start, kept = t.history[0], t.kept
    ratio = (
        ""
        if kept.val_ratio is None
        else f", validation hardest-pair ratio {start.val_ratio:.4f} -> {kept.val_ratio:.4f}"
    )
    early = " (early stop)" if t.stopped_early else ""
    print(f"training: kept epoch {t.best_epoch} of {t.history[-1].epoch}{early}{ratio}")
    print(_figures([outcome.before, outcome.after]))
    print(f"verdict: {'SHIP' if outcome.verdict.ship else 'REFUSE'}: {outcome.verdict.reason()}")
    meta = {
        "fingerprint": data.fingerprint,
        "adapter_fingerprint": outcome.manifest.fingerprint,
        "dataset": str(root),
        "config": dataclasses.asdict(config),
        "split": dataclasses.asdict(s),
        "training": t.to_dict(),
        "verdict": outcome.verdict.to_dict(),
    }
    write_summary([outcome.before, outcome.after], out / "report.json", meta=meta)
    plot_roc([outcome.before, outcome.after], out / "roc.png")
    before, after = pair_scores(outcome.test_before), pair_scores(outcome.test_after)
    plot_histograms(
        [
            HistogramPanel(
                "held-out people, encoder",
                before.genuine,
                before.impostor,
                marks={"eval threshold @ FAR 1e-3": outcome.before.verification.recommended},
            ),
            HistogramPanel(
                "held-out people, encoder + adapter",
                after.genuine,
                after.impostor,
                marks={"eval threshold @ FAR 1e-3": outcome.after.verification.recommended},
            ),
        ],
        out / "histograms.png",
    )
    print(f"report: {out / 'report.json'}, plots: {out / 'roc.png'}, {out / 'histograms.png'}")
    ship_adapter(out, outcome.onnx, outcome.manifest, outcome.verdict)  # raises AdapterRejectedError on REFUSE
    print(f"adapter: {out / 'adapter.onnx'}, fingerprint {outcome.manifest.fingerprint}")
    return EXIT_OK


# ---- train-verifier ----------------------------------------------------------------------------------------------


def cmd_train_verifier(args: argparse.Namespace) -> int:
    from models.evaluation.scoring import plot_roc, write_summary
    from models.training.calibration import check_target
    from models.training.site_verifier import compare_verifiers
    from models.training.verifier import save_verifier

    far = check_target("--far", args.far)
    root, out = Path(args.dataset), Path(args.out)
    data = _embed(args, root)
    cmp = compare_verifiers(
        data,
        root,
        target_far=far,
        test_fraction=args.test_fraction,
        l2=args.l2,
        pairs=args.pairs,
        seed=args.seed,
        backend=args.backend,
    )
    s = cmp.split
    print(f"split (seed {s.seed}): {len(s.train)} train / {len(s.test)} test identities")
    reports = [cmp.baseline, *(c.report for c in cmp.candidates.values())]
    print(_figures(reports))
    held_out = cmp.baseline_calibration.point
    print(f"all pairs of the held-out people ({held_out.n_mates} genuine / {held_out.n_strangers} impostor):")
    rows = [
        ("distance", cmp.baseline_calibration),
        *((f"verifier {f}", v.calibration) for f, v in cmp.candidates.items()),
    ]
    for name, c in rows:
        t, r = c.threshold_interval, c.rate_interval
        ci = (
            ""
            if t is None or r is None
            else f"; {t.level:.0%} intervals [{t.low:.4f}, {t.high:.4f}], [{r.low:.3f}, {r.high:.3f}]"
        )
        print(f"  {name}: threshold {c.rule.threshold:.4f} at FAR {far:g}, TAR {c.point.dir:.3f}{ci}")
    for form, c in cmp.candidates.items():
        fit = c.fit
        print(f"verifier {form}: {fit.iterations} Newton steps on {fit.n_genuine} + {fit.n_impostor} training pairs")
    chosen = cmp.candidates[args.form]
    meta = {
        "fingerprint": data.fingerprint,
        "dataset": str(root),
        "split": dataclasses.asdict(s),
        "verifiers": {
            form: {"manifest": dataclasses.asdict(c.manifest), "calibration": c.calibration.to_dict()}
            for form, c in cmp.candidates.items()
        },
    }
    write_summary(reports, out / "report.json", meta=meta)
    plot_roc(reports, out / "roc.png")
    save_verifier(out, chosen.onnx, chosen.manifest)
    print(f"verifier ({args.form}): {out / 'verifier.onnx'}; report: {out / 'report.json'}, ROC: {out / 'roc.png'}")
    return EXIT_OK


# ---- argument parsing --------------------------------------------------------------------------------------------


def add_training_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("dataset", help="folder with one sub-folder of images per identity")
        p.add_argument("--no-cache", action="store_true", help="embed again even when cached embeddings exist")
        add_pipeline_args(p)

    p = sub.add_parser("calibrate", help="decision thresholds for a target FAR, with bootstrap intervals (YAML)")
    common(p)
    p.add_argument("--far", type=float, required=True, help="target false accept rate, e.g. 1e-3")
    p.add_argument("--rule", choices=("distance", "margin", "ratio"), default="distance", help="the rule to write")
    p.add_argument("--out", default="decision.yaml", help="write the YAML fragment here (default decision.yaml)")
    p.add_argument("--json", help="also write every rule's figures and intervals as JSON")
    p.add_argument("--plot", default="calibration.png", help="genuine / impostor histograms (PNG)")
    p.add_argument("--bootstrap", type=int, default=1000, help="identity resamples for the intervals (0: none)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("train-adapter", help="triplet-loss adapter on the encoder; ships only if held-out people gain")
    common(p)
    p.add_argument("--out", required=True, help="folder for the adapter, checkpoints, report and plots")
    p.add_argument("--config", help="YAML with AdapterConfig keys (models/training/site_adapter.py); flags override")
    p.add_argument("--head", choices=("linear", "mlp"))
    p.add_argument("--hidden", type=int)
    p.add_argument("--mining", choices=("batch-hard", "semi-hard"))
    p.add_argument("--alpha", type=float, help="triplet margin (squared distance)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--p", type=int, help="identities per batch")
    p.add_argument("--k", type=int, help="images per identity in a batch")
    p.add_argument("--lr", type=float)
    p.add_argument("--regularisation", type=float, help="weight of the distance from the identity map")
    p.add_argument("--patience", type=int, help="early stopping: epochs without validation improvement")
    p.add_argument("--seed", type=int)
    p.add_argument("--train-threads", dest="threads", type=int, help="torch threads (default 1)")
    p.add_argument("--test-fraction", type=float, help="identities held out for the before / after evaluation")
    p.add_argument("--val-fraction", type=float, help="of the rest, identities for early stopping")
    p.add_argument("--tolerance", type=float, help="a held-out figure may drop by this much (default 0)")
    p.add_argument("--pairs", type=int, help="protocol pairs on the held-out people (each kind, at most)")
    p.set_defaults(func=cmd_train_adapter)

    p = sub.add_parser("train-verifier", help="siamese verifier (both forms) vs the distance threshold, held out")
    common(p)
    p.add_argument("--out", required=True, help="folder for the verifier, report and ROC plot")
    p.add_argument("--form", choices=("abs", "chi2"), default="abs", help="the form to save")
    p.add_argument("--far", type=float, default=1e-3, help="FAR of the verifier's saved threshold")
    p.add_argument("--l2", type=float, default=1e-1, help="L2 penalty on the standardised weights (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_verifier)
