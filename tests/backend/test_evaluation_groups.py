"""Evaluation intervals resample what the data group: `dermassist evaluate` and evaluate-dual over the
dataset's lesions, the Grad-CAM agreement over the lesions and patients the tasks' data name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from backend.cli import main
from backend.label_studio.annotations import parse_result
from backend.label_studio.brush import decode_region
from backend.label_studio.predictions import brush_item
from backend.serving.multitask import load_served
from backend.training.gradcam_agreement import summarise
from consensus.db import init_db
from consensus.models import Source
from consensus.repository import get_or_create_item, get_or_create_rater, upsert_annotation
from labeling_config import load_config, parse_config
from model.common.data import load_table
from tests.backend.conftest import tiny_lesion_pair

CONFIG = parse_config(load_config("bcc"))
PN = "pigment_network"


def test_the_evaluate_command_resamples_the_lesions_and_says_so(
    small_study, tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "eval"
    assert (
        main(["evaluate", str(tiny_checkpoint), str(small_study), "--out", str(out), "--bootstrap", "10"])
        == 0
    )
    lesions = pd.read_csv(small_study / "labels.csv", dtype=str)["lesion_id"]
    said = f"bootstrap over {lesions.nunique()} lesions ({len(lesions)} images)"
    assert f"95% intervals: {said}" in capsys.readouterr().out
    assert f"95% {said}, 10 replicates" in (out / "report.html").read_text()


def test_evaluate_dual_resamples_lesions_and_says_so(small_study, tmp_path):
    from model.lesion.evaluate_dual import evaluate_dual

    _, dual = tiny_lesion_pair(tmp_path)
    table = load_table(small_study)
    others = iter(["akiec", "bkl"] * len(table))
    table["dx"] = ["bcc" if b else next(others) for b in table["bcc"]]
    found = evaluate_dual(
        dual, "unused", tmp_path / "eval", split="all", n_boot=10, gallery_size=0, table=table
    )
    n_lesions = table["lesion_id"].nunique()
    assert found["bootstrap"]["unit"] == "lesion" and found["bootstrap"]["n_units"] == n_lesions
    text = f"bootstrap over {n_lesions} lesions ({len(table)} images)"
    assert f"Intervals: 95% {text}, 10 replicates" in (tmp_path / "eval" / "report.html").read_text()
    images = evaluate_dual(
        dual, "unused", tmp_path / "img", split="all", n_boot=10, gallery_size=0, table=table, unit="image"
    )
    assert images["bootstrap"]["text"] == f"bootstrap over {len(table)} images"
    assert images["auroc_bcc"]["value"] == found["auroc_bcc"]["value"]


def test_gradcam_agreement_summary_resamples_the_groups_given():
    rng = np.random.default_rng(0)
    per_image = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(60)],
            "pattern": PN,
            **{f: rng.random(60) for f in ("energy_inside", "pointing", "iou", "area")},
        }
    )
    plain = summarise(per_image, "v1", n_boot=100, seed=0)
    assert plain.loc[0, "resampled"] == "images" and plain.loc[0, "n_groups"] == 60
    lesions = summarise(per_image, "v1", 100, 0, {f"i{k}": f"lesion:L{k // 3}" for k in range(60)})
    assert lesions.loc[0, "resampled"] == "lesions" and lesions.loc[0, "n_groups"] == 20
    assert lesions.loc[0, "iou"] == plain.loc[0, "iou"]
    assert lesions.loc[0, "iou_low"] != plain.loc[0, "iou_low"]
    patients = summarise(per_image, "v1", 100, 0, {"i0": "patient:P1", "i1": "patient:P1"})
    assert patients.loc[0, "resampled"] == "patients" and patients.loc[0, "n_groups"] == 59


def test_gradcam_agreement_groups_the_images_by_their_tasks_lesion(tiny_checkpoint, small_study, tmp_path):
    from backend.training.gradcam_agreement import gradcam_agreement
    from consensus.service import run_consensus

    engine, sessions = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    ids = pd.read_csv(small_study / "labels.csv", dtype={"image_id": str})["image_id"].iloc[:3].tolist()
    try:
        with sessions.begin() as session:
            rater = get_or_create_rater(session, name="r1")
            for k, image_id in enumerate(ids):
                with Image.open(small_study / "images" / f"{image_id}.jpg") as im:
                    everywhere = np.ones((im.height, im.width), bool)
                result = [
                    {"from_name": "diagnosis", "to_name": "image", "type": "choices",
                     "value": {"choices": ["non-BCC"]}},
                    {"from_name": "patterns", "to_name": "image", "type": "choices",
                     "value": {"choices": [CONFIG.patterns.values[PN]]}},
                    brush_item("regions", "image", CONFIG.patterns.values[PN], everywhere),
                ]  # fmt: skip
                # The first two images show one lesion.
                item = get_or_create_item(session, image_id, data={"lesion_id": "L1" if k < 2 else "L2"})
                parsed = parse_result(result, CONFIG)
                upsert_annotation(session, item, rater, parsed.labels, Source.WEBHOOK, parsed.diagnosis,
                                  parsed.regions)  # fmt: skip
        with sessions.begin() as session:
            run_id = run_consensus(session, decode=decode_region).id
        with sessions() as session:
            found = gradcam_agreement(
                session, run_id, load_served(tiny_checkpoint),
                lambda item: small_study / "images" / f"{item.external_id}.jpg", n_boot=20,
            )  # fmt: skip
    finally:
        engine.dispose()
    row = found.summary.set_index("pattern").loc[PN]
    assert row["n_images"] == 3 and row["resampled"] == "lesions" and row["n_groups"] == 2
    assert row["energy_inside"] == pytest.approx(1.0)
