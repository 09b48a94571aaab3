"""AI exposure statistics: known answers, intervals that hold the estimate and narrow with data, the
bootstrap over lesions, the blind / assisted classification and the pairing of two projects' reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from consensus.exposure import (
    ASSISTED,
    DIFFERENCE,
    UNASSISTED,
    exposure,
    pair_summary,
    paired_reads,
    prepare_reads,
    wilson_interval,
)
from consensus.groups import image_key


def reads_of(
    n_images: int, raters: str = "abcd", unassisted_agree: float = 0.5, lesion_size: int = 1
) -> pd.DataFrame:
    """Every rater reads every image twice: assisted (always the prediction) and unassisted (the
    prediction on the first ``unassisted_agree`` share of lesions, its opposite on the rest)."""
    rows = []
    n_lesions = n_images // lesion_size
    for i in range(n_images):
        lesion = i // lesion_size
        prediction = i % 2
        agrees = lesion < unassisted_agree * n_lesions
        for rater in raters:
            rows.append((rater, f"b-{i}", "bcc", prediction, prediction, True, f"L{lesion}"))
            rows.append((rater, f"a-{i}", "bcc", prediction if agrees else 1 - prediction, prediction, False,
                         f"L{lesion}"))  # fmt: skip
    return pd.DataFrame(
        rows, columns=["rater", "item", "label_key", "value", "prediction", "assisted", "group"]
    )


def consensus_of(n_images: int) -> pd.DataFrame:
    """The consensus equals the prediction on every image of both projects."""
    items = [f"{p}-{i}" for p in "ab" for i in range(n_images)]
    return pd.DataFrame({"bcc": [int(item.split("-")[1]) % 2 for item in items]}, index=items)


def row(table: pd.DataFrame, arm: str, label: str = "bcc") -> pd.Series:
    return table[(table["label_key"] == label) & (table["arm"] == arm)].iloc[0]


def test_known_answers_assisted_agree_always_unassisted_half():
    table = exposure(reads_of(40), consensus_of(40))
    assisted, unassisted, difference = row(table, ASSISTED), row(table, UNASSISTED), row(table, DIFFERENCE)
    assert (assisted["n_reads"], assisted["n_items"], assisted["n_with_prediction"]) == (160, 40, 160)
    assert assisted["agree_prediction"] == 1.0 and unassisted["agree_prediction"] == 0.5
    assert assisted["agree_consensus"] == 1.0 and unassisted["agree_consensus"] == 0.5
    assert difference["agree_prediction"] == pytest.approx(0.5)
    assert 0 < difference["agree_prediction_low"] <= 0.5 <= difference["agree_prediction_high"]
    # A 100% agreement still has an interval below 1.
    assert 0.9 < assisted["agree_prediction_low"] < 1.0 == assisted["agree_prediction_high"]


@pytest.mark.parametrize("n_boot", [0, 500])
def test_intervals_hold_the_estimate_and_narrow_with_more_images(n_boot):
    widths = []
    for n in (20, 80, 320):
        table = exposure(reads_of(n, unassisted_agree=0.7), consensus_of(n), n_boot=n_boot)
        for arm in (ASSISTED, UNASSISTED):
            r = row(table, arm)
            for name in ("prediction", "consensus"):
                assert 0 <= r[f"agree_{name}_low"] <= r[f"agree_{name}"] <= r[f"agree_{name}_high"] <= 1
        r = row(table, UNASSISTED)
        widths.append(r["agree_prediction_high"] - r["agree_prediction_low"])
    assert widths[0] > widths[1] > widths[2] > 0


def test_without_bootstrap_the_interval_is_wilsons_over_reads():
    table = exposure(reads_of(50, raters="ab"), n_boot=0)  # 100 unassisted reads, half agree
    r = row(table, UNASSISTED)
    assert (r["agree_prediction_low"], r["agree_prediction_high"]) == pytest.approx(
        (0.4038, 0.5962), abs=1e-4
    )
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(1.0, 10)[1] == 1.0 and np.isnan(wilson_interval(0.5, 0)[0])


def test_the_bootstrap_resamples_lesions_not_images():
    # 80 images of 10 lesions; a lesion's images are all agreed with, or none: ten observations, not 80.
    by_image = exposure(reads_of(80, lesion_size=8).drop(columns="group"))
    by_lesion = exposure(reads_of(80, lesion_size=8))
    wide = row(by_lesion, UNASSISTED)
    narrow = row(by_image, UNASSISTED)
    assert wide["agree_prediction"] == narrow["agree_prediction"] == 0.5
    assert wide["n_groups"] == 10 and narrow["n_groups"] == 80
    width = wide["agree_prediction_high"] - wide["agree_prediction_low"]
    assert width > 2 * (narrow["agree_prediction_high"] - narrow["agree_prediction_low"])
    assert width == pytest.approx(np.diff(wilson_interval(0.5, 10))[0], abs=0.1)  # ~ten observations


def test_reads_without_a_known_prediction_or_consensus_are_counted_apart():
    reads = reads_of(10)
    reads.loc[~reads["assisted"], "prediction"] = np.nan
    table = exposure(reads)  # and no consensus
    r = row(table, UNASSISTED)
    assert r["n_reads"] == 40 and r["n_with_prediction"] == 0 and np.isnan(r["agree_prediction"])
    assert row(table, ASSISTED)["n_with_consensus"] == 0 and np.isnan(
        row(table, DIFFERENCE)["agree_prediction"]
    )


def test_bad_tables_name_the_problem():
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['assisted'\]"):
        exposure(reads_of(4).drop(columns="assisted"))
    bad = reads_of(4)
    bad["assisted"] = bad["assisted"].astype(object)
    bad.loc[0, "assisted"] = "yes"
    with pytest.raises(ValueError, match="assisted must be True or False"):
        exposure(bad)


def stored(rows: list[tuple]) -> pd.DataFrame:
    """The store's reads (consensus.repository.exposure.STORED_READ_COLUMNS)."""
    columns = ["rater", "item", "image", "group", "project", "label_key", "value", "parent_prediction",
               "model_version", "shown", "updated_at"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


T1, T2 = pd.Timestamp("2026-11-20T10:00Z"), pd.Timestamp("2026-11-21T10:00Z")

TWO_PROJECTS = stored([
    # project 1 (blind): rater a and b read image x; a read it twice (two tasks): the newer counts
    ("a", "ls-1", "id:x", "id:x", 1, "bcc", 0, None, None, None, T1),
    ("a", "ls-9", "id:x", "id:x", 1, "bcc", 1, None, None, None, T2),
    ("b", "ls-1", "id:x", "id:x", 1, "bcc", 0, None, None, None, T1),
    # project 2 (assisted): the model said 1; a took it, b started blank (neither blind nor assisted),
    # c took it without the store knowing what it showed (same prediction 77)
    ("a", "ls-2", "id:x", "id:x", 2, "bcc", 1, 77, "v1", 1, T1),
    ("b", "ls-2", "id:x", "id:x", 2, "bcc", 0, None, None, None, T1),
    ("c", "ls-2", "id:x", "id:x", 2, "bcc", 1, 77, "v1", None, T1),
    # imported ratings (no project, never shown anything)
    ("d", "img-y", "y", "y", None, "bcc", 1, None, None, None, None),
])  # fmt: skip


def test_prepare_reads_tells_blind_from_assisted_and_fills_the_prediction():
    reads = prepare_reads(TWO_PROJECTS)
    assert reads["assisted"].tolist() == [False, False, False, True, False, True, False]
    # b's blank start in project 2 is unassisted but not blind: project 2 showed predictions.
    assert reads["blind"].tolist() == [True, True, True, False, False, False, True]
    # c's prediction is 77's (what a was shown); the unassisted reads of x get the model's 1; y has none.
    assert reads["prediction"].tolist()[:6] == [1, 1, 1, 1, 1, 1] and pd.isna(reads["prediction"].iloc[6])
    # Every read of x is compared with the consensus of a blind task of x; y's with its own.
    assert reads["reference_item"].tolist() == ["ls-1"] * 6 + ["img-y"]


def test_paired_reads_put_a_readers_two_reads_of_an_image_side_by_side():
    consensus = pd.DataFrame({"bcc": [1, 0, 0, 1]}, index=["ls-1", "ls-9", "ls-2", "img-y"])
    pairs = paired_reads(prepare_reads(TWO_PROJECTS), consensus).set_index("rater")
    a = pairs.loc["a"]
    assert (a["blind_value"], a["assisted_value"], a["prediction"], a["paired"]) == (1, 1, 1, True)
    assert (a["blind_item"], a["assisted_item"], a["consensus_item"], a["consensus"]) == (
        "ls-9",
        "ls-2",
        "ls-9",
        0,
    )
    assert (a["blind_project"], a["assisted_project"], a["model_version"]) == (1, 2, "v1")
    assert not pairs.loc["b", "paired"] and pd.isna(
        pairs.loc["b", "assisted_value"]
    )  # b's blank start: no pair
    # c has no blind read: compared with the blind task of the image (ls-1), not with the assisted one.
    assert not pairs.loc["c", "paired"] and (
        pairs.loc["c", "consensus_item"],
        pairs.loc["c", "consensus"],
    ) == ("ls-1", 1)
    assert pairs.loc["d", "image"] == "y" and not pairs.loc["d", "paired"]
    assert pairs["paired"].sum() == 1


def test_pair_summary_counts_moves_toward_the_prediction():
    reads = reads_of(40).rename(columns={"item": "task"})
    reads["image"] = reads["task"].str.split("-").str[1]
    reads["item"] = reads["task"]
    paired = pd.DataFrame({
        "rater": reads.loc[reads["assisted"], "rater"].to_numpy(),
        "image": reads.loc[reads["assisted"], "image"].to_numpy(),
        "label_key": "bcc",
        "blind_value": reads.loc[~reads["assisted"], "value"].to_numpy(),
        "assisted_value": reads.loc[reads["assisted"], "value"].to_numpy(),
        "prediction": reads.loc[reads["assisted"], "prediction"].to_numpy(),
        "consensus": reads.loc[reads["assisted"], "prediction"].to_numpy(),
        "paired": True,
    })  # fmt: skip
    summary = pair_summary(paired).iloc[0]
    assert (summary["n_pairs"], summary["n_images"]) == (160, 40)
    assert summary["blind_agree_prediction"] == 0.5 and summary["assisted_agree_prediction"] == 1.0
    assert (summary["n_toward_prediction"], summary["toward_prediction"]) == (80, 1.0)
    assert (summary["n_away_from_prediction"], summary["away_from_prediction"]) == (80, 0.0)
    assert summary["away_from_prediction_high"] > 0 and summary["toward_prediction_low"] < 1


@pytest.mark.parametrize(
    ("image", "data", "expected"),
    [
        ("/data/upload/1/3f2a9c1e-ISIC_001.jpg", {"image_id": "ISIC_001"}, "id:ISIC_001"),
        ("/data/upload/1/3f2a9c1e-ISIC_001.jpg", {}, "upload:ISIC_001.jpg"),
        ("http://ls:8080/data/upload/2/0b1c2d3e-ISIC_001.jpg", None, "upload:ISIC_001.jpg"),
        (
            "/data/local-files/?d=study/ISIC_001.jpg",
            {"image_id": ""},
            "ref:/data/local-files/?d=study/ISIC_001.jpg",
        ),
        (None, {"image_id": {"nested": 1}}, "ls-5"),
    ],
)
def test_image_key_finds_the_same_image_in_two_projects(image, data, expected):
    assert image_key("ls-5", image, data) == expected


def test_the_store_gives_each_read_with_what_it_was_shown(tmp_path):
    from consensus.db import init_db
    from consensus.models import Source
    from consensus.repository import Exposure, get_or_create_item, get_or_create_rater, upsert_annotation
    from consensus.repository.answers import HAM_KEY
    from consensus.repository.exposure import exposure_reads

    engine, sessions = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    with sessions.begin() as session:
        data = {"image": "/data/upload/2/0a1b2c3d-ISIC_9.jpg", "lesion_id": "L1", "patient_id": "P1"}
        item = get_or_create_item(
            session, "ls-9", ls_task_id=9, image=data["image"], data=data, ls_project_id=2
        )
        blind = get_or_create_item(session, "ls-8", ls_task_id=8, image="/data/upload/1/99999999-ISIC_9.jpg")
        rater = get_or_create_rater(session, "derm1")
        shown = Exposure(prediction=5, model_version="v2", labels={"bcc": 0}, diagnosis="Melanoma")
        upsert_annotation(session, item, rater, {"bcc": 1}, Source.WEBHOOK, diagnosis="bcc", exposure=shown)
        upsert_annotation(session, blind, rater, {"bcc": 0}, Source.WEBHOOK, diagnosis="nv")
        with pytest.raises(ValueError, match="model_version"):
            upsert_annotation(
                session, blind, rater, {"bcc": 0}, Source.WEBHOOK, exposure=Exposure(5, "v" * 201)
            )
        with pytest.raises(ValueError, match="need its id"):
            upsert_annotation(
                session, blind, rater, {"bcc": 0}, Source.WEBHOOK, exposure=Exposure(labels={"bcc": 1})
            )
    with sessions() as session:
        table = exposure_reads(session, ["bcc", HAM_KEY]).set_index(["item", "label_key"])
    engine.dispose()
    assert table.loc[("ls-9", "bcc"), ["value", "shown", "parent_prediction", "model_version"]].tolist() == [
        1,
        0,
        5,
        "v2",
    ]
    assert table.loc[("ls-9", HAM_KEY), ["value", "shown"]].tolist() == ["bcc", "mel"]  # codes, by name too
    assert table.loc[("ls-9", "bcc"), ["image", "group", "project"]].tolist() == [
        "upload:ISIC_9.jpg",
        "patient:P1",
        2,
    ]
    assert table.loc[("ls-8", "bcc"), "image"] == "upload:ISIC_9.jpg" and pd.isna(
        table.loc[("ls-8", "bcc"), "shown"]
    )


def test_clustered_intervals_keep_their_coverage_where_reads_of_an_image_are_alike():
    from consensus.exposure import bootstrap_draws, clustered_rate

    # 40 lesions, 8 reads each, intra-class correlation 0.5 (bench/exposure_coverage.py, fewer runs).
    rng = np.random.default_rng(3)
    p, icc, reps = 0.7, 0.5, 200
    a, b = p * (1 - icc) / icc, (1 - p) * (1 - icc) / icc
    hits = np.zeros(2)
    for _ in range(reps):
        agree = rng.binomial(8, rng.beta(a, b, 40)).astype(float)
        known = np.full(40, 8.0)
        for k, draws in enumerate((bootstrap_draws(40, 500, rng), None)):
            _, low, high = clustered_rate(agree, known, draws)
            hits[k] += low <= p <= high
    clustered, naive = hits / reps
    assert clustered >= 0.9 and naive <= 0.8, (clustered, naive)
