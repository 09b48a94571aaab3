"""The ``dermassist`` argument parser: every subcommand, its options and their defaults (the settings)."""

from __future__ import annotations

import argparse
import logging
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.settings import Settings

from backend.cli.acquisition import cmd_next_batch, cmd_next_reads
from backend.cli.adjudication import cmd_adjudicate, cmd_import_gold
from backend.cli.bundle import cmd_study_freeze, cmd_study_verify
from backend.cli.common import _version
from backend.cli.service import cmd_models, cmd_predict, cmd_serve, cmd_sync, cmd_worker
from backend.cli.study import (
    DEFAULT_DEMO_DIR,
    cmd_consensus_run,
    cmd_demo,
    cmd_export,
    cmd_gradcam_agreement,
    cmd_import_ratings,
    cmd_synth,
)
from backend.cli.training import (
    cmd_evaluate,
    cmd_evaluate_dual,
    cmd_evaluate_seg,
    cmd_train,
    cmd_train_dual,
    cmd_train_seg,
)
from labeling_config.schema import ACQUISITION_STRATEGIES
from model.common.acquisition import POOL_FACTOR

logger = logging.getLogger("dermassist")


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
    imp.add_argument(
        "--regions",
        action="store_true",
        help="also the raters' painted regions beside the file (regions/<rater>/<image_id>_<pattern>.png)",
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
    crun.add_argument(
        "--rater-model",
        choices=("select", "full", "one-coin", "pooled", "pooled-one-coin"),
        default=None,
        help="the rater model of every label; select (the default) chooses per label by held-out answer "
        "likelihood among the other four",
    )
    crun.add_argument("--no-gold", action="store_true", help="leave the store's gold labels out of the fit")
    crun.set_defaults(func=cmd_consensus_run)
    gold = cons_sub.add_parser(
        "import-gold", help=cmd_import_gold.__doc__, description=cmd_import_gold.__doc__
    )
    gold.add_argument("file", help="CSV: image_id, diagnosis[, source][, date]")
    gold.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    gold.set_defaults(func=cmd_import_gold)
    gca = cons_sub.add_parser(
        "gradcam-agreement", help=cmd_gradcam_agreement.__doc__, description=cmd_gradcam_agreement.__doc__
    )
    gca.add_argument("--out", required=True, help="a folder: gradcam_agreement.csv (+ _images.csv) go there")
    gca.add_argument("--run", type=int, default=None, help="consensus run id (default: the latest)")
    gca.add_argument(
        "--model",
        action="append",
        default=None,
        help="a registered version / release, or a checkpoint; repeat for several (default: the promoted)",
    )
    gca.add_argument(
        "--images", default=None, help="a study folder with the images (default: fetched from Label Studio)"
    )
    gca.add_argument("--engine", choices=["onnxruntime", "torch"], default="onnxruntime")
    gca.add_argument(
        "--threshold",
        type=_probability,
        default=0.5,
        help="IoU: the map's region is >= this share of its peak",
    )
    gca.add_argument("--tolerance", type=int, default=0, help="pointing game tolerance in pixels")
    gca.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default: %(default)s)")
    gca.add_argument("--seed", type=int, default=0)
    gca.add_argument(
        "--all-regions",
        action="store_true",
        help="score every non-empty region, also of patterns the consensus says are absent",
    )
    gca.set_defaults(func=cmd_gradcam_agreement)
    for p in (imp, crun, gca):
        p.add_argument(
            "--db",
            default=None,
            help="database URL (default: DATABASE_URL, else sqlite:///dermassist.sqlite)",
        )

    ex = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    ex.add_argument("--format", choices=["csv", "json", "ls-import", "report", "regions"], required=True)
    ex.add_argument("--out", required=True, help="a folder for csv and regions, a file for the others")
    ex.add_argument("--run", type=int, default=None, help="consensus run id (default: the latest)")
    ex.add_argument(
        "--truth", default=None, help="report: a labels.csv with known truth, for a calibration curve"
    )
    ex.add_argument(
        "--gradcam",
        default=None,
        help="report: a Grad-CAM agreement CSV (consensus gradcam-agreement) for the regions section",
    )
    ex.add_argument(
        "--reads-confidence",
        type=float,
        default=0.999,
        help="report: the adaptive-reads rule, an image is done at this posterior (default: %(default)s)",
    )
    ex.add_argument(
        "--min-reads", type=int, default=3, help="report: ... after this many reads (default: %(default)s)"
    )
    ex.add_argument(
        "--config",
        default=str(resources.files("labeling_config") / "bcc.xml"),
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

    study = sub.add_parser("study", help="a frozen study bundle: freeze, verify")
    study_sub = study.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    fr = study_sub.add_parser("freeze", help=cmd_study_freeze.__doc__, description=cmd_study_freeze.__doc__)
    fr.add_argument("--out", required=True, help="a new (or empty) folder for the bundle")
    fr.add_argument("--run", type=int, default=None, help="consensus run id (default: the latest BCC run)")
    fr.add_argument("--config", default=None, help="the Label Studio labeling config XML (default: bcc.xml)")
    fr.add_argument(
        "--n-boot",
        type=int,
        default=None,
        help="bootstrap resamples of the agreement intervals (default 1000)",
    )
    fr.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    fr.set_defaults(func=cmd_study_freeze)
    ve = study_sub.add_parser("verify", help=cmd_study_verify.__doc__, description=cmd_study_verify.__doc__)
    ve.add_argument("bundle", help="the bundle's folder")
    ve.add_argument("--config", default=None, help="the config given to freeze, if any")
    ve.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    ve.set_defaults(func=cmd_study_verify)

    adj = sub.add_parser("adjudicate", help=cmd_adjudicate.__doc__, description=cmd_adjudicate.__doc__)
    adj.add_argument("--project", type=int, required=True, help="the readers' Label Studio project id")
    adj.add_argument("--adjudicator", required=True, help="the senior dermatologist (name or e-mail)")
    adj.add_argument("--low", type=_probability, default=0.0, help="disputed: posterior >= this (default 0)")
    adj.add_argument("--high", type=_probability, default=0.9, help="... and < this (default: %(default)s)")
    adj.add_argument(
        "--no-majority",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also images whose readers split evenly (default: on)",
    )
    adj.add_argument("--min-answers", type=int, default=2, help="ignore images with fewer reads")
    adj.add_argument("--labels", default=None, help="comma-separated label keys (default: all)")
    adj.add_argument("--out", default=None, help="also write the queue as CSV here")
    adj.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    adj.set_defaults(func=cmd_adjudicate)

    nb = sub.add_parser("next-batch", help=cmd_next_batch.__doc__, description=cmd_next_batch.__doc__)
    nb.add_argument("--project", type=int, required=True, help="Label Studio project id")
    nb.add_argument("--size", type=int, default=20, help="tasks in the batch (default: %(default)s)")
    nb.add_argument(
        "--strategy",
        choices=ACQUISITION_STRATEGIES,
        default=None,
        help="default: the config's <Image acquisition>, else ACQUISITION",
    )
    nb.add_argument(
        "--pool-factor",
        type=int,
        default=1,
        help="pick among this many times --size of the most uncertain, spread out in the model's "
        "embedding (default: %(default)s, no spreading: it cost labels on derm-dev, docs/RESULTS.md; "
        f"{POOL_FACTOR} is the usual choice)",
    )
    nb.add_argument("--view", action="store_true", help='show the batch as the Label Studio tab "Next batch"')
    nb.add_argument("--out", default=None, help="also write the batch as CSV here")
    nb.add_argument("--quiet", action="store_true", help="no progress bar")
    nb.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    nb.add_argument("--model-dir", default=None, help="MODEL_DIR")
    nb.set_defaults(func=cmd_next_batch)

    nr = sub.add_parser("next-reads", help=cmd_next_reads.__doc__, description=cmd_next_reads.__doc__)
    nr.add_argument("--project", type=int, required=True, help="the readers' Label Studio project id")
    nr.add_argument("--label", default="bcc", help="the label whose consensus decides (default: %(default)s)")
    nr.add_argument(
        "--confidence",
        type=float,
        default=0.999,
        help="an image is done at this posterior (default: %(default)s)",
    )
    nr.add_argument(
        "--min-reads", type=int, default=3, help="... after this many reads (default: %(default)s)"
    )
    nr.add_argument("--max-reads", type=int, default=None, help="an image with this many reads is done")
    nr.add_argument("--per-reader", type=int, default=None, help="at most this many images per reader")
    nr.add_argument(
        "--view", action="store_true", help='one Label Studio tab per reader: "Next reads: <reader>"'
    )
    nr.add_argument("--out", default=None, help="also write the queue as CSV here")
    nr.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    nr.set_defaults(func=cmd_next_reads)

    pr = sub.add_parser("predict", help=cmd_predict.__doc__, description=cmd_predict.__doc__)
    pr.add_argument("--project", type=int, required=True, help="Label Studio project id")
    which = pr.add_mutually_exclusive_group()
    which.add_argument(
        "--missing",
        dest="all",
        action="store_false",
        help="only tasks without a prediction of the served model version (the default)",
    )
    which.add_argument(
        "--all",
        dest="all",
        action="store_true",
        help="every task; a task's prediction of the same version is replaced",
    )
    pr.add_argument(
        "--batch-size", type=int, default=32, help="tasks per page and per post (default: %(default)s)"
    )
    pr.add_argument("--db", default=None, help="database URL (default: DATABASE_URL)")
    pr.add_argument("--model-dir", default=None, help="MODEL_DIR")
    pr.set_defaults(func=cmd_predict, all=False)

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
