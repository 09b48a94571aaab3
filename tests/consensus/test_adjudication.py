"""The adjudication rule: uncertain posteriors and split votes are disputed, gold and clear items are not."""

from __future__ import annotations

import pandas as pd
import pytest

from consensus.adjudication import DisputeRule, disputed_items


def answers(rows):
    return pd.DataFrame(rows, columns=["task", "worker", "label_key", "value"])


ANSWERS = answers(
    [("a", w, "bcc", v) for w, v in zip("wxyz", (1, 1, 0, 0), strict=True)]  # 2-2
    + [("b", w, "bcc", 1) for w in "wxyz"]  # unanimous
    + [("c", w, "bcc", v) for w, v in zip("wxyz", (1, 1, 1, 0), strict=True)]  # 3-1
    + [("d", "w", "bcc", 1)]  # one answer
)
POSTERIORS = {
    "bcc": pd.DataFrame(
        {0: [0.40, 0.01, 0.30, 0.45], 1: [0.60, 0.99, 0.70, 0.55]}, index=pd.Index(list("abcd"), name="task")
    )
}


def test_uncertain_posteriors_and_split_votes_are_disputed_with_the_reason():
    table = disputed_items(POSTERIORS, ANSWERS)
    assert table["task"].tolist() == ["a", "c"]
    assert table.set_index("task").loc["a", "reason"] == "uncertain+no majority"
    assert table.set_index("task").loc["c", "reason"] == "uncertain"
    assert table.set_index("task").loc["a", "votes"] == "0:2 1:2"
    assert table.set_index("task").loc["c", "posterior"] == pytest.approx(0.70)


def test_the_bounds_gold_and_the_majority_switch_change_the_queue():
    assert disputed_items(POSTERIORS, ANSWERS, DisputeRule(high=0.65))["task"].tolist() == ["a"]
    only_votes = DisputeRule(low=0.0, high=0.5, no_majority=True)
    assert disputed_items(POSTERIORS, ANSWERS, only_votes)["reason"].tolist() == ["no majority"]
    assert disputed_items(POSTERIORS, ANSWERS, gold=[("a", "bcc")])["task"].tolist() == ["c"]
    assert disputed_items(POSTERIORS, ANSWERS, DisputeRule(min_answers=1))["task"].tolist() == ["a", "c", "d"]


@pytest.mark.parametrize("kwargs", [{"low": 0.9, "high": 0.5}, {"high": 1.5}, {"min_answers": 0}])
def test_a_bad_rule_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match="must"):
        DisputeRule(**kwargs)
