"""Pattern-region consensus in the BCC run: STAPLE per image and pattern over the raters' painted regions,
stored with the run, equal to SimpleITK's STAPLEImageFilter on the same masks (constructed and real ISIC
2018 attribute masks perturbed per rater)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consensus.db import init_db
from consensus.models import ConsensusMask, ConsensusRun, Item, Rater, RaterReliability, Source
from consensus.regions import REGION_PREFIX, region_key
from consensus.repository import (
    consensus_masks,
    consensus_table,
    get_or_create_item,
    get_or_create_rater,
    upsert_annotation,
)
from consensus.service import run_consensus
from tests.conftest import shared_path
from tests.consensus.test_staple import simpleitk_staple

SIZE = (40, 48)


def decode(region):
    """The test's stand-in for Label Studio's RLE: the mask is stored as nested lists."""
    return np.asarray(region["mask"], dtype=bool) if "mask" in region else None


def painted(key: str, mask: np.ndarray) -> dict:
    return {"label": key, "mask": mask.astype(int).tolist()}


def blob(top: int, left: int, h: int = 12, w: int = 14, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[top : top + h, left : left + w] = True
    return mask


@pytest.fixture
def db(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(store_url)
    yield factory
    engine.dispose()


def seed(session: Session, study: dict[str, dict[str, tuple[dict[str, int], list[dict]]]]) -> None:
    """image -> rater -> (labels, regions)."""
    raters: dict[str, Rater] = {}
    for image, by_rater in study.items():
        item = get_or_create_item(session, image)
        for name, (labels, regions) in by_rater.items():
            if name not in raters:
                raters[name] = get_or_create_rater(session, name=name)
            upsert_annotation(
                session, item, raters[name], {"bcc": 0, **labels}, Source.WEBHOOK, None, regions
            )


PN, UL = "pigment_network", "ulceration"
A1, A2, A3 = blob(5, 5), blob(6, 5), blob(5, 7)  # three raters' versions of one network
STUDY = {
    # Three raters paint pigment network; r4 says absent: their empty mask is the fourth in STAPLE.
    "a": {
        "r1": ({PN: 1}, [painted(PN, A1)]),
        "r2": ({PN: 1}, [painted(PN, A2)]),
        "r3": ({PN: 1}, [painted(PN, A3[:, :]), painted(PN, blob(30, 30, 4, 4))]),  # two strokes: one mask
        "r4": ({PN: 0}, []),
    },
    # r2 says present but paints nothing: abstains. r3 did not answer. One painted mask, r4's empty one.
    "b": {
        "r1": ({PN: 1, UL: 1}, [painted(PN, blob(10, 10)), painted(UL, blob(20, 20, 6, 6))]),
        "r2": ({PN: 1}, []),
        "r4": ({PN: 0, UL: 0}, []),
    },
    # Nobody painted: no region consensus, whatever the choices say.
    "c": {"r1": ({PN: 1}, []), "r2": ({PN: 0}, [])},
    # An unreadable stroke: r2 abstains; r1 alone.
    "d": {"r1": ({PN: 1}, [painted(PN, blob(1, 1))]), "r2": ({PN: 1}, [{"label": PN}])},
}


def test_pattern_regions_are_fused_per_image_and_stored_with_the_run(db):
    with db.begin() as session:
        seed(session, STUDY)
    with db.begin() as session:
        run_id = run_consensus(session, decode=decode).id
    with db() as session:
        run = session.get_one(ConsensusRun, run_id)
        assert run.method.endswith("+STAPLE")
        assert run.params["regions"]["threshold"] == 0.5 and len(run.params["regions"]["data_hash"]) == 64
        masks = consensus_masks(session, run, region_key(PN))
        assert set(masks) == {"a", "b", "d"}
        rows = {
            (m.item_id, m.label_key): m
            for m in session.scalars(select(ConsensusMask).where(ConsensusMask.run_id == run_id))
        }
        by_task = {r.item_id: r for r in rows.values() if r.label_key == region_key(PN)}
        raters = sorted(r.raters for r in by_task.values())
        # a: the three painters and r4's empty mask; b: r1 and r4 (r2 abstains, r3 never answered); d: r1
        assert raters == [["r1"], ["r1", "r2", "r3", "r4"], ["r1", "r4"]]
        a_masks = [A1, A2, A3 | blob(30, 30, 4, 4), np.zeros(SIZE, bool)]
        w_itk, sens_itk, spec_itk = simpleitk_staple(a_masks)
        assert (masks["a"] == (w_itk >= 0.5)).all()
        detail = next(r.details for r in by_task.values() if len(r.raters) == 4)
        np.testing.assert_allclose(detail["sensitivity"], sens_itk, atol=1e-4)
        np.testing.assert_allclose(detail["specificity"], spec_itk, atol=1e-4)
        assert detail["sensitivity"][3] == pytest.approx(0.0, abs=1e-6)  # r4 marked none of it
        # b: one painter against one "absent": STAPLE keeps the painted blob or drops it, never grows it.
        assert not (masks["b"] & ~blob(10, 10)).any()
        assert (masks["d"] == blob(1, 1)).all()
        assert consensus_masks(session, run, region_key(UL)).keys() == {"b"}

        table = consensus_table(session, run)
        region_rows = table[table["label_key"].str.startswith(REGION_PREFIX)]
        assert set(region_rows["label_key"]) == {region_key(PN), region_key(UL)}
        # The Dawid-Skene labels are still there, under the pattern keys.
        assert {PN, UL, "bcc"} <= set(table["label_key"])

        reliability = session.execute(
            select(Rater.name, RaterReliability)
            .join(Rater, RaterReliability.rater_id == Rater.id)
            .where(RaterReliability.run_id == run_id, RaterReliability.label_key == region_key(PN))
        ).all()
        by_rater = dict(reliability)
        assert set(by_rater) == {"r1", "r2", "r3", "r4"}
        # r2 and r3 are in one STAPLE fit (a): their pooled rates are that fit's.
        assert by_rater["r2"].sensitivity == pytest.approx(sens_itk[1], abs=1e-4)
        assert by_rater["r3"].specificity == pytest.approx(spec_itk[2], abs=1e-4)
        assert by_rater["r2"].n_items == 1 and by_rater["r4"].n_items == 2
        assert by_rater["r1"].sensitivity_low is None  # no intervals for pixels


def test_without_a_decoder_the_run_has_no_regions(db):
    with db.begin() as session:
        seed(session, STUDY)
    with db.begin() as session:
        run = run_consensus(session)
        assert "STAPLE" not in run.method and "regions" not in run.params
        assert not session.scalars(select(ConsensusMask).where(ConsensusMask.run_id == run.id)).all()


def test_a_changed_region_changes_the_runs_region_hash(db):
    with db.begin() as session:
        seed(session, STUDY)
    with db.begin() as session:
        first = run_consensus(session, decode=decode)
        seed(session, {"a": {"r1": ({PN: 1}, [painted(PN, blob(8, 8))])}})
        second = run_consensus(session, decode=decode)
        assert first.data_hash == second.data_hash  # the answers did not change
        third = run_consensus(session, label_keys=["bcc"], decode=decode)  # no pattern: no region
        assert "STAPLE" not in third.method and "data_hash" in third.params["regions"]
        assert first.params["regions"]["data_hash"] != second.params["regions"]["data_hash"]


def perturbed(mask: np.ndarray, rater: int) -> np.ndarray:
    """A rater's version of a real attribute mask: eroded, dilated, shifted or as it is."""
    if rater == 0:
        return ndimage.binary_erosion(mask, iterations=2)
    if rater == 1:
        return ndimage.binary_dilation(mask, iterations=3)
    if rater == 2:
        return np.roll(mask, (3, -4), axis=(0, 1))
    return mask.copy()


def test_real_attribute_masks_perturbed_per_rater_match_simpleitk(tmp_path):
    from PIL import Image

    root = shared_path("data", "isic2018-attributes")
    labels = pd.read_csv(root / "labels.csv")
    chosen = labels[labels["pigment_network"] == 1]["image_id"].head(4).tolist()
    truth = {}
    for image_id in chosen:
        with Image.open(root / "masks" / f"{image_id}_pigment_network.png") as im:
            truth[image_id] = np.asarray(im.convert("L")) > 127
    study = {
        image_id: {f"r{r + 1}": ({PN: 1}, [painted(PN, perturbed(mask, r))]) for r in range(4)}
        for image_id, mask in truth.items()
    }
    engine, factory = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        with factory.begin() as session:
            seed(session, study)
        with factory.begin() as session:
            run = run_consensus(session, decode=decode)
            masks = consensus_masks(session, run, region_key(PN))
            details = dict(
                session.execute(
                    select(Item.external_id, ConsensusMask.details)
                    .join(Item, ConsensusMask.item_id == Item.id)
                    .where(ConsensusMask.run_id == run.id)
                ).all()
            )
    finally:
        engine.dispose()
    assert set(masks) == set(details) == set(chosen)
    for image_id, mask in truth.items():
        raters = [perturbed(mask, r) for r in range(4)]
        w_itk, sens_itk, spec_itk = simpleitk_staple(raters)
        assert (masks[image_id] == (w_itk >= 0.5)).all(), image_id
        assert details[image_id]["method"] == "STAPLE" and details[image_id]["converged"]
        np.testing.assert_allclose(details[image_id]["sensitivity"], sens_itk, atol=1e-4)
        np.testing.assert_allclose(details[image_id]["specificity"], spec_itk, atol=1e-4)
        # The consensus is much closer to the real mask than the eroded or dilated versions are.
        dice = 2 * (masks[image_id] & mask).sum() / (masks[image_id].sum() + mask.sum())
        assert dice > 0.8
    all_sens = np.array([d["sensitivity"] for d in details.values()])
    assert all_sens[:, 1].min() > 0.95  # the dilated rater covers nearly all of the consensus
