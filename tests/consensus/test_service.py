"""Store -> Dawid-Skene per label -> stored run, on a synthetic study with known truth."""

import pandas as pd
import pytest
from sqlalchemy import select

from consensus.dawid_skene import OneCoinDawidSkene
from consensus.db import init_db
from consensus.models import RaterReliability
from consensus.repository import consensus_table, import_ratings
from consensus.repository.gold import import_gold
from consensus.service import run_consensus
from labeling_config import TARGETS


@pytest.fixture
def sessions(tmp_path):
    engine, factory = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    yield factory
    engine.dispose()


def _study(n: int = 800) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ratings and truth of a synthetic study, without drawing images (fast)."""
    from model.synthetic import RaterProfile, SynthConfig, draw_rater_quality, sample_cases, simulate_ratings

    cases = [case for case, _ in sample_cases(SynthConfig(n=n, seed=3))]
    truth = pd.DataFrame([{"image_id": c.image_id, "bcc": c.bcc, **c.patterns} for c in cases])
    quality = draw_rater_quality(4, RaterProfile(), seed=3)
    return simulate_ratings(truth, quality, missing=0.1, seed=3), truth.set_index("image_id")


def test_consensus_from_the_store_beats_majority_vote_and_is_traceable(sessions):
    ratings, truth = _study()
    with sessions.begin() as session:
        import_ratings(session, ratings)
    with sessions.begin() as session:
        run = run_consensus(session)
        table = consensus_table(session, run)
        reliability = session.scalars(select(RaterReliability).where(RaterReliability.run_id == run.id)).all()
        run_id, params, convergence = run.id, run.params, run.convergence
    assert set(table.label_key) == set(TARGETS)
    assert params["candidates"]["full"]["smoothing"] == 0.1 and params["n_folds"] == 5
    assert params["gold"] == {"n": 0}
    assert all(c["converged"] for c in convergence.values())
    # Every label records the rater model it chose and every candidate's held-out criterion.
    for key in TARGETS:
        selection = convergence[key]["selection"]
        assert selection["choice"] in params["candidates"]
        assert max(selection["scores"], key=selection["scores"].get) == selection["choice"]
    assert len(reliability) == 4 * len(TARGETS)
    # Over all labels: consensus accuracy against the truth vs a per-item majority vote (ties -> 0).
    correct = mv_correct = 0
    for key in TARGETS:
        ours = table[table.label_key == key].set_index("task")["value"].astype(int)
        votes = ratings[ratings.label == key].groupby("image_id")["value"].mean()
        correct += int((ours == truth.loc[ours.index, key]).sum())
        mv_correct += int(((votes > 0.5).astype(int) == truth.loc[votes.index, key]).sum())
    assert correct > mv_correct
    assert correct / len(table) > 0.95
    with sessions() as session:
        assert consensus_table(session, run).equals(table) and run_id == 1


def test_gold_labels_in_the_store_are_held_and_counted_by_the_run(sessions):
    ratings, truth = _study(n=120)
    gold_images = truth.index[:30]
    histology = pd.DataFrame(
        {"image_id": gold_images, "diagnosis": ["BCC" if truth.loc[i, "bcc"] else "nv" for i in gold_images]}
    )
    with sessions.begin() as session:
        import_ratings(session, ratings)
        import_gold(session, histology, reference="pathology.csv")
    with sessions.begin() as session:
        run = run_consensus(session)
        table = consensus_table(session, run)
        params, convergence = run.params, run.convergence
        without = run_consensus(session, use_gold=False).params["gold"]
    assert params["gold"] == {"n": 30, "by_label": {"bcc": {"histopathology": 30}}, "conflicts": 0}
    assert convergence["bcc"]["n_gold"] == 30 and convergence["ulceration"]["n_gold"] == 0
    assert without == {"n": 0, "used": False}
    bcc = table[table.label_key == "bcc"].set_index("task")
    assert (bcc.loc[gold_images, "value"].astype(int) == truth.loc[gold_images, "bcc"]).all()
    assert (bcc.loc[gold_images, "posterior"] == 1.0).all()


def test_the_one_coin_variant_and_an_empty_store(sessions, small_study):
    with pytest.raises(ValueError, match="the store holds no annotations"), sessions.begin() as session:
        run_consensus(session)
    with sessions.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
    with sessions.begin() as session:
        run = run_consensus(session, OneCoinDawidSkene())
        assert run.method == "OneCoinDawidSkene"
