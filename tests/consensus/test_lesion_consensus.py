"""The lesion pair's reference as a stored consensus run: Dawid-Skene over the HAM10000 diagnosis, STAPLE
over the outlines, stored (SQLite and PostgreSQL), traced and exported like the BCC runs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from consensus.dawid_skene import DawidSkene
from consensus.db import init_db, make_engine, upgrade
from consensus.export import build_study, to_json, write_csv, write_report
from consensus.models import ConsensusLabel, ConsensusMask, ConsensusRun, RaterReliability, RunKind, Source
from consensus.repository import (
    consensus_masks,
    consensus_probabilities,
    consensus_table,
    get_or_create_item,
    get_or_create_rater,
    import_ratings,
    latest_run,
    lesion_answers,
    pack_mask,
    unpack_mask,
    upsert_annotation,
)
from consensus.service import class_reliability, consensus_mask, run_consensus, run_lesion_consensus
from labeling_config import HAM_CLASSES

SIZE = (24, 20)


def decode(region):
    """The test's stand-in for Label Studio's RLE: the mask is stored as nested lists."""
    if "mask" not in region:
        return None
    return np.asarray(region["mask"], dtype=bool)


def outline(top: int, left: int, size: tuple[int, int] = SIZE) -> dict:
    mask = np.zeros(size, bool)
    mask[top : top + 10, left : left + 8] = True
    return {"label": "lesion", "mask": mask.astype(int).tolist()}


def truth_mask(top: int, left: int) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[top : top + 10, left : left + 8] = True
    return mask


#: image -> (rater -> (diagnosis as stored, outlines))
STUDY = {
    "a": {"r1": ("mel", [outline(4, 4)]), "r2": ("mel", [outline(4, 4)]), "r3": ("nv", [outline(12, 10)])},
    "b": {"r1": ("bcc", [outline(2, 2)]), "r2": ("Basal cell carcinoma", []), "r3": ("bcc", [])},
    "c": {"r1": ("nv", []), "r2": ("Melanocytic nevus", []), "r3": ("nv", [])},
    "d": {"r1": ("vasc", [outline(1, 1), outline(1, 1, (5, 5))]), "r2": ("vasc", [{"label": "lesion"}])},
    "e": {"r1": ("BCC", [outline(3, 3)])},  # a bcc.xml answer: its outline counts, its diagnosis does not
}


@pytest.fixture
def db(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(store_url)
    yield factory
    engine.dispose()


def seed(session: Session, study: dict = STUDY) -> None:
    raters = {name: get_or_create_rater(session, name=name) for name in ("r1", "r2", "r3")}
    for image, answers in study.items():
        item = get_or_create_item(session, image)
        for rater, (diagnosis, regions) in answers.items():
            labels = {"bcc": int(diagnosis == "BCC")}
            upsert_annotation(session, item, raters[rater], labels, Source.WEBHOOK, diagnosis, regions)


def test_the_lesion_reference_is_stored_as_a_consensus_run(db):
    with db.begin() as session:
        seed(session)
    with db.begin() as session:
        reference = run_lesion_consensus(session, decode)
        run_id = reference.run.id
    assert reference.posteriors.idxmax(axis=1).to_dict() == {"a": "mel", "b": "bcc", "c": "nv", "d": "vasc"}
    assert list(reference.posteriors.columns) == list(HAM_CLASSES) and reference.n_raters == 3
    np.testing.assert_allclose(reference.posteriors.sum(axis=1), 1.0)
    # STAPLE follows the two outlines that agree; one outline is taken as it is; "d"'s two sizes clash.
    assert (reference.masks["a"] == truth_mask(4, 4)).all() and (
        reference.masks["b"] == truth_mask(2, 2)
    ).all()
    assert set(reference.masks) == {"a", "b", "e"}
    assert reference.skipped == [
        "d/r2: unreadable lesion region",
        "d: the raters' lesion masks differ in size",
    ]

    with db() as session:
        run = session.get_one(ConsensusRun, run_id)
        assert (run.kind, run.method) == (RunKind.LESION, "SelectedDawidSkene+STAPLE")
        assert run.params["ham_diagnosis"]["classes"] == list(HAM_CLASSES)
        assert run.params["lesion"] == {"prior": None, "n_iter": 1000, "tol": 1e-7, "threshold": 0.5}
        assert run.convergence["ham_diagnosis"]["converged"]
        assert run.convergence["lesion"] == {"n_images": 3, "n_staple": 1, "converged": True,
                                             "max_n_iter": run.convergence["lesion"]["max_n_iter"]}  # fmt: skip
        # 11 diagnoses (not "e"'s BCC) and 8 outlines (unreadable ones included); items and raters of both.
        assert (run.n_items, run.n_raters, run.n_answers) == (5, 3, 11 + 8)
        stored = consensus_table(session, run).set_index(["task", "label_key"])["value"].to_dict()
        assert stored == {("a", "ham_diagnosis"): "mel", ("b", "ham_diagnosis"): "bcc",
                          ("c", "ham_diagnosis"): "nv", ("d", "ham_diagnosis"): "vasc",
                          ("a", "lesion"): "1", ("b", "lesion"): "1", ("e", "lesion"): "1"}  # fmt: skip
        probabilities = consensus_probabilities(session, run, "ham_diagnosis")[list(HAM_CLASSES)]
        pd.testing.assert_frame_equal(probabilities, reference.posteriors.sort_index(), check_names=False)
        masks = consensus_masks(session, run, "lesion")
        assert masks.keys() == reference.masks.keys()
        assert all((masks[k] == reference.masks[k]).all() for k in masks)
        rows = {m.item_id: m for m in session.scalars(select(ConsensusMask)).all()}
        details = [m.details for m in rows.values() if m.raters == ["r1", "r2", "r3"]]
        assert len(details) == 1 and details[0]["method"] == "STAPLE" and len(details[0]["sensitivity"]) == 3
        summary = session.scalars(select(ConsensusLabel).where(ConsensusLabel.label_key == "lesion")).all()
        assert all(0.5 <= s.posterior <= 1 and s.posterior == s.probabilities["1"] for s in summary)

        reliability = session.execute(
            select(RaterReliability.label_key, func.count()).group_by(RaterReliability.label_key)
        ).all()
        # One-vs-rest per class for the three raters of the diagnosis; the three outliners of "a".
        assert dict(reliability) == {**{f"ham_diagnosis:{c}": 3 for c in HAM_CLASSES}, "lesion": 3}
        lesion = session.scalars(select(RaterReliability).where(RaterReliability.label_key == "lesion")).all()
        assert all(r.sensitivity_low is None and r.n_items == 1 for r in lesion)
        by_rater = {r.rater_id: r.sensitivity for r in lesion}
        assert min(by_rater.values()) < 0.5 < max(by_rater.values())  # the stray outline of "a"

        # The export's default stays the latest bcc.xml run; the lesion run is asked for.
        assert latest_run(session) is None and latest_run(session, RunKind.LESION).id == run_id
        assert latest_run(session, None).id == run_id


def test_no_ham_diagnosis_is_a_clear_error_and_stores_nothing(db):
    with db.begin() as session:
        seed(session, {"e": STUDY["e"]})
    with pytest.raises(ValueError, match="no HAM10000 diagnosis"), db.begin() as session:
        run_lesion_consensus(session, decode)
    with db() as session:
        assert session.scalar(select(func.count()).select_from(ConsensusRun)) == 0


def test_lesion_answers_hash_every_outline_and_leave_other_diagnoses_out(db):
    with db.begin() as session:
        seed(session)
    with db() as session:
        table = lesion_answers(session)
    assert list(table.columns) == ["task", "worker", "label_key", "value", "region"]
    diagnoses = table[table.label_key == "ham_diagnosis"]
    assert len(diagnoses) == 11 and set(diagnoses.value) == {"mel", "nv", "bcc", "vasc"}
    outlines = table[table.label_key == "lesion"]
    assert len(outlines) == 8 and outlines.value.str.len().eq(64).all()
    # Same region, same digest; another region, another.
    a = outlines[outlines.task == "a"].set_index("worker")["value"]
    assert a["r1"] == a["r2"] != a["r3"]


def test_the_export_includes_the_lesion_run(db, tmp_path):
    with db.begin() as session:
        seed(session)
    with db.begin() as session:
        run_id = run_lesion_consensus(session, decode).run.id
    with db() as session:
        study = build_study(session, kind=RunKind.LESION)
        assert build_study(session, run_id).run == study.run
        with pytest.raises(ValueError, match="no consensus run in the store"):
            build_study(session)  # no bcc.xml run
    assert study.run["kind"] == "lesion" and not study.answers_changed
    c = study.consensus
    assert c.loc["a", "ham_diagnosis"] == "mel" and pd.isna(c.loc["e", "ham_diagnosis"])
    probabilities = c[[f"ham_diagnosis_p_{k}" for k in HAM_CLASSES]].dropna()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(c["ham_diagnosis_posterior"].dropna(), probabilities.max(axis=1))
    assert c.loc["a", "lesion"] == 1 and c.loc["a", "lesion_area"] == pytest.approx(80 / 480)
    assert pd.isna(c.loc["c", "lesion_area"])
    assert study.ratings.loc["b", "r2:ham_diagnosis"] == "bcc" and study.ratings.loc["a", "r3:lesion"] == 1
    assert list(study.agreement.label_key) == ["ham_diagnosis"] and study.agreement.n_items[0] == 4
    assert set(study.vs_consensus.label_key) == {"ham_diagnosis"}
    assert {"ham_diagnosis:mel", "lesion"} <= set(study.reliability.label_key)

    written = write_csv(study, tmp_path / "csv")
    table = pd.read_csv(tmp_path / "csv" / "consensus.csv").set_index("image_id")
    assert table.loc["a", "ham_diagnosis"] == "mel" and "r1:lesion" in table and "lesion_posterior" in table
    reliability = pd.read_csv(tmp_path / "csv" / "rater_reliability.csv")
    assert (reliability.label_key == "ham_diagnosis:bcc").sum() == 3
    assert json.loads((tmp_path / "csv" / "run.json").read_text())["id"] == run_id and len(written) == 10
    # The diagnosis' rater model was chosen from the answers, and the export says which.
    models = pd.read_csv(tmp_path / "csv" / "rater_models.csv")
    assert set(models["label_key"]) == {"ham_diagnosis"}
    # AI exposure covers the HAM10000 diagnosis (no read here started from a prediction), not the outline.
    exposure = pd.read_csv(tmp_path / "csv" / "exposure.csv")
    assert set(exposure.label_key) == {"ham_diagnosis"} and exposure.n_with_prediction.fillna(0).eq(0).all()
    doc = json.loads(json.dumps(to_json(study)))
    assert doc["run"]["kind"] == "lesion" and len(doc["images"]) == 5
    html = write_report(study, tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "SelectedDawidSkene+STAPLE" in html

    with db.begin() as session:  # a rater redraws an outline: the export says the run is behind
        item, rater = get_or_create_item(session, "a"), get_or_create_rater(session, name="r3")
        upsert_annotation(session, item, rater, {"bcc": 0}, Source.WEBHOOK, "nv", [outline(4, 5)])
    with db() as session:
        study = build_study(session, run_id)
    assert study.answers_changed and f"changed after run {run_id}" in study.notes[0]


def test_bcc_and_lesion_runs_live_side_by_side(db, small_study):
    with db.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
        bcc_id = run_consensus(session).id
    with db.begin() as session:
        seed(session)
        lesion_id = run_lesion_consensus(session, decode).run.id
    with db() as session:
        assert lesion_id > bcc_id and latest_run(session).id == bcc_id
        assert build_study(session).run["id"] == bcc_id
        assert build_study(session, kind=RunKind.LESION).run["id"] == lesion_id
        assert session.get_one(ConsensusRun, bcc_id).kind is RunKind.BCC


def test_one_vs_rest_reliability():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, 400)
    accuracy = {"good": 0.95, "fair": 0.8, "poor": 0.55}
    rows = []
    for worker, p in accuracy.items():
        right = rng.random(len(truth)) < p
        said = np.where(right, truth, (truth + rng.integers(1, 4, len(truth))) % 4)
        rows += [(t, worker, int(s)) for t, s in enumerate(said)]
    data = pd.DataFrame(rows, columns=["task", "worker", "label"])
    estimator = DawidSkene().fit(data)
    table = class_reliability(estimator, data)
    assert len(table) == 4 * 3 and table.n_items.eq(400).all()
    for _, row in table.iterrows():
        assert row.sensitivity_low <= row.sensitivity <= row.sensitivity_high
        assert row.specificity_low <= row.specificity <= row.specificity_high
        # The point is the fitted rate e_j[k, k], up to the last E-step (errors_ is one step older).
        fitted_rate = estimator.errors_.loc[(row.worker, row["class"]), row["class"]]
        assert row.sensitivity == pytest.approx(fitted_rate, abs=1e-3)
    mean = table.groupby("worker")[["sensitivity", "specificity"]].mean()
    assert mean.loc["good", "sensitivity"] > mean.loc["fair", "sensitivity"] > mean.loc["poor", "sensitivity"]
    assert mean.loc["good", "sensitivity"] == pytest.approx(0.95, abs=0.05)
    assert mean.loc["poor", "specificity"] == pytest.approx(1 - 0.45 / 3, abs=0.05)

    # Two classes: the positive class's rows are Dawid-Skene's own sensitivity / specificity.
    binary = data.assign(label=(data.label >= 2).astype(int))
    fitted = DawidSkene().fit(binary)
    ours = class_reliability(fitted, binary).query("`class` == 1").set_index("worker")
    theirs = fitted.rater_reliability().set_index("worker")
    columns = ["sensitivity", "sensitivity_low", "sensitivity_high", "specificity", "specificity_low"]
    pd.testing.assert_frame_equal(ours[columns], theirs.loc[ours.index, columns], atol=1e-3)


def test_masks_pack_and_unpack_at_any_size():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 5), (17, 9), (128, 96)]:
        mask = rng.random(shape) < 0.3
        assert (unpack_mask(pack_mask(mask), *shape) == mask).all()
    assert len(pack_mask(np.ones((17, 9), bool))) == (17 * 9 + 7) // 8


def test_outline_consensus_edge_cases():
    empty = np.zeros((6, 6), bool)
    full = ~empty
    assert consensus_mask([empty, empty.copy()]) is not None and not consensus_mask([empty, empty]).any()
    assert consensus_mask([full, full]).all()
    assert consensus_mask([empty, full[:3]]) is None and consensus_mask([]) is None


def test_the_migration_from_0004_keeps_old_runs_as_bcc_ones(store_url):
    engine = make_engine(store_url)
    try:
        upgrade(engine, "0004")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO consensus_runs (created_at, method, params, convergence, n_items, n_raters, "
                    "n_answers, data_hash) VALUES (CURRENT_TIMESTAMP, 'DawidSkene', '{}', '{}', 1, 1, 1, 'x')"
                )
            )
        upgrade(engine)
        assert "consensus_masks" in inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT kind FROM consensus_runs")).scalar() == "bcc"
        from alembic import command

        from consensus.db import alembic_config

        command.downgrade(alembic_config(engine), "0004")
        assert "consensus_masks" not in inspect(engine).get_table_names()
        assert "kind" not in {c["name"] for c in inspect(engine).get_columns("consensus_runs")}
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT kind FROM consensus_runs")).scalar() == "bcc"
    finally:
        engine.dispose()
