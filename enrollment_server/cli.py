"""enrollment-server: the admin's command line and the server process.

Exit codes: 0 done, 1 done but some photos were rejected (each with its reason; for reencode: some templates
could not be made again), 2 bad usage / invalid input / fatal error, 3 the broker could not be reached (the change
itself is stored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from enrollment_server import components as c
from enrollment_server import provisioning
from enrollment_server.config import ServerConfig, load_config
from models import extras
from models.errors import FaceAttendError, MqttError

log = logging.getLogger("enrollment-server")

EXIT_OK, EXIT_PARTIAL, EXIT_FATAL, EXIT_BROKER = 0, 1, 2, 3


def publish_gallery(cfg: ServerConfig, store, site: str, *, timeout: float = 15.0) -> dict:
    """Publish the site's current gallery once (connect, publish, wait for acks, disconnect)."""
    link = c.make_link(c.mqtt_config(cfg, f"publish-{os.getpid()}"))
    link.start()
    try:
        if not link.wait_connected(timeout):
            raise MqttError(f"broker {cfg.mqtt.url} not reachable within {timeout:.0f} s")
        published = c.make_publisher(cfg, store, link, c.signer_for(cfg, create=True)).publish(site)
    finally:
        link.stop()
    return {"site": site, "version": published.version, "templates": published.count, "people": published.people}


def _after_change(args: argparse.Namespace, cfg: ServerConfig, store, site: str) -> int:
    if args.no_publish:
        print("gallery not published (--no-publish): run `enrollment-server publish` or let the server do it")
        return EXIT_OK
    try:
        print(json.dumps({"gallery": publish_gallery(cfg, store, site, timeout=args.timeout)}))
    except MqttError as exc:
        print(f"enrollment-server: stored, but the gallery was not published: {exc}", file=sys.stderr)
        return EXIT_BROKER
    return EXIT_OK


# ---- commands -------------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, cfg: ServerConfig) -> int:
    store = c.open_store(cfg)
    store.ensure_site(args.site or cfg.site)
    signer = c.signer_for(cfg, create=True)
    print(
        json.dumps(
            {
                "database": cfg.database.url,
                "schema_version": store.schema_version(),
                "signing_key": str(cfg.gallery.signing_key),
                "public_key_b64": signer.verifier.public_b64(),
                "key_id": signer.verifier.key_id,
            }
        )
    )
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace, cfg: ServerConfig) -> int:
    site = args.site or cfg.site
    photos = []
    for p in map(Path, args.photos):
        try:
            photos.append((str(p), p.read_bytes()))
        except OSError as exc:  # a mistyped path: nothing is enrolled, the admin fixes the command line
            raise FaceAttendError(f"cannot read {p}: {exc.strerror or exc}") from exc
    store = c.open_store(cfg)
    report = c.make_enroller(cfg, store).enroll(
        args.person_id, args.name, site, photos, allow_duplicate_identity=args.allow_duplicate_identity
    )
    print(json.dumps(report.to_json()))
    code = EXIT_OK if report.added == len(photos) else EXIT_PARTIAL
    if report.added:
        code = max(code, _after_change(args, cfg, store, site))
    return code if report.added else EXIT_FATAL


def cmd_import(args: argparse.Namespace, cfg: ServerConfig) -> int:
    from tqdm import tqdm

    from enrollment_server.enrollment import import_folder, person_folders

    site = args.site or cfg.site
    root = Path(args.folder)
    total = sum(len(photos) for _, photos in person_folders(root))
    store = c.open_store(cfg)
    enroller = c.make_enroller(cfg, store)
    with tqdm(total=total, unit="photo", desc="import", file=sys.stderr, disable=args.quiet) as bar:
        reports = import_folder(
            enroller, root, site, allow_duplicate_identity=args.allow_duplicate_identity, progress=bar.update
        )
    rejected = 0
    for report in reports:
        for r in report.results:
            rejected += not r.accepted
            print(json.dumps({"person_id": report.person_id} | r.to_json()))
    added = sum(r.added for r in reports)
    print(
        json.dumps(
            {
                "summary": {
                    "people": len(reports),
                    "photos": total,
                    "added": added,
                    "rejected": rejected,
                    "people_created": sum(r.person_created for r in reports),
                }
            }
        )
    )
    code = EXIT_PARTIAL if rejected else EXIT_OK
    if added:
        code = max(code, _after_change(args, cfg, store, site))
    return code


def cmd_remove(args: argparse.Namespace, cfg: ServerConfig) -> int:
    store = c.open_store(cfg)
    site = store.get_person(args.person_id).site_id
    removed = store.remove_person(args.person_id)
    print(json.dumps({"removed": args.person_id, "templates": removed}))
    return _after_change(args, cfg, store, site)


def cmd_rename(args: argparse.Namespace, cfg: ServerConfig) -> int:
    person = c.open_store(cfg).rename_person(args.person_id, args.name)
    print(json.dumps({"person_id": person.person_id, "name": person.display_name}))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, cfg: ServerConfig) -> int:
    store = c.open_store(cfg)
    site = args.site or cfg.site
    for person in store.list_people(site):
        templates = store.count_templates(person_id=person.person_id)
        print(
            json.dumps(
                {
                    "person_id": person.person_id,
                    "name": person.display_name,
                    "site": site,
                    "active": person.active,
                    "templates": templates,
                }
            )
        )
    return EXIT_OK


def cmd_publish(args: argparse.Namespace, cfg: ServerConfig) -> int:
    args.no_publish = False
    return _after_change(args, cfg, c.open_store(cfg), args.site or cfg.site)


def _calibration_rule(cfg: ServerConfig, name: str | None):
    """The rule to fit, its cap kept: the encoder's default decision when it is that rule, else the encoder's
    default for the named rule."""
    from models.face.encoders import encoder_spec

    spec = encoder_spec(cfg.enrollment.encoder)
    if name is None or name == spec.default_decision.rule:
        return spec.default_decision
    return spec.rule(name)


def cmd_calibrate(args: argparse.Namespace, cfg: ServerConfig) -> int:
    from datetime import datetime, timezone

    from enrollment_server.site_calibration import calibrate_site
    from models.face.encoders import encoder_spec

    site = args.site or cfg.site
    store = c.open_store(cfg)
    store.get_site(site)  # an unknown site is named as such, not as "too little data"
    if args.reset:
        cleared = store.clear_site_rule(site)
        print(json.dumps({"site": site, "decision": "encoder default", "was_calibrated": cleared}))
        return _after_change(args, cfg, store, site) if cleared else EXIT_OK
    fingerprint = c.fingerprint(cfg)
    result = calibrate_site(
        store,
        site,
        fingerprint,
        _calibration_rule(cfg, args.rule),
        args.fpir,
        default=encoder_spec(cfg.enrollment.encoder).default_decision,
        now=datetime.now(timezone.utc),
    )
    point = result.point
    print(
        json.dumps(
            {
                "site": site,
                "decision": point.rule.to_dict(),
                "target_fpir": point.target_fpir,
                "fpir": point.fpir,
                "strangers_accepted": point.n_strangers_accepted,
                "resolvable": point.resolvable,
                "dir": point.dir,
                "people": result.decision.people,
                "genuine_probes": result.decision.probes,
                "strangers": result.decision.strangers,
                "unknown_faces": result.unknown_faces,
                "leave_one_out": result.leave_one_out,
                # the threshold each stranger set gives; the stricter is the decision's
                "fitted": {
                    "leave_one_out": result.leave_one_out_threshold,
                    "unknown_faces": result.unknown_faces_threshold,
                },
                "in_force": {
                    "source": result.in_force_source,
                    "decision": result.in_force.to_dict(),
                    "strangers_accepted": result.in_force_accepted,
                },
                "looser_than_in_force": result.looser,
                "fingerprint": fingerprint,
                "applied": args.apply,
            }
        )
    )
    if result.looser:
        print(
            f"warning: the fitted rule accepts {point.n_strangers_accepted} of these {point.n_strangers} strangers, "
            f"the rule in force ({result.in_force_source}) {result.in_force_accepted}: applying it loosens the doors",
            file=sys.stderr,
        )
    if not args.apply:
        print("not stored: run again with --apply to publish this rule to the site's doors", file=sys.stderr)
        return EXIT_OK
    store.set_site_rule(result.site_rule())
    return _after_change(args, cfg, store, site)


_SYNC_NOTES = {
    "behind": "<- behind",
    "ahead": "<- AHEAD of this server's newest gallery: a restored or replaced database, or another server "
    "publishing this site (the next publication, in a new epoch, brings it in step)",
    "other_epoch": "<- holds an older epoch this database never recorded (the next publication replaces it)",
}


def cmd_reencode(args: argparse.Namespace, cfg: ServerConfig) -> int:
    from tqdm import tqdm

    from enrollment_server.reencode import Reencoder

    site = args.site or cfg.site
    store = c.open_store(cfg)
    reencoder = Reencoder(store, c.make_pipeline(cfg))
    total = sum(t.encoder_fingerprint != reencoder.fingerprint for t in store.list_templates(site_id=site))
    with tqdm(total=total, unit="template", desc="reencode", file=sys.stderr, disable=args.quiet) as bar:
        report = reencoder.run(site, dry_run=args.dry_run, progress=bar.update)
    print(json.dumps({"reencode": report.to_json()}))
    for left in report.left:
        print(f"enrollment-server: template {left.template_id} of {left.person_id}: {left.reason}", file=sys.stderr)
    code = EXIT_PARTIAL if report.left else EXIT_OK
    if report.reencoded and not args.dry_run:
        code = max(code, _after_change(args, cfg, store, site))
    return code


def cmd_devices(args: argparse.Namespace, cfg: ServerConfig) -> int:
    devices = c.open_store(cfg).list_devices(args.site)
    rows = [
        {
            "device": d.device_id,
            "site": d.site_id,
            "state": d.state,
            "agent": d.agent_version,
            "gallery": d.gallery_version,
            "epoch": d.gallery_epoch,
            "latest": d.latest_site_version,
            "latest_epoch": d.latest_site_epoch,
            "lag": d.lag,  # negative: ahead; null: versions of two epochs, not comparable (see sync)
            "sync": d.sync,
            "last_seen": d.last_seen.isoformat() if d.last_seen else None,
            # the rule the door reports in force and its source (config / site / encoder default)
            "decision": (d.health() or {}).get("decision"),
        }
        for d in devices
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    print(f"{'device':<24}{'site':<12}{'state':<10}{'gallery':>8}{'latest':>8}{'lag':>5}  {'sync':<12}last seen")
    for r in rows:
        gallery, latest, seen = r["gallery"] or "-", r["latest"] or "-", r["last_seen"] or "-"
        lag = "-" if r["lag"] is None else r["lag"]
        note = _SYNC_NOTES.get(r["sync"], "")
        print(
            f"{r['device']:<24}{r['site']:<12}{r['state']:<10}{gallery:>8}{latest:>8}{lag:>5}  {r['sync']:<12}{seen}"
            + (f"  {note}" if note else "")
        )
    return EXIT_OK


def cmd_report(args: argparse.Namespace, cfg: ServerConfig) -> int:
    from enrollment_server.reports import to_csv, to_json

    try:
        day = date.fromisoformat(args.date)
    except ValueError as exc:
        raise FaceAttendError(f"--date {args.date!r}: expected YYYY-MM-DD") from exc
    rows = c.open_store(cfg).daily_report(args.site, day)
    text = to_csv(rows) if args.format == "csv" else to_json(rows)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"{len(rows)} rows written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, cfg: ServerConfig) -> int:
    from enrollment_server.service import run_server

    return run_server(cfg)


# ---- parsing --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enrollment-server", description="faceattend enrollment server")
    parser.add_argument("-c", "--config", help="YAML configuration (default: embedded defaults)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str, *, site: bool = True, publishes: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        if site:
            p.add_argument("--site", help="site id (default: the config's site)")
        if publishes:
            p.add_argument("--no-publish", action="store_true", help="store only; publish the gallery later")
        if publishes or name == "publish":
            p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the broker (default 15)")
        return p

    add("init", cmd_init, "create the database and the gallery signing key; print the public key for edges")
    p = add("enroll", cmd_enroll, "enroll one person from photos", publishes=True)
    p.add_argument("--person-id", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("photos", nargs="+")
    p.add_argument(
        "--allow-duplicate-identity",
        action="store_true",
        help="skip the identity checks: enroll even if the face matches someone else or, added to an existing "
        "person, does not look like them",
    )
    p = add("import", cmd_import, "enroll a folder with one sub-folder of photos per person", publishes=True)
    p.add_argument("folder")
    p.add_argument("--allow-duplicate-identity", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add("remove", cmd_remove, "remove a person and their templates (edges forget them)", site=False, publishes=True)
    p.add_argument("person_id")
    p = add("rename", cmd_rename, "change a person's display name", site=False)
    p.add_argument("person_id")
    p.add_argument("name")
    add("list", cmd_list, "people of a site")
    add("publish", cmd_publish, "publish the site's gallery now")
    p = add(
        "calibrate",
        cmd_calibrate,
        "fit the site's decision rule on its own people and unknown faces; --apply publishes it to its doors",
        publishes=True,
    )
    p.add_argument("--fpir", type=float, default=0.01, help="share of strangers accepted (default 0.01)")
    p.add_argument("--rule", choices=("ratio", "margin", "distance"), help="default: the encoder's default rule")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="store the rule: the site's galleries carry it")
    action.add_argument("--reset", action="store_true", help="drop the site's rule: back to the encoder default")
    p = add(
        "reencode",
        cmd_reencode,
        "make templates of another encoder (e.g. from before an upgrade) again from the kept photos or face chips",
        publishes=True,
    )
    p.add_argument("--dry-run", action="store_true", help="report what could be made again; store nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add("devices", cmd_devices, "edge devices: online state, applied gallery version, lag")
    p.add_argument("--json", action="store_true")
    p = add("report", cmd_report, "first / last seen per person and day")
    p.add_argument("--date", required=True, help="YYYY-MM-DD (UTC day)")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--out", help="write to this file instead of stdout")
    add("serve", cmd_serve, "run the server: MQTT ingest, gallery publication, admin API", site=False)
    provisioning.add_commands(sub)  # provision-device, broker-user, revoke-broker-user
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        extras.require("server", "enrollment-server")
        return args.func(args, load_config(args.config))
    except MqttError as exc:
        print(f"enrollment-server: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except FaceAttendError as exc:
        print(f"enrollment-server: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
