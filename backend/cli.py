"""The ``dermassist`` command line.

Heavy libraries (torch, the Label Studio SDK) are imported inside the subcommands that need them,
so ``dermassist --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.settings import Settings
    from model.synthetic import SynthConfig

logger = logging.getLogger("dermassist")

DEFAULT_DEMO_DIR = Path("runs/demo")


def _version() -> str:
    try:
        return version("dermassist")
    except PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


def _range(text: str) -> tuple[float, float]:
    """Parse ``LOW:HIGH`` (or one number for both) into a probability range."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH probabilities, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH <= 1, got {text!r}")
    return values[0], values[1]


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _add_synth_options(p: argparse.ArgumentParser, n: int) -> None:
    g = p.add_argument_group("synthetic study")
    g.add_argument("--n", type=int, default=n, help="number of images (default: %(default)s)")
    g.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    g.add_argument("--raters", type=int, default=4, help="simulated dermatologists (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument(
        "--prevalence", type=_probability, default=0.4, help="share of BCC lesions (default: %(default)s)"
    )
    g.add_argument(
        "--label-noise",
        type=_probability,
        default=0.02,
        help="probability that the diagnosis contradicts the criterion (default: %(default)s)",
    )
    g.add_argument(
        "--sensitivity",
        type=_range,
        default=(0.75, 0.95),
        metavar="LOW:HIGH",
        help="range of each rater's per-label sensitivity (default: 0.75:0.95)",
    )
    g.add_argument(
        "--specificity",
        type=_range,
        default=(0.85, 0.98),
        metavar="LOW:HIGH",
        help="range of each rater's per-label specificity (default: 0.85:0.98)",
    )
    g.add_argument(
        "--missing",
        type=_probability,
        default=0.1,
        help="probability that a rater skips an image (default: %(default)s)",
    )
    g.add_argument("--no-sheet", action="store_true", help="do not write contact_sheet.png")


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


def _settings(args: argparse.Namespace) -> Settings:
    from backend.settings import Settings

    settings = Settings.from_env()
    overrides = {}
    if getattr(args, "db", None):
        overrides["database_url"] = args.db
    if getattr(args, "model_dir", None):
        overrides["model_dir"] = Path(args.model_dir)
    if overrides:
        import dataclasses

        settings = dataclasses.replace(settings, **overrides)
    return settings


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` the user gave (their defaults are None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _train_from_db(args: argparse.Namespace) -> int:
    from backend.training import jobs
    from consensus.db import init_db

    settings = _settings(args)
    _, sessions = init_db(settings.database_url)
    # Only what was asked for: the rest are the job's own defaults, the same whatever triggers it.
    params: dict[str, object] = dict(_given(args, "epochs", "batch_size", "image_size", "patience"))
    if args.images:
        params["images"] = str(Path(args.images).resolve())
    if args.weights:
        params["weights"] = args.weights
    job, created = jobs.request_training(sessions, "cli", params)
    if not created:
        print(f"a training job is already queued (job {job.id}); this request joined it")
    status = jobs.supervise(settings, job.id, sessions)
    with sessions() as session:
        from consensus.models import TrainingJob

        row = session.get(TrainingJob, job.id)
        assert row is not None
        if status.value != "succeeded":
            print(f"training job {job.id} {status.value}: {row.error}", file=sys.stderr)
            return 1
        outcome = "promoted" if row.promoted else "not promoted (worse than the served model)"
        print(f"training job {job.id}: {row.version} {outcome}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the Label Studio ML backend (waitress; --dev: Flask's development server)."""
    from backend.api.app import create_app
    from consensus.db import init_db

    settings = _settings(args)
    engine, _ = init_db(settings.database_url)  # migrate once, before any worker starts
    engine.dispose()
    if args.dev:
        app = create_app(settings, start_runner=True)
        app.run(host=args.host, port=args.port, threaded=True)
        return 0
    from backend.server import serve

    return serve(settings, args.host, args.port, args.http_threads)


def cmd_sync(args: argparse.Namespace) -> int:
    """Reconcile the store with a Label Studio project's export (what missed webhooks left out)."""
    from backend.label_studio.client import LabelStudioError
    from backend.label_studio.sync import sync_from_label_studio, sync_project
    from consensus.db import init_db
    from labeling_config.parse import parse_config

    settings = _settings(args)
    if args.export:
        import json

        tasks = json.loads(Path(args.export).read_text())
        config = parse_config(Path(args.config).read_text()) if args.config else parse_config(_bcc_xml())
        _, sessions = init_db(settings.database_url)
        summary = sync_project(sessions, args.project, tasks, config)
    else:
        _, sessions = init_db(settings.database_url)
        try:
            summary = sync_from_label_studio(settings, sessions, args.project)
        except LabelStudioError as exc:
            raise ValueError(str(exc)) from None
    print(" ".join(f"{k}={v}" for k, v in summary.as_dict().items()))
    return 0 if summary.errors == 0 else 1


def _bcc_xml() -> str:
    from labeling_config import load_config

    return load_config("bcc")


def cmd_worker(args: argparse.Namespace) -> int:
    """Run training jobs from Redis (REDIS_URL) with an RQ worker."""
    from redis import Redis
    from rq import Queue, Worker

    from backend.training.jobs import RQQueue

    settings = _settings(args)
    if not settings.redis_url:
        raise ValueError("set REDIS_URL: the worker takes its jobs from Redis")
    connection = Redis.from_url(settings.redis_url)
    worker = Worker([Queue(RQQueue.name, connection=connection)], connection=connection)
    worker.work(burst=args.burst)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the model versions, or promote a checkpoint to be served."""
    from backend.serving import registry
    from consensus.db import init_db
    from consensus.models import ModelVersion

    settings = _settings(args)
    _, sessions = init_db(settings.database_url)
    with sessions() as session:
        if args.action == "promote-lesion":
            from backend.serving.lesion import promote_pair

            if not args.checkpoint or not args.dual:
                raise ValueError("dermassist models promote-lesion SEGNET_CHECKPOINT DUAL_CHECKPOINT")
            pair = promote_pair(session, Path(settings.model_dir), args.checkpoint, args.dual)
            session.commit()
            print(f"promoted the lesion pair {pair.version}")
            return 0
        if args.action == "promote":
            if not args.checkpoint:
                raise ValueError("dermassist models promote CHECKPOINT | VERSION | release")
            version = _find_version(session, sessions, settings, args.checkpoint)
            registry.promote(session, version)
            session.commit()
            print(f"promoted {version.version} ({version.release or version.path})")
            return 0
        from sqlalchemy import select

        for row in session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
            shown = [o.output for o in row.outputs if o.status == "validated"]
            print(
                f"{row.version}\t{row.system}\t{row.status.value}\t{row.created_at:%Y-%m-%d %H:%M}\t"
                f"{row.release or row.path}\tvalidated: {', '.join(shown) or 'none'}"
            )
    return 0


def _find_version(session: Any, sessions: Any, settings: Settings, name: str) -> Any:
    """A checkpoint file (registered now), a registered version id, or ``release`` (the released model)."""
    from backend.serving import registry
    from backend.serving.release import install, read_release

    if Path(name).is_file():
        return registry.register(session, name, Path(settings.model_dir))
    if name == "release":
        release = read_release(settings.release_dir)
        if release is None or "dermnet" not in release.models:
            raise ValueError(f"no released model in RELEASE_DIR ({settings.release_dir})")
        install(sessions, Path(settings.model_dir), release)  # registered (if it was not), in its own session
        session.expire_all()
        name = release.models["dermnet"].version
    found = registry.find(session, name)
    if found is None:
        raise ValueError(
            f"{name!r} is neither a checkpoint file nor a registered version (dermassist models list)"
        )
    return found


def cmd_train_seg(args: argparse.Namespace) -> int:
    """Train the lesion segmentation U-Net (dual attention gates, ASPP) on a folder with lesion masks."""
    from model.lesion.train_seg import SegTrainConfig, train_seg

    result = train_seg(
        SegTrainConfig(
            data=args.data,
            out=args.out,
            weights=args.weights,
            encoder=args.encoder,
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            patience=args.patience,
            threads=args.threads,
            stratify=args.stratify,
            progress=not args.quiet,
        )
    )
    dice = result.meta.metrics.get("val_dice", float("nan"))
    print(f"trained {result.meta.version}: validation Dice {dice:.4f} -> {result.best}")
    return 0


def cmd_evaluate_seg(args: argparse.Namespace) -> int:
    """Dice, IoU and boundary F-score (bootstrap intervals) of a segmentation checkpoint, with a gallery."""
    from model.lesion.train_seg import evaluate_seg

    found = evaluate_seg(args.checkpoint, args.data, args.out, split=args.split)
    parts = [
        f"{k} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
        for k, v in found.items()
        if isinstance(v, dict) and "mean" in v
    ]
    print(f"{'; '.join(parts)} -> {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_train_dual(args: argparse.Namespace) -> int:
    """Train the dual-encoder classifier (image + lesion + metadata; HAM10000 diagnoses and BCC)."""
    from model.lesion.train_dual import DualConfig, train_dual

    result = train_dual(
        DualConfig(
            data=args.data,
            out=args.out,
            weights=args.weights,
            backbone=args.backbone,
            use_lesion=not args.no_lesion,
            use_metadata=not args.no_metadata,
            image_size=args.image_size,
            lesion_size=args.lesion_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            patience=args.patience,
            threads=args.threads,
            progress=not args.quiet,
        )
    )
    found = result["metrics"]
    nan = float("nan")
    balanced, macro = found.get("balanced_accuracy", nan), found.get("auroc_macro", nan)
    print(
        f"trained in {result['seconds'] / 60:.1f} min: validation balanced accuracy {balanced:.4f}, "
        f"macro AUROC {macro:.4f}, BCC AUROC {found['auroc_bcc']:.4f} -> {result['best']}"
    )
    return 0


def cmd_evaluate_dual(args: argparse.Namespace) -> int:
    """Diagnosis metrics (bootstrap intervals) and Grad-CAM energy in the lesion, of a dual-encoder model."""
    import torch

    from model.lesion.evaluate_dual import evaluate_dual

    torch.set_num_threads(args.threads)
    found = evaluate_dual(args.checkpoint, args.data, args.out, split=args.split, segnet=args.segnet)
    cam = found["gradcam_predicted_class"]

    def fmt(entry: Any) -> str:
        return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]" if entry else "n/a"

    print(
        f"{found['n']} images: balanced accuracy {fmt(found.get('balanced_accuracy'))}, macro AUROC "
        f"{fmt(found.get('auroc_macro'))}, BCC AUROC {fmt(found.get('auroc_bcc'))}; Grad-CAM energy inside "
        f"the lesion {fmt(cam.get('energy_inside'))} (lesion area {fmt(cam.get('area'))}) -> {args.out}"
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Draw a synthetic dermoscopy study with simulated dermatologists."""
    return _write_study(args, Path(args.out))


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults: Label Studio and the backend on localhost with a pre-annotated
    BCC screening project: 64 real dermoscopic images (sample/ham10000) pre-annotated by the released
    models, four simulated dermatologists, their consensus, one retraining. --synthetic runs the synthetic
    study (a model trained on drawings); --no-label-studio the headless part of it: study, store,
    consensus, report."""
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
        with sessions.begin() as session:
            run = run_consensus(session)
        with sessions() as session:
            study = build_study(session, run.id)
    finally:
        engine.dispose()
    truth = pd.read_csv(study_dir / "labels.csv", dtype={"image_id": str}).set_index("image_id")
    report = write_report(study, root / "consensus" / "report.html", truth)
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


def cmd_train(args: argparse.Namespace) -> int:
    """Train the MobileNet-V2 multitask model (BCC + seven patterns) on a dataset folder, or (--from-db)
    run a retraining job on the store's consensus, promoted only if not worse."""
    from model.multitask.train import TrainConfig, train

    if args.from_db:
        return _train_from_db(args)
    if not args.data:
        raise ValueError("give a dataset folder, or --from-db to train on the store's consensus")
    config = TrainConfig(
        data=args.data[0] if len(args.data) == 1 else list(args.data),
        out=args.out,
        weights=args.weights,
        **{
            k: getattr(args, k)
            for k in ("epochs", "batch_size", "image_size", "patience")
            if getattr(args, k)
        },
        lr=args.lr,
        output_stride=args.output_stride,
        cam_loss=args.cam_loss,
        select=args.select,
        val_fraction=args.val_fraction,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        target_sensitivity=args.target_sensitivity,
        progress=not args.quiet,
        resume=args.resume,
    )
    result = train(config)
    metrics = result.meta.metrics
    mean_auroc, bcc_auroc = metrics.get("auroc_mean", float("nan")), metrics.get("auroc_bcc", float("nan"))
    print(
        f"trained {result.meta.version}: validation mean AUROC {mean_auroc:.4f}, "
        f"BCC AUROC {bcc_auroc:.4f} (epoch {result.meta.epoch}) -> {result.best}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint: metrics.json, predictions.csv and report.html with plots."""
    from model.multitask.evaluate import evaluate

    metrics = evaluate(
        args.checkpoint,
        args.data,
        args.out,
        split=args.split,
        n_boot=args.bootstrap,
        cam_method=args.cam_method,
    )
    bcc = metrics["classification"]["bcc"]
    print(
        f"{metrics['model_version']} on {metrics['classification']['n_images']} images ({metrics['split']}): "
        f"BCC AUROC {bcc['auroc']['value']:.3f}, sensitivity {bcc['recall']['value']:.3f}, "
        f"specificity {bcc['specificity']['value']:.3f} -> {Path(args.out) / 'report.html'}"
    )
    return 0


def _database_url(args: argparse.Namespace) -> str:
    from backend.settings import Settings

    return str(args.db or Settings.from_env().database_url)


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
    finally:
        engine.dispose()
    print(
        f"imported {summary.rows} ratings of {summary.items} images by {summary.raters} raters: "
        f"{summary.created} annotations new, {summary.changed} changed, {summary.unchanged} unchanged"
    )
    return 0


def cmd_consensus_run(args: argparse.Namespace) -> int:
    """Run the Dawid-Skene consensus over every annotation in the store and store the run."""
    from consensus.dawid_skene import DawidSkene, OneCoinDawidSkene
    from consensus.db import init_db
    from consensus.repository import consensus_table
    from consensus.service import run_consensus

    kind = OneCoinDawidSkene if args.one_coin else DawidSkene
    estimator = kind(n_iter=args.n_iter, smoothing=args.smoothing, diag_smoothing=args.diag_smoothing)
    engine, sessions = init_db(_database_url(args))
    try:
        with sessions.begin() as session:
            run = run_consensus(session, estimator)
            table = consensus_table(session, run)
    finally:
        engine.dispose()
    positives = (table[table["value"] == "1"].groupby("label_key").size()).to_dict()
    from labeling_config import TARGETS

    shown = ", ".join(f"{k} {positives[k]}" for k in TARGETS if k in positives)
    print(f"consensus run {run.id} ({run.method}): {run.n_items} items, {run.n_raters} raters, "
          f"{run.n_answers} answers; positives: {shown}")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a consensus run: csv (a folder), json, ls-import (Label Studio tasks), report (HTML)."""
    import json

    import pandas as pd
    from sqlalchemy import select

    from consensus.db import init_db
    from consensus.export import build_study, write_csv, write_json, write_report
    from consensus.models import Item

    engine, sessions = init_db(_database_url(args))
    try:
        with sessions() as session:
            study = build_study(session, args.run)
            images = {e: i for e, i in session.execute(select(Item.external_id, Item.image)) if i}
    finally:
        engine.dispose()
    out = Path(args.out)
    if args.format == "csv":
        written = write_csv(study, out)
        print(f"consensus run {study.run['id']}: {len(written)} files in {out}")
    elif args.format == "json":
        write_json(study, out)
        print(f"consensus run {study.run['id']}: {len(study.consensus)} images -> {out}")
    elif args.format == "report":
        truth = None
        if args.truth:
            truth = pd.read_csv(args.truth, dtype={"image_id": str}).set_index("image_id")
        write_report(study, out, truth)
        print(f"consensus run {study.run['id']}: report -> {out}")
    else:
        from backend.label_studio.export import ls_import_tasks
        from labeling_config import parse_config

        config = parse_config(Path(args.config).read_text(encoding="utf-8"))
        tasks = ls_import_tasks(study.consensus, config, images, args.image_template, study.run["id"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
        print(f"consensus run {study.run['id']}: {len(tasks)} Label Studio tasks -> {out}")
    for note in study.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def build_parser(env: Settings | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand; defaults (log level, threads) from the settings."""
    from backend.settings import Settings

    env = env if env is not None else Settings()
    parser = argparse.ArgumentParser(
        prog="dermassist",
        description="Label Studio ML backend for dermoscopy studies: pre-annotation, "
        "dermatologist consensus, retraining and study export.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-level",
        default=env.log_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s; env LOG_LEVEL)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    synth = sub.add_parser("synth", help=cmd_synth.__doc__, description=cmd_synth.__doc__)
    synth.add_argument("--out", required=True, help="output folder (created)")
    _add_synth_options(synth, n=500)
    synth.set_defaults(func=cmd_synth)

    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    tr.add_argument(
        "data",
        nargs="*",
        help="dataset folder(s) (labels.csv, images/, masks/); several train one model, each with its "
        "own lesion-grouped split",
    )
    tr.add_argument(
        "--from-db",
        action="store_true",
        help="run a retraining job on the store's consensus (DATABASE_URL / --db), promoted if not worse",
    )
    tr.add_argument("--images", default=None, help="with --from-db: a study folder holding the items' images")
    tr.add_argument("--db", default=None, help="with --from-db: database URL (default: DATABASE_URL)")
    tr.add_argument("--model-dir", default=None, help="with --from-db: MODEL_DIR")
    tr.add_argument("--out", default="runs/train", help="run folder (default: %(default)s)")
    tr.add_argument(
        "--weights",
        default=None,
        help="'imagenet' (local torchvision cache; see make weights) or a checkpoint",
    )
    tr.add_argument("--epochs", type=int, default=None, help="default: 10; with --from-db: TRAIN_EPOCHS")
    tr.add_argument("--batch-size", type=int, default=None, help="default: 32; with --from-db: 16")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument(
        "--image-size", type=int, default=None, help="default: 224; with --from-db: the served model's"
    )
    tr.add_argument(
        "--cam-loss",
        type=float,
        default=0.0,
        help="weight of the localisation loss that draws each positive target's Grad-CAM into its "
        "reference region (0: off, the published model)",
    )
    tr.add_argument(
        "--select",
        choices=["auto", "auroc", "objective"],
        default="auto",
        help="the best epoch by mean validation AUROC, by the validation objective (loss + localisation "
        "loss), or auto: the objective when --cam-loss is on, else AUROC",
    )
    tr.add_argument(
        "--output-stride",
        type=int,
        choices=[16, 32],
        default=32,
        help="32 as published; 16 gives Grad-CAM maps at twice the resolution (+~35%% compute)",
    )
    tr.add_argument("--val-fraction", type=float, default=0.2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--patience",
        type=int,
        default=None,
        help="epochs without improvement before stopping (default: 4; with --from-db: 3)",
    )
    tr.add_argument(
        "--threads",
        type=int,
        default=env.threads,
        help="torch threads (default: THREADS or 1; more is slower on a busy small machine)",
    )
    tr.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    tr.add_argument(
        "--target-sensitivity",
        type=_probability,
        default=None,
        help="choose thresholds for this sensitivity (screening) instead of Youden's J",
    )
    tr.add_argument("--resume", default=None, help="continue from a last.pt")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help=cmd_evaluate.__doc__, description=cmd_evaluate.__doc__)
    ev.add_argument("checkpoint", help="a best.pt")
    ev.add_argument("data", help="dataset folder")
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument(
        "--split",
        choices=["auto", "all", "val"],
        default="auto",
        help="rows to evaluate (auto: the validation split if trained on this data, else all)",
    )
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default: %(default)s)")
    ev.add_argument(
        "--cam-method",
        default="gradcam",
        choices=["gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam"],
        help="gradcam: ours, all maps from one pass; others: pytorch-grad-cam, one call per output",
    )
    ev.set_defaults(func=cmd_evaluate)

    cons = sub.add_parser("consensus", help="the dermatologists' consensus (store, EM, reliability)")
    cons_sub = cons.add_subparsers(dest="consensus_command", metavar="ACTION", required=True)
    imp = cons_sub.add_parser(
        "import-ratings", help=cmd_import_ratings.__doc__, description=cmd_import_ratings.__doc__
    )
    imp.add_argument(
        "file", help="CSV with columns image_id, rater, label, value (e.g. a synthetic ratings.csv)"
    )
    imp.set_defaults(func=cmd_import_ratings)
    crun = cons_sub.add_parser("run", help=cmd_consensus_run.__doc__, description=cmd_consensus_run.__doc__)
    crun.add_argument(
        "--one-coin", action="store_true", help="one accuracy per rater instead of a confusion matrix"
    )
    crun.add_argument("--n-iter", type=int, default=100, help="EM iteration cap (default: %(default)s)")
    crun.add_argument("--smoothing", type=float, default=0.1, help="pseudo-count on every confusion cell")
    crun.add_argument(
        "--diag-smoothing",
        type=float,
        default=2.0,
        help="extra pseudo-count (x (K-1)) on the diagonal: raters beat chance",
    )
    crun.set_defaults(func=cmd_consensus_run)
    for p in (imp, crun):
        p.add_argument(
            "--db",
            default=None,
            help="database URL (default: DATABASE_URL, else sqlite:///dermassist.sqlite)",
        )

    ex = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    ex.add_argument("--format", choices=["csv", "json", "ls-import", "report"], required=True)
    ex.add_argument("--out", required=True, help="a folder for csv, a file for the others")
    ex.add_argument("--run", type=int, default=None, help="consensus run id (default: the latest)")
    ex.add_argument(
        "--truth", default=None, help="report: a labels.csv with known truth, for a calibration curve"
    )
    ex.add_argument(
        "--config",
        default=str(Path(__file__).resolve().parents[1] / "labeling_config" / "bcc.xml"),
        help="ls-import: the target project's labeling config (default: the shipped bcc.xml)",
    )
    ex.add_argument(
        "--image-template",
        default="{id}",
        help="ls-import: image reference for images the store has none for; {id} is the image id",
    )
    ex.add_argument(
        "--db", default=None, help="database URL (default: DATABASE_URL, else sqlite:///dermassist.sqlite)"
    )
    ex.set_defaults(func=cmd_export)

    ts = sub.add_parser("train-seg", help=cmd_train_seg.__doc__, description=cmd_train_seg.__doc__)
    ts.add_argument("data", help="dataset folder with lesion masks (masks/<id>_segmentation.png)")
    ts.add_argument("--out", default="runs/segment", help="run folder (default: %(default)s)")
    ts.add_argument("--weights", default=None, help="'imagenet' (make weights) or a segmentation checkpoint")
    ts.add_argument(
        "--encoder", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_b3", "resnet34"]
    )
    ts.add_argument("--image-size", type=int, default=192)
    ts.add_argument("--epochs", type=int, default=10)
    ts.add_argument("--batch-size", type=int, default=16)
    ts.add_argument("--patience", type=int, default=3)
    ts.add_argument(
        "--stratify",
        default="bcc",
        choices=["bcc", "dx"],
        help="split stratified by BCC (default) or by the seven diagnoses (the dual-encoder's split)",
    )
    ts.add_argument("--threads", type=int, default=env.threads)
    ts.set_defaults(func=cmd_train_seg)

    es = sub.add_parser("evaluate-seg", help=cmd_evaluate_seg.__doc__, description=cmd_evaluate_seg.__doc__)
    es.add_argument("checkpoint", help="a segmentation best.pt")
    es.add_argument("data", help="dataset folder with lesion masks")
    es.add_argument("--out", required=True, help="report folder")
    es.add_argument("--split", choices=["val", "all"], default="val")
    es.set_defaults(func=cmd_evaluate_seg)

    td = sub.add_parser("train-dual", help=cmd_train_dual.__doc__, description=cmd_train_dual.__doc__)
    td.add_argument(
        "data", help="dataset folder (derm-dev layout: labels.csv with dx, age, sex, localization; masks)"
    )
    td.add_argument("--out", default="runs/dual", help="run folder (default: %(default)s)")
    td.add_argument("--weights", default=None, choices=["imagenet"], help="ImageNet start (make weights)")
    td.add_argument("--backbone", default="mobilenet_v2", choices=["mobilenet_v2", "densenet201"])
    td.add_argument("--no-lesion", action="store_true", help="ablation: no lesion encoder")
    td.add_argument("--no-metadata", action="store_true", help="ablation: no metadata")
    td.add_argument("--image-size", type=int, default=160)
    td.add_argument("--lesion-size", type=int, default=128)
    td.add_argument("--epochs", type=int, default=8)
    td.add_argument("--batch-size", type=int, default=32)
    td.add_argument("--patience", type=int, default=3)
    td.add_argument("--threads", type=int, default=env.threads)
    td.set_defaults(func=cmd_train_dual)

    ed = sub.add_parser(
        "evaluate-dual", help=cmd_evaluate_dual.__doc__, description=cmd_evaluate_dual.__doc__
    )
    ed.add_argument("checkpoint", help="a dual-encoder best.pt")
    ed.add_argument("data", help="dataset folder (derm-dev layout)")
    ed.add_argument("--out", required=True, help="report folder (metrics.json, per_image.csv, report.html)")
    ed.add_argument("--split", choices=["val", "all"], default="val")
    ed.add_argument("--segnet", default=None, help="crop lesions with this segmentation checkpoint's masks")
    ed.add_argument("--threads", type=int, default=env.threads)
    ed.set_defaults(func=cmd_evaluate_dual)

    serve = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface (default: %(default)s; 0.0.0.0 in Docker)"
    )
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--http-threads", type=int, default=8, help="request threads per worker")
    serve.add_argument("--dev", action="store_true", help="Flask's development server, one process")
    serve.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    serve.add_argument("--model-dir", default=None, help="MODEL_DIR")
    serve.set_defaults(func=cmd_serve)

    sy = sub.add_parser("sync", help=cmd_sync.__doc__, description=cmd_sync.__doc__)
    sy.add_argument("--project", type=int, required=True, help="Label Studio project id")
    sy.add_argument("--export", default=None, help="read this JSON export instead of asking Label Studio")
    sy.add_argument(
        "--config", default=None, help="with --export: the labeling config XML (default: bcc.xml)"
    )
    sy.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    sy.set_defaults(func=cmd_sync)

    wk = sub.add_parser("worker", help=cmd_worker.__doc__, description=cmd_worker.__doc__)
    wk.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    wk.set_defaults(func=cmd_worker)

    md = sub.add_parser("models", help=cmd_models.__doc__, description=cmd_models.__doc__)
    md.add_argument("action", choices=["list", "promote", "promote-lesion"])
    md.add_argument(
        "checkpoint",
        nargs="?",
        help="promote: a checkpoint file, a registered version or 'release' (the released model); "
        "promote-lesion: the segmentation checkpoint",
    )
    md.add_argument("dual", nargs="?", help="promote-lesion: the dual-encoder checkpoint")
    md.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    md.add_argument("--model-dir", default=None, help="MODEL_DIR")
    md.set_defaults(func=cmd_models)

    demo = sub.add_parser(
        "demo",
        help="the main job: Label Studio + the backend with a pre-annotated study",
        description=cmd_demo.__doc__,
    )
    demo.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help="output folder (default: %(default)s)")
    demo.add_argument(
        "--no-label-studio", action="store_true", help="headless: study, store, consensus and report only"
    )
    demo.add_argument("--no-wait", action="store_true", help="stop the servers once everything is set up")
    demo.add_argument(
        "--synthetic",
        action="store_true",
        help="the synthetic study (drawings with pattern truth, a model trained on them) instead of the "
        "real HAM10000 sample served by the released models",
    )
    demo.add_argument("--epochs", type=int, default=4, help="training epochs of the demo model (default: 4)")
    demo.add_argument("--ls-port", type=int, default=8080, help="Label Studio's port if free (default: 8080)")
    demo.add_argument("--port", type=int, default=9090, help="the backend's port if free (default: 9090)")
    _add_synth_options(demo, n=120)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dermassist`` console script."""
    from backend.settings import Settings, SettingsError

    try:
        env = Settings.from_env()  # the environment, read once; its values are the options' defaults
    except SettingsError as exc:
        print(f"dermassist: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(env)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    func: Callable[[argparse.Namespace], int] = args.func
    from backend.label_studio.client import LabelStudioError

    try:
        return func(args)
    except (ValueError, FileExistsError, FileNotFoundError, LabelStudioError) as exc:
        # Bad input gets one clear line, not a traceback.
        print(f"dermassist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dermassist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
