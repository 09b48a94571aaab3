"""Adaptive reads: the stopping rule, the queue of who reads what next, and replaying a recorded set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from consensus.adaptive import StoppingRule, assign_reads, next_reads, reader_accuracy, replay
from consensus.dawid_skene import DawidSkene

from .test_dawid_skene import accuracy, crowd_set, four_raters

PROBAS = pd.DataFrame({0: [0.99, 0.40, 0.97, 0.50], 1: [0.01, 0.60, 0.03, 0.50]}, index=list("abcd"))
ANSWERS = pd.DataFrame(
    [("a", "r1", 0), ("a", "r2", 0), ("b", "r1", 1), ("b", "r2", 0), ("c", "r3", 0), ("d", "r1", 0), ("d", "r2", 1),
     ("d", "r3", 0), ("d", "r4", 1)],
    columns=["task", "worker", "label"],
)  # fmt: skip


def test_an_image_is_done_when_confident_after_enough_reads():
    reads = ANSWERS.groupby("task").size()
    assert StoppingRule(0.95, 2).done(PROBAS, reads).to_dict() == {
        "a": True,
        "b": False,
        "c": False,
        "d": False,
    }
    assert StoppingRule(0.95, 1).done(PROBAS, reads)["c"]
    assert StoppingRule(0.95, 2, max_reads=4).done(PROBAS, reads)["d"]


def test_the_queue_lists_open_images_least_confident_first_with_the_best_unread_readers():
    reliability = pd.Series({"r1": 0.9, "r2": 0.7, "r3": 0.95, "r4": 0.6})
    queue = next_reads(PROBAS, ANSWERS, reliability, StoppingRule(0.95, 2))
    assert queue["task"].tolist() == ["d", "b", "c"]
    by_task = queue.set_index("task")
    assert by_task.loc["b", "next"] == "r3,r4" and by_task.loc["c", "next"] == "r1,r2,r4"
    assert by_task.loc["d", "next"] == "" and by_task.loc["d", "reads"] == 4


def test_each_open_image_goes_to_the_least_loaded_reader_who_has_not_read_it():
    queue = pd.DataFrame(
        {
            "task": ["x", "y", "z", "w", "v"],
            "posterior": [0.5, 0.6, 0.7, 0.8, 0.9],
            "reads": [2, 2, 1, 2, 4],
            "next": ["r3,r4", "r3,r4", "r2,r3,r4", "r4", ""],  # most reliable first; v: all have read it
        }
    )
    assigned = assign_reads(queue)
    assert list(zip(assigned["task"], assigned["reader"], strict=True)) == [
        ("x", "r3"),  # both free: the more reliable
        ("y", "r4"),  # r3 has one already
        ("z", "r2"),
        ("w", "r4"),
    ]
    capped = assign_reads(queue, per_reader=1)
    assert list(capped["task"]) == ["x", "y", "z"]  # w waits: r4 is full
    assert assign_reads(queue.iloc[:0]).empty


@pytest.mark.parametrize("kwargs", [{"confidence": 0.4}, {"min_reads": 0}, {"min_reads": 3, "max_reads": 2}])
def test_a_bad_rule_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match=r"must|below"):
        StoppingRule(**kwargs)


def test_replay_saves_reads_on_easy_images_and_keeps_the_accuracy():
    answers, truth = four_raters(600, seed=4, sens=(0.95,) * 4, spec=(0.95,) * 4, missing=0.0)
    everything = accuracy(DawidSkene().fit_predict(answers), truth)
    result = replay(answers, DawidSkene(), StoppingRule(0.95, 2), random_state=0)
    assert 0.3 < result.saved < 0.6  # most images stop after two agreeing reads
    assert accuracy(result.labels, truth) >= everything - 0.02
    assert result.reads == len(result.revealed) and result.total == len(answers)
    assert (result.revealed.groupby("task").size() >= 2).all()
    # Never stopping reveals every read and gives the consensus of every read.
    never = replay(answers, DawidSkene(), StoppingRule(1.0, 5), random_state=0)
    assert never.saved == 0.0 and never.rounds == 4
    assert accuracy(never.labels, truth) == pytest.approx(everything)
    # The read order is seeded.
    again = replay(answers, DawidSkene(), StoppingRule(0.95, 2), random_state=0)
    pd.testing.assert_frame_equal(again.revealed, result.revealed)


def test_replay_on_the_dermx_dermatologists_saves_reads():
    folder = crowd_set("dermx_ak")
    answers = pd.read_csv(folder / "answers.csv")
    truth = pd.read_csv(folder / "truth.csv").set_index("task")["label"]
    result = replay(answers, DawidSkene(), StoppingRule(0.95, 2), random_state=0)
    assert result.saved > 0.3
    assert accuracy(result.labels, truth) >= accuracy(DawidSkene().fit_predict(answers), truth) - 0.02
    assert np.isfinite(result.saved)


def oracle_and_noisy(n_items: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    """Binary reads of six readers on every image: derm1 always right, derm2..derm6 right 70% of the time."""
    return four_raters(n_items, seed, sens=(1.0,) + (0.7,) * 5, spec=(1.0,) + (0.7,) * 5, missing=0.0)


def test_reader_accuracy_rates_the_perfect_reader_first():
    answers, _ = oracle_and_noisy(300, seed=1)
    scores = reader_accuracy(DawidSkene().fit(answers))
    assert scores.idxmax() == "derm1" and scores["derm1"] > 0.95
    assert (scores.drop("derm1") < 0.8).all() and (scores.drop("derm1") > 0.6).all()


def test_reliable_order_reveals_the_best_rated_readers_read_after_the_random_first_read():
    answers, _ = oracle_and_noisy(200, seed=2)
    ranking = pd.Series({"derm1": 0.99, "derm2": 0.9, "derm3": 0.8, "derm4": 0.7, "derm5": 0.6, "derm6": 0.5})
    two_reads = StoppingRule(1.0, 1, max_reads=2)  # every image stops at its second read
    result = replay(
        answers, DawidSkene(), two_reads, random_state=0, order="reliable", reliability=lambda _: ranking
    )
    assert result.rounds == 2 and (result.revealed.groupby("task").size() == 2).all()
    readers = result.revealed.groupby("task")["worker"].agg(set)
    assert all("derm1" in seen for seen in readers)  # second read derm1, or derm1 came first
    assert all(seen == {"derm1", "derm2"} for seen in readers if "derm2" in seen)  # derm2 only after derm1
    # The random order (the default) reveals its second read at random: derm1 on about a third.
    random = replay(answers, DawidSkene(), two_reads, random_state=0)
    with_derm1 = random.revealed.groupby("task")["worker"].agg(lambda w: "derm1" in set(w))
    assert 0.2 < with_derm1.mean() < 0.5


@pytest.mark.parametrize("seed", [1, 4])
def test_reliable_order_reaches_the_truth_with_fewer_reads_than_random(seed):
    answers, truth = oracle_and_noisy(300, seed=seed)
    rule = StoppingRule(0.99, 3)
    # Two random reads first: one read per image says nothing about who is reliable.
    reliable = replay(answers, DawidSkene(), rule, random_state=0, order="reliable", random_reads=2)
    random = replay(answers, DawidSkene(), rule, random_state=0, order="random")
    assert reliable.revealed.groupby("task")["worker"].agg(lambda w: "derm1" in set(w)).all()
    assert accuracy(reliable.labels, truth) == 1.0 == accuracy(random.labels, truth)
    assert reliable.reads < 0.9 * random.reads
    # The default order is the random one, unchanged.
    default = replay(answers, DawidSkene(), rule, random_state=0)
    pd.testing.assert_frame_equal(default.revealed, random.revealed)


def test_replay_rejects_an_unknown_order_no_random_read_and_a_custom_fit_with_the_reliable_order():
    answers, _ = oracle_and_noisy(20, seed=4)
    with pytest.raises(ValueError, match="order must be"):
        replay(answers, DawidSkene(), order="best")
    with pytest.raises(ValueError, match="random_reads"):
        replay(answers, DawidSkene(), order="reliable", random_reads=0)
    with pytest.raises(ValueError, match="fitted estimator"):
        replay(answers, DawidSkene(), order="reliable", fit=lambda est, data: est.fit(data).probas_)
