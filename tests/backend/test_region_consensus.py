"""Region consensus through the backend: Label Studio brush annotations -> store -> `dermassist consensus
run` (STAPLE over the painted pattern regions) -> exported as PNG masks and as brush ground truth; and the
served model's Grad-CAM agreement with those regions (`dermassist consensus gradcam-agreement`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from backend.cli import main
from backend.label_studio.annotations import parse_result
from backend.label_studio.brush import decode_region
from backend.label_studio.predictions import brush_item
from backend.serving.multitask import load_served, run_batch
from backend.training.gradcam_agreement import gradcam_agreement
from consensus.db import init_db
from consensus.models import ConsensusRun, Item, Source
from consensus.region_export import region_masks
from consensus.regions import region_key
from consensus.repository import (
    consensus_masks,
    consensus_table,
    get_or_create_item,
    get_or_create_rater,
    upsert_annotation,
)
from labeling_config import load_config, parse_config
from model.common.agreement import spatial_agreement
from model.common.maps import scale_maps

CONFIG = parse_config(load_config("bcc"))
H, W = 40, 48


def blob(top: int, left: int, h: int = 12, w: int = 14) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top : top + h, left : left + w] = True
    return mask


def ls_result(bcc: bool, patterns: dict[str, np.ndarray | None]) -> list[dict]:
    """A rater's Label Studio result: diagnosis, the patterns chosen, one brush per painted pattern."""
    display = CONFIG.patterns.values
    result = [
        {"from_name": "diagnosis", "to_name": "image", "type": "choices",
         "value": {"choices": ["BCC" if bcc else "non-BCC"]}},
        {"from_name": "patterns", "to_name": "image", "type": "choices",
         "value": {"choices": [display[k] for k in patterns]}},
    ]  # fmt: skip
    result += [brush_item("regions", "image", display[k], m) for k, m in patterns.items() if m is not None]
    return result


PN, UL = "pigment_network", "ulceration"
STUDY = {
    "img1": {
        "r1": ls_result(False, {PN: blob(5, 5)}),
        "r2": ls_result(False, {PN: blob(6, 6)}),
        "r3": ls_result(False, {PN: blob(5, 8)}),
    },
    "img2": {
        "r1": ls_result(True, {UL: blob(20, 20, 8, 8)}),
        "r2": ls_result(True, {UL: blob(21, 20, 8, 8)}),
        "r3": ls_result(True, {}),  # said no pattern: an empty ulceration mask
    },
}


def store(db: str, study: dict = STUDY) -> None:
    engine, sessions = init_db(db)
    try:
        with sessions.begin() as session:
            for image, by_rater in study.items():
                item = get_or_create_item(session, image)
                for name, result in by_rater.items():
                    parsed = parse_result(result, CONFIG)
                    rater = get_or_create_rater(session, name=name)
                    upsert_annotation(session, item, rater, parsed.labels, Source.WEBHOOK, parsed.diagnosis,
                                      parsed.regions)  # fmt: skip
    finally:
        engine.dispose()


def test_the_cli_fuses_painted_regions_and_exports_them_as_pngs_and_brush_ground_truth(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'store.sqlite'}"
    store(db)
    assert main(["consensus", "run", "--db", db]) == 0
    engine, sessions = init_db(db)
    try:
        with sessions() as session:
            run = session.query(ConsensusRun).one()
            pn = consensus_masks(session, run, region_key(PN))
            ul = consensus_masks(session, run, region_key(UL))
    finally:
        engine.dispose()
    assert run.method.endswith("+STAPLE")
    assert set(pn) == {"img1"} and set(ul) == {"img2"}
    assert (pn["img1"] == (blob(5, 5).astype(int) + blob(6, 6) + blob(5, 8) >= 2)).all()  # the majority here
    assert ul["img2"].any() and not (ul["img2"] & ~(blob(20, 20, 8, 8) | blob(21, 20, 8, 8))).any()

    out = tmp_path / "regions"
    assert main(["export", "--format", "regions", "--out", str(out), "--db", db]) == 0
    with Image.open(out / "regions" / "img1_pigment_network.png") as im:
        assert im.mode == "L" and (np.asarray(im) > 127).tolist() == pn["img1"].tolist()
    table = pd.read_csv(out / "region_consensus.csv")
    assert table[["image_id", "pattern", "n_raters"]].values.tolist() == [["img1", PN, 3], ["img2", UL, 3]]
    assert table["png"].tolist() == ["regions/img1_pigment_network.png", "regions/img2_ulceration.png"]
    rates = pd.read_csv(out / "region_reliability.csv")
    assert len(rates) == 6 and rates["sensitivity"].between(0, 1).all()
    assert rates.set_index(["pattern", "rater"]).loc[(UL, "r3"), "sensitivity"] == pytest.approx(0, abs=1e-6)

    ls = tmp_path / "ls.json"
    assert main(["export", "--format", "ls-import", "--out", str(ls), "--db", db]) == 0
    assert "2 consensus regions as brush ground truth" in capsys.readouterr().out
    tasks = {t["data"]["image_id"]: t for t in json.loads(ls.read_text())}
    (truth,) = [a for a in tasks["img1"]["annotations"] if a["ground_truth"]]
    brushes = [r for r in truth["result"] if r["type"] == "brushlabels"]
    assert [b["value"]["brushlabels"] for b in brushes] == [["Pigment network"]]
    assert brushes[0]["from_name"] == "regions" and brushes[0]["original_width"] == W
    decoded = decode_region({"rle": brushes[0]["value"]["rle"], "width": W, "height": H})
    assert decoded is not None and (decoded == pn["img1"]).all()
    # The consensus choices are still there beside the brushes.
    assert any(r["type"] == "choices" for r in truth["result"])


def test_import_ratings_with_regions_then_gradcam_agreement(small_study, tiny_checkpoint, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'store.sqlite'}"
    assert (
        main(["consensus", "import-ratings", str(small_study / "ratings.csv"), "--regions", "--db", db]) == 0
    )
    assert "painted regions" in capsys.readouterr().out
    assert main(["consensus", "run", "--db", db]) == 0
    out = tmp_path / "agreement"
    released = Path(__file__).resolve().parents[2] / "models" / "dermnet-bcc.pt"
    args = ["consensus", "gradcam-agreement", "--db", db, "--model", str(tiny_checkpoint), "--model",
            str(released), "--images", str(small_study), "--out", str(out), "--n-boot", "200"]  # fmt: skip
    assert main(args) == 0
    both = pd.read_csv(out / "gradcam_agreement.csv")
    served = load_served(tiny_checkpoint)
    # One block of rows per model version, in the order given.
    assert both["model_version"].drop_duplicates().tolist() == [served.version, load_served(released).version]
    summary = both[both["model_version"] == served.version]
    per_image = pd.read_csv(out / "gradcam_agreement_images.csv", dtype={"image_id": str})
    per_image = per_image[per_image["model_version"] == served.version]
    engine, sessions = init_db(db)
    try:
        with sessions() as session:
            run = session.query(ConsensusRun).one()
            masks = region_masks(session, run)
            labels = consensus_table(session, run)
    finally:
        engine.dispose()
    present = set(
        labels.loc[labels["value"] == "1", "task"] + "/" + labels.loc[labels["value"] == "1", "label_key"]
    )
    scored = [p for t, found in masks.items() for p, m in found.items() if m.any() and f"{t}/{p}" in present]
    expected = pd.Series(scored).value_counts()
    assert 0 < len(scored) < sum(m.any() for found in masks.values() for m in found.values())
    assert summary.set_index("pattern")["n_images"].to_dict() == expected.to_dict()
    for figure in ("energy_inside", "pointing", "iou", "area"):
        assert both[figure].between(0, 1).all()
        assert (both[f"{figure}_low"] <= both[figure] + 1e-12).all()
        assert (both[figure] <= both[f"{figure}_high"] + 1e-12).all()
    # One image by hand: the same map, scaled to the image, scored against the same region.
    row = per_image.iloc[0]
    with Image.open(small_study / "images" / f"{row['image_id']}.jpg") as im:
        (output,) = run_batch(served, [im.convert("RGB")])
    mask = masks[row["image_id"]][row["pattern"]]
    cam = scale_maps(output.maps[served.meta.targets.index(row["pattern"])], mask.shape)
    found = spatial_agreement(cam, mask)
    for figure in ("energy_inside", "pointing", "iou", "area"):
        assert row[figure] == pytest.approx(found[figure], abs=1e-6)


def test_a_region_covering_the_image_holds_all_the_energy_and_the_peak(
    tiny_checkpoint, small_study, tmp_path
):
    engine, sessions = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    image_id = pd.read_csv(small_study / "labels.csv", dtype={"image_id": str})["image_id"].iloc[0]
    with Image.open(small_study / "images" / f"{image_id}.jpg") as im:
        size = (im.height, im.width)
    everywhere, corner = np.ones(size, bool), np.zeros(size, bool)
    corner[:2, :2] = True
    # Pigment network and ulceration chosen and painted; maple leaf painted but not chosen (absent).
    maple = brush_item("regions", "image", "Maple leaf-like areas", corner)
    result = [*ls_result(False, {PN: everywhere, UL: corner}), maple]
    try:
        with sessions.begin() as session:
            item = get_or_create_item(session, image_id)
            parsed = parse_result(result, CONFIG)
            upsert_annotation(session, item, get_or_create_rater(session, name="r1"), parsed.labels,
                              Source.WEBHOOK, parsed.diagnosis, parsed.regions)  # fmt: skip
        from consensus.service import run_consensus

        with sessions.begin() as session:
            run_id = run_consensus(session, decode=decode_region).id
        with sessions() as session:
            found = gradcam_agreement(
                session, run_id, load_served(tiny_checkpoint), lambda item: small_study / "images" /
                f"{item.external_id}.jpg", n_boot=50,
            )  # fmt: skip
            everything = gradcam_agreement(
                session, run_id, load_served(tiny_checkpoint), lambda item: small_study / "images" /
                f"{item.external_id}.jpg", n_boot=50, present_only=False,
            )  # fmt: skip
            with pytest.raises(ValueError, match="no consensus run"):
                gradcam_agreement(session, run_id + 1, load_served(tiny_checkpoint), lambda item: None)
            assert session.get(Item, 1) is not None
    finally:
        engine.dispose()
    assert found.summary["pattern"].tolist() == [PN, UL]  # in the model's output order
    assert everything.summary["pattern"].tolist() == [PN, UL, "maple_leaf"]
    by = found.summary.set_index("pattern")
    assert by.loc[PN, "energy_inside"] == pytest.approx(1.0) and by.loc[PN, "pointing"] == 1.0
    assert by.loc[PN, "area"] == 1.0
    assert by.loc[UL, "energy_inside"] < 0.05 and by.loc[UL, "area"] == pytest.approx(4 / (size[0] * size[1]))
