"""The next batch: unlabelled tasks only, the most uncertain without diversity, spread out with it."""

from __future__ import annotations

import numpy as np
import pytest

from backend.serving.acquire import Scored, next_batch


def scored() -> Scored:
    """Twelve tasks in three tight clusters; cluster A the most uncertain, task 1 labelled."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    cluster = np.repeat([0, 1, 2], 4)
    embeddings = centres[cluster] + rng.normal(0, 0.1, (12, 2))
    uncertainty = np.array([0.9, 0.89, 0.88, 0.87, 0.5, 0.49, 0.48, 0.47, 0.3, 0.29, 0.28, 0.27])
    return Scored(list(range(1, 13)), uncertainty, embeddings, {})


def test_without_diversity_the_batch_is_the_most_uncertain_unlabelled_tasks():
    picks = next_batch(scored(), labelled={1}, size=3, pool_factor=1)
    assert {p.task for p in picks} == {2, 3, 4}
    assert [p.rank for p in picks] == [1, 2, 3]
    assert all(p.score == pytest.approx(1 - p.uncertainty) for p in picks)


def test_with_diversity_the_batch_spreads_over_the_clusters():
    picks = next_batch(scored(), labelled=set(), size=3, pool_factor=4)
    assert {(p.task - 1) // 4 for p in picks} == {0, 1, 2}
    # cluster A has a labelled task already: the batch goes to the two others
    picks = next_batch(scored(), labelled={1}, size=2, pool_factor=4)
    assert {(p.task - 1) // 4 for p in picks} == {1, 2}


def test_labelled_tasks_are_never_picked_and_bad_sizes_are_refused():
    picks = next_batch(scored(), labelled=set(range(1, 11)), size=5)
    assert {p.task for p in picks} == {11, 12}
    with pytest.raises(ValueError, match="batch size"):
        next_batch(scored(), set(), 0)
    with pytest.raises(ValueError, match="pool factor"):
        next_batch(scored(), set(), 2, pool_factor=0)
