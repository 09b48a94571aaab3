"""Studies: ``synth`` (synthetic dermoscopy), ``demo``, ``import-ratings``, ``consensus``, ``export``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.synthetic import SynthConfig

from backend.cli.common import _database_url, _settings

logger = logging.getLogger("dermassist")


DEFAULT_DEMO_DIR = Path("runs/demo")


def _synth_config(args: argparse.Namespace) -> SynthConfig:
    from model.synthetic import RaterProfile, SynthConfig

    return SynthConfig(
        n=args.n,
        size=args.size,
        raters=args.raters,
        seed=args.seed,
        prevalence=args.prevalence,
        label_noise=args.label_noise,
        rater=RaterProfile(sensitivity=args.sensitivity, specificity=args.specificity, missing=args.missing),
    )


def _write_study(args: argparse.Namespace, out: Path) -> int:
    from model.synthetic import contact_sheet, generate

    summary = generate(_synth_config(args), out, progress=not args.quiet)
    if not args.no_sheet:
        contact_sheet(out).save(out / "contact_sheet.png")
    print(summary.line())
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Draw a synthetic dermoscopy study with simulated dermatologists."""
    return _write_study(args, Path(args.out))


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults: Label Studio and the backend on localhost with a pre-annotated
    BCC screening project: 64 real dermoscopic images (sample/ham10000) pre-annotated by the released
    models, four simulated dermatologists, their consensus, one retraining, then what to label next (the
    task score by least confidence, a "Next batch" tab) and who reads what next (a "Next reads" tab per
    reader).
    --synthetic runs the synthetic study (a model trained on drawings); --no-label-studio the headless part
    of it: study, store, consensus, report."""
    if not args.no_label_studio:
        from backend.demo.label_studio import LabelStudioUnavailableError
        from backend.demo.run import DemoConfig, run

        try:
            return run(
                DemoConfig(
                    out=Path(args.out),
                    synthetic=args.synthetic,
                    n=args.n,
                    size=args.size,
                    seed=args.seed,
                    epochs=args.epochs,
                    ls_port=args.ls_port,
                    backend_port=args.port,
                    wait=not args.no_wait,
                    progress=not args.quiet,
                )
            )
        except LabelStudioUnavailableError as exc:
            raise ValueError(
                f"{exc}\n(or run `dermassist demo --no-label-studio` for the headless part)"
            ) from None
    return _headless_demo(args)


def _headless_demo(args: argparse.Namespace) -> int:
    import pandas as pd

    from backend.demo.regions import import_study_regions
    from backend.label_studio.brush import decode_region
    from consensus.db import init_db
    from consensus.export import build_study, write_csv, write_report
    from consensus.repository import import_ratings
    from consensus.service import run_consensus

    root = Path(args.out)
    study_dir = root / "study"
    _write_study(args, study_dir)
    if args.raters == 0:
        print(f"demo: study written to {study_dir.resolve()} (no raters: no consensus)")
        return 0
    database = root / "dermassist.sqlite"
    database.unlink(missing_ok=True)  # the demo starts from a fresh store every time
    engine, sessions = init_db(f"sqlite:///{database}")
    try:
        with sessions.begin() as session:
            import_ratings(session, pd.read_csv(study_dir / "ratings.csv"), origin="demo")
            import_study_regions(session, study_dir)  # the simulated dermatologists' painted regions
        with sessions.begin() as session:
            run = run_consensus(session, decode=decode_region)
        with sessions() as session:
            study = build_study(session, run.id, decode=decode_region)
    finally:
        engine.dispose()
    truth = pd.read_csv(study_dir / "labels.csv", dtype={"image_id": str}).set_index("image_id")
    images = {p.stem: p for p in sorted((study_dir / "images").glob("*")) if p.is_file()}
    report = write_report(study, root / "consensus" / "report.html", truth, images=images)
    write_csv(study, root / "consensus")
    agree = (study.consensus["bcc"] == truth.loc[study.consensus.index, "bcc"]).mean()
    print(f"demo: consensus of {study.run['n_raters']} dermatologists on {study.run['n_items']} images "
          f"(BCC consensus agrees with the truth on {agree:.1%}); store {database}")  # fmt: skip
    sheet = (
        ""
        if args.no_sheet
        else f"\n  images with their patterns outlined: {(study_dir / 'contact_sheet.png').resolve()}"
    )
    print(f"demo: look at\n  the study report: {report.resolve()}{sheet}")
    return 0


def cmd_import_ratings(args: argparse.Namespace) -> int:
    """Import a long ratings table (image_id, rater, label, value) into the store."""
    import pandas as pd

    from consensus.db import init_db
    from consensus.repository import import_ratings

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        table = pd.read_csv(path, dtype={"image_id": str, "rater": str, "label": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable CSV: {exc}") from exc
    engine, sessions = init_db(_database_url(args))
    try:
        with sessions.begin() as session:  # one transaction: the whole file or nothing
            summary = import_ratings(session, table, origin=str(path))
            if args.regions:
                from backend.demo.regions import import_study_regions

                painted = import_study_regions(session, path.parent)
    finally:
        engine.dispose()
    print(
        f"imported {summary.rows} ratings of {summary.items} images by {summary.raters} raters: "
        f"{summary.created} annotations new, {summary.changed} changed, {summary.unchanged} unchanged"
        + (f"; {painted} painted regions from {path.parent / 'regions'}" if args.regions else "")
    )
    return 0


def cmd_consensus_run(args: argparse.Namespace) -> int:
    """Run the Dawid-Skene consensus over every annotation in the store and store the run."""
    from backend.label_studio.brush import decode_region
    from consensus.dawid_skene import DawidSkene, OneCoinDawidSkene, PooledDawidSkene, PooledOneCoinDawidSkene
    from consensus.db import init_db
    from consensus.repository import consensus_table
    from consensus.selection import SelectedDawidSkene
    from consensus.service import run_consensus

    settings = {"n_iter": args.n_iter, "smoothing": args.smoothing, "diag_smoothing": args.diag_smoothing}
    candidates: dict[str, DawidSkene] = {
        "full": DawidSkene(**settings),
        "one-coin": OneCoinDawidSkene(**settings),
        "pooled": PooledDawidSkene(**settings),
        "pooled-one-coin": PooledOneCoinDawidSkene(**settings),
    }
    model = args.rater_model or ("one-coin" if args.one_coin else "select")
    if args.one_coin and model != "one-coin":
        raise ValueError(f"--one-coin contradicts --rater-model {model}")
    estimator: DawidSkene | SelectedDawidSkene = (
        SelectedDawidSkene(candidates={k.replace("-", "_"): v for k, v in candidates.items()})
        if model == "select"
        else candidates[model]
    )
    engine, sessions = init_db(_database_url(args))
    try:
        with sessions.begin() as session:
            run = run_consensus(session, estimator, decode=decode_region, use_gold=not args.no_gold)
            table = consensus_table(session, run)
    finally:
        engine.dispose()
    positives = (table[table["value"] == "1"].groupby("label_key").size()).to_dict()
    from labeling_config import TARGETS

    shown = ", ".join(f"{k} {positives[k]}" for k in TARGETS if k in positives)
    print(f"consensus run {run.id} ({run.method}): {run.n_items} items, {run.n_raters} raters, "
          f"{run.n_answers} answers; positives: {shown}")  # fmt: skip
    return 0


def _print_agreement(version: str, summary: Any) -> None:
    for row in summary.itertuples():
        print(f"{version} {row.pattern}: {row.n_images} images, energy inside {row.energy_inside:.3f} "
              f"[{row.energy_inside_low:.3f}, {row.energy_inside_high:.3f}] (area {row.area:.3f}), "
              f"pointing {row.pointing:.3f}, IoU {row.iou:.3f}")  # fmt: skip


def cmd_gradcam_agreement(args: argparse.Namespace) -> int:
    """Score model versions' Grad-CAM maps against a consensus run's pattern regions (energy inside,
    pointing game, IoU, per pattern with bootstrap intervals) and write gradcam_agreement.csv."""
    import pandas as pd

    from backend.serving import registry
    from backend.serving.multitask import load_served
    from backend.training.gradcam_agreement import gradcam_agreement
    from backend.training.training_set import ImageSource
    from consensus.db import init_db
    from consensus.models import ConsensusRun
    from consensus.repository import latest_run

    settings = _settings(args)
    out = Path(args.out)
    summaries, per_image = [], []
    engine, sessions = init_db(_database_url(args))
    try:
        with sessions() as session:
            run = session.get(ConsensusRun, args.run) if args.run is not None else latest_run(session)
            if run is None:
                raise ValueError("no such consensus run: run `dermassist consensus run` first")
            source = ImageSource(settings, Path(args.images) if args.images else None)
            for name in args.model or [None]:
                if name and Path(name).is_file():
                    path = Path(name)
                else:
                    version = registry.find(session, name) if name else registry.promoted(session)
                    if version is None:
                        raise ValueError(f"no model version {name or '(promoted)'} in the store")
                    path = Path(version.path)
                served = load_served(path, engine=args.engine)
                found = gradcam_agreement(
                    session, run.id, served, source, args.threshold, args.tolerance, args.n_boot, args.seed,
                    present_only=not args.all_regions,
                )  # fmt: skip
                summaries.append(found.summary)
                per_image.append(found.per_image.assign(model_version=served.version))
                _print_agreement(served.version, found.summary)
                if found.skipped:
                    print(
                        f"note: {len(found.skipped)} image(s) left out: {found.skipped[:5]}", file=sys.stderr
                    )
    finally:
        engine.dispose()
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(summaries, ignore_index=True).to_csv(out / "gradcam_agreement.csv", index=False)
    pd.concat(per_image, ignore_index=True).to_csv(out / "gradcam_agreement_images.csv", index=False)
    print(f"consensus run {run.id}, {len(summaries)} model version(s): {out / 'gradcam_agreement.csv'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a consensus run: csv (a folder), json, ls-import (Label Studio tasks, with the consensus
    regions as brush ground truth), report (HTML), regions (a folder: PNG masks and tables)."""
    import json

    import pandas as pd
    from sqlalchemy import select

    from backend.label_studio.brush import decode_region
    from consensus.db import init_db
    from consensus.export import build_study, write_csv, write_json, write_report
    from consensus.models import ConsensusRun, Item
    from consensus.region_export import region_masks, write_region_export

    out = Path(args.out)
    engine, sessions = init_db(_database_url(args))
    try:
        with sessions() as session:
            # The decoder lets the readers' pages show each reader's own painted region.
            decode = decode_region if args.format == "report" else None
            study = build_study(session, args.run, decode=decode)
            images = {e: i for e, i in session.execute(select(Item.external_id, Item.image)) if i}
            run = session.get_one(ConsensusRun, study.run["id"])
            masks = region_masks(session, run) if args.format == "ls-import" else {}
            pngs = len(write_region_export(session, run, out)) - 2 if args.format == "regions" else 0
    finally:
        engine.dispose()
    if args.format == "regions":
        print(f"consensus run {study.run['id']}: {pngs} region masks (PNG) and 2 tables in {out}")
    elif args.format == "csv":
        written = write_csv(study, out)
        print(f"consensus run {study.run['id']}: {len(written)} files in {out}")
    elif args.format == "json":
        write_json(study, out)
        print(f"consensus run {study.run['id']}: {len(study.consensus)} images -> {out}")
    elif args.format == "report":
        truth = None
        if args.truth:
            truth = pd.read_csv(args.truth, dtype={"image_id": str}).set_index("image_id")
        gradcam = pd.read_csv(args.gradcam) if args.gradcam else None
        from consensus.adaptive import StoppingRule

        rule = StoppingRule(args.reads_confidence, args.min_reads)
        write_report(study, out, truth, gradcam, reads_rule=rule)
        pages = out.parent / "raters"
        print(f"consensus run {study.run['id']}: report -> {out}, a page per reader in {pages}")
    else:
        from backend.label_studio.export import ls_import_tasks
        from backend.label_studio.ground_truth import add_region_ground_truth
        from labeling_config import parse_config

        config = parse_config(Path(args.config).read_text(encoding="utf-8"))
        tasks = ls_import_tasks(study.consensus, config, images, args.image_template, study.run["id"])
        brushes = add_region_ground_truth(tasks, masks, config)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
        print(
            f"consensus run {study.run['id']}: {len(tasks)} Label Studio tasks "
            f"({brushes} consensus regions as brush ground truth) -> {out}"
        )
    for note in study.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
