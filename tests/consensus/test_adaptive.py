"""Adaptive reads: the stopping rule, the queue of who reads what next, and replaying a recorded set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from consensus.adaptive import StoppingRule, assign_reads, next_reads, replay
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
    queue = next_reads(PROBAS, ANSWERS, reliability)
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
