"""The main job, live: Label Studio and the backend on localhost with a pre-annotated BCC screening project.

``dermassist demo`` (``make demo``), on real dermoscopy:

1. copies the real HAM10000 sample shipped in ``sample/ham10000`` (64 images, 8 BCC; CC BY-NC 4.0) and
   simulates four dermatologists who give each image a diagnosis (BCC / non-BCC) with known
   sensitivity and specificity. The sample's truth is the diagnosis only: nobody labelled dermoscopic
   patterns on these images, so the simulated dermatologists do not either (none is invented);
2. starts Label Studio (its own venv, a fresh copy of the migrated template) and ``dermassist serve`` on
   loopback, which serves the released models (``models/``) with no training and no promote step;
   creates the project from ``labeling_config/bcc_lesion.xml``, uploads the images, connects the backend;
3. the four dermatologists annotate the first half of the images through the API (webhooks fill the
   store), and two of them the next quarter; the backend pre-annotates every image: the diagnosis, the
   lesion outline (U-Net) and, for a predicted BCC, where it is (Grad-CAM inside the outline). Outputs
   not validated on real images (the six BCC patterns) are not shown;
4. runs the consensus and one retraining (the Train button), and writes the study report;
5. shows what to label next: the task score is the acquisition strategy's (``least_confidence``, the
   best in the label-efficiency study), the tab "Next batch" holds the batch it picks (``dermassist
   next-batch``), and one tab per dermatologist holds the images that still need their read
   (``dermassist next-reads``);
6. prints the URL, the login and what to look at, and keeps both servers up until Ctrl-C.

``dermassist demo --synthetic`` runs the earlier study instead: synthetic drawings with pattern truth,
a model trained on them for a few minutes, every output shown (``SHOW_OUTPUTS=all``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.demo import label_studio as ls_server
from backend.demo import study as ls_study
from backend.demo.processes import DERMASSIST, free_port, start_serve, stop
from backend.label_studio.client import connect, label_studio_errors
from labeling_config import load_config

PROJECT_TITLE = "BCC screening (dermassist demo)"
#: The demo's study wants three reads of an image, more only where the consensus is unsure.
MIN_READS = 3


SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "ham10000"
#: The simulated dermatologists: (sensitivity, specificity) for BCC, as in reader studies of dermoscopy.
RATERS = {
    "dermatologist_1": (0.95, 0.97),
    "dermatologist_2": (0.90, 0.93),
    "dermatologist_3": (0.85, 0.95),
    "dermatologist_4": (0.75, 0.90),
}


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    synthetic: bool = False
    sample: Path = SAMPLE
    n: int = 120
    size: int = 256
    seed: int = 0
    annotated_share: float = 0.5
    two_read_share: float = 0.25  # the next images, read by two dermatologists so far
    acquisition: str = "least_confidence"  # the best of the label-efficiency study (RESULTS)
    next_batch: int = 8
    image_size: int = 160
    epochs: int = 4
    ls_port: int = 8080
    backend_port: int = 9090
    wait: bool = True
    progress: bool = True


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def _port(preferred: int) -> int:
    import socket

    if preferred == 0:
        return free_port()
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def _dermassist_out(exe: Path, env: dict[str, str], *args: str) -> str:
    """``dermassist ARGS``'s last line (its summary)."""
    done = subprocess.run([str(exe), *args], env=env, check=True, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _model_version(backend_url: str, xml: str) -> str:
    """The model version that fills this config's predictions (both systems' joined by + where both do)."""
    request = urllib.request.Request(
        f"{backend_url}/setup", json.dumps({"schema": xml}).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
        return str(json.loads(response.read())["model_version"])


def _id(value: int | None) -> int:
    """An id Label Studio answered (the SDK's types mark every id optional)."""
    if value is None:
        raise RuntimeError("Label Studio answered without an id")
    return value


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
        return json.loads(response.read())


def _train(config: DemoConfig, study: Path) -> Path:
    from model.common.imagenet import imagenet_weights_path
    from model.multitask.train import TrainConfig, train

    weights = "imagenet" if imagenet_weights_path().is_file() else None
    _say(
        f"training the model on {config.n} images for {config.epochs} epochs "
        f"({'ImageNet start' if weights else 'from scratch: `make weights` gives an ImageNet start'})"
    )
    result = train(
        TrainConfig(
            data=str(study),
            out=str(config.out / "model"),
            weights=weights,
            epochs=config.epochs,
            patience=config.epochs,
            image_size=config.image_size,
            output_stride=16,
            cam_loss=1.0,
            batch_size=16,
            progress=config.progress,
        )
    )
    return result.best


def real_study(sample: Path, out: Path, seed: int = 0) -> int:
    """Copy the real sample to ``out`` and write the simulated dermatologists' ``ratings.csv`` (diagnosis
    only: the sample's truth); returns the number of images.

    Raises:
        FileNotFoundError: the sample is missing (a checkout without ``sample/``).
    """
    import numpy as np
    import pandas as pd

    if not (sample / "labels.csv").is_file():
        raise FileNotFoundError(
            f"the real sample {sample} is missing; `dermassist demo --synthetic` needs none"
        )
    shutil.copytree(sample, out)
    labels = pd.read_csv(out / "labels.csv", dtype={"image_id": str})
    rng = np.random.default_rng(seed)
    rows = []
    for image_id, truth in zip(labels["image_id"], labels["bcc"].astype(int), strict=True):
        for rater, (sensitivity, specificity) in RATERS.items():
            right = rng.random() < (sensitivity if truth else specificity)
            rows.append((image_id, rater, "bcc", truth if right else 1 - truth))
    pd.DataFrame(rows, columns=["image_id", "rater", "label", "value"]).to_csv(
        out / "ratings.csv", index=False
    )
    return len(labels)


def _showcase(predictions: list[dict[str, Any]], tasks: set[int], version: str) -> int | None:
    """The unannotated task whose current prediction draws the most regions (the best first look)."""
    best: tuple[int, float, int] | None = None
    for p in predictions:
        if p["task"] not in tasks or p.get("model_version") != version:
            continue
        regions = sum(1 for item in p.get("result", []) if item.get("type") == "brushlabels")
        key = (regions, float(p.get("score") or 0.0), int(p["task"]))
        if best is None or key > best:
            best = key
    return best[2] if best is not None and best[0] > 0 else None


def run(config: DemoConfig) -> int:
    """Run the live demo; returns the exit status."""
    import pandas as pd

    from model.synthetic import SynthConfig, contact_sheet, generate

    out = config.out
    for stale in ("label-studio", "models", "model", "dermassist.sqlite", "study", "consensus"):
        target = out / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    study = out / "study"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{out / 'dermassist.sqlite'}",
        "MODEL_DIR": str(out / "models"),
        "TRAIN_EPOCHS": "2",
        "LOG_LEVEL": "WARNING",
        "ACQUISITION": config.acquisition,
    }
    exe = DERMASSIST
    if config.synthetic:
        _say(f"drawing a synthetic study of {config.n} images with four simulated dermatologists")
        generate(SynthConfig(n=config.n, size=config.size, raters=4, seed=config.seed), study)
        contact_sheet(study).save(study / "contact_sheet.png")
        checkpoint = _train(config, study)
        # A model that saw only drawings: every output shown, no release beside it.
        env.update({"RELEASE_DIR": "none", "SHOW_OUTPUTS": "all"})
        subprocess.run(
            [str(exe), "models", "promote", str(checkpoint)], env=env, check=True, capture_output=True
        )
        xml = load_config("bcc")
    else:
        n_images = real_study(config.sample, study, config.seed)
        _say(
            f"{n_images} real dermoscopic images (HAM10000, CC BY-NC 4.0) and four simulated dermatologists "
            "who give the diagnosis; the images have no pattern truth, so nobody labels patterns"
        )
        xml = load_config("bcc_lesion")

    _say("starting Label Studio (the first run migrates its database: 1-2 minutes, once)")
    ls = ls_server.start(out / "label-studio", port=_port(config.ls_port))
    backend: subprocess.Popen[bytes] | None = None
    try:
        with label_studio_errors(ls.url), connect(ls.url, ls.token) as client:
            env.update({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token})
            backend_port = _port(config.backend_port)
            backend_url = f"http://127.0.0.1:{backend_port}"
            backend = start_serve(env, backend_port, out / "backend.log")
            health = _get(f"{backend_url}/health")
            if not config.synthetic:
                if health.get("release") is None:
                    raise RuntimeError(
                        f"the backend serves {health.get('model_version')}, not the released model: "
                        "is models/release.json there (RELEASE_DIR)?"
                    )
                _say(
                    f"the backend serves the released model {health['release']} "
                    "(no training, no promote step)"
                )

            project = _id(
                client.projects.create(
                    title=PROJECT_TITLE, label_config=xml, maximum_annotations=4, show_collab_predictions=True
                ).id
            )
            images = sorted((study / "images").iterdir())
            client.upload_files(project, images)
            tasks = ls_study.wait_for(
                lambda: found if len(found := ls_study.tasks(client, project)) == len(images) else None,
                120,
                "tasks",
            )
            ml = _id(
                client.ml.create(project=project, url=backend_url, title="dermassist", is_interactive=True).id
            )
            by_image = {ls_study.image_id_of(t["data"]["image"]): t["id"] for t in tasks}
            ordered = sorted(by_image)
            annotated = {i: by_image[i] for i in ordered[: int(len(ordered) * config.annotated_share)]}
            rest = [by_image[i] for i in ordered[len(annotated) :]]
            two_read = {
                i: by_image[i]
                for i in ordered[len(annotated) : len(annotated) + int(len(ordered) * config.two_read_share)]
            }

            ratings = pd.read_csv(study / "ratings.csv", dtype={"image_id": str})
            raters = sorted(ratings["rater"].unique())
            users = dict(zip(raters, ls_study.create_raters(client, raters), strict=True))
            _say(f"four dermatologists annotate {len(annotated)} images (webhooks fill the store)")
            n = ls_study.annotate(client, study, annotated, users, config.size if config.synthetic else 0)
            if two_read:
                _say(f"two of them read the next {len(two_read)} images")
                n += ls_study.annotate(
                    client, study, two_read, users, config.size if config.synthetic else 0, raters=raters[:2]
                )

            _say(f"the backend pre-annotates all {len(images)} images")
            ls_study.retrieve_predictions(client, project)
            ls_study.wait_for(
                lambda: len({p["task"] for p in ls_study.predictions(client, project)}) >= len(images),
                300,
                "predictions",
            )

            _say("consensus and one retraining (the Train button)")
            client.ml.train(id=ml)
            job = ls_study.wait_for(
                lambda: next(
                    (
                        j
                        for j in _get(f"{backend_url}/jobs")["jobs"]
                        if j["status"] in ("succeeded", "failed")
                    ),
                    None,
                ),
                900,
                "the training job",
                every=2.0,
            )
            version = _model_version(backend_url, xml)
            if job["status"] == "succeeded":
                why = next((line for line in job.get("log", []) if "not promoted" in line), "")
                why = (
                    why.split("not promoted: ", 1)[-1]
                    if why
                    else "the new one was not better on the validation split"
                )
                outcome = "promoted" if job["promoted"] else f"kept the previous model ({why})"
                _say(f"retraining {outcome}; serving {version}")
                ls_study.retrieve_predictions(client, project, rest)
            else:
                _say(f"retraining failed: {job['error']}")
            client.projects.update(id=project, model_version=version)
            _say(f"what to label next ({config.acquisition}) and who reads what next")
            picked = _dermassist_out(
                exe, env, "next-batch", "--project", str(project), "--size", str(config.next_batch), "--view",
                "--quiet",
            )  # fmt: skip
            reads = _dermassist_out(
                exe, env, "next-reads", "--project", str(project), "--min-reads", str(MIN_READS), "--view"
            )
            report = out / "consensus" / "report.html"
            subprocess.run(
                [str(exe), "export", "--format", "report", "--out", str(report),
                 "--min-reads", str(MIN_READS)],
                env=env,
                check=True,
                capture_output=True,
            )  # fmt: skip

            minutes = (time.monotonic() - t0) / 60
            if config.synthetic:
                look = (
                    "the diagnosis and the patterns are ticked, the Grad-CAM regions are drawn over the "
                    "image;"
                )
                sheet = (study / "contact_sheet.png").resolve()
                extra = f"the study's images with every pattern outlined: {sheet}"
            else:
                look = (
                    "a real dermoscopic image: the diagnosis is ticked, the lesion outline (U-Net) and,\n"
                    "    for a predicted BCC, where it is (Grad-CAM inside the outline) are drawn; the six "
                    "BCC\n    patterns are not shown: no real image with them labelled trained or validated "
                    "them;"
                )
                extra = f"what each output was validated on: {backend_url}/versions and models/*.md"
            first = _showcase(ls_study.predictions(client, project), set(rest), version) or (rest or [0])[0]
            print(
                f"""
    dermassist demo is up ({minutes:.1f} min).

      Label Studio   {ls.url}/projects/{project}/data
                     login {ls_server.ADMIN_EMAIL} / {ls_server.ADMIN_PASSWORD}
      backend        {backend_url}  (/health, /versions, /jobs, /metrics)

    Look at:
      - a pre-annotated image: {ls.url}/projects/{project}/data?task={first}
        {look}
      - the data manager sorted by prediction score, ascending: the images the {config.acquisition} strategy
        would label first (the score is 1 - its uncertainty; README, "The task score");
      - the tab "Next batch": the {config.next_batch} unlabelled images the {config.acquisition} strategy
        would label next ({picked})
      - the tabs "Next reads: <dermatologist>": the images that need another read (posterior < 0.999
        or fewer than three reads), each for a dermatologist who has not read it
        ({reads})
      - the first {len(annotated)} tasks: read by four simulated dermatologists, the next {len(two_read)} by
        two ({n} annotations);
      - the consensus report: {report.resolve()}
      - {extra}
    """,
                flush=True,
            )
            if config.wait:
                print("Press Ctrl-C to stop Label Studio and the backend.", flush=True)
                stopped = threading.Event()
                signal.signal(signal.SIGTERM, lambda *_: stopped.set())
                try:
                    while not stopped.wait(1.0):
                        pass
                except KeyboardInterrupt:
                    pass
            return 0
    finally:
        if backend is not None:
            stop(backend)
        ls.stop()
        _say("stopped Label Studio and the backend")
