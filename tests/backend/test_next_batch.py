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


def test_least_confidence_ranks_by_the_score_label_studio_shows():
    """The diagnosis is chosen at its threshold (0.2 here), so p = 0.3 is a BCC with confidence 0.3,
    as /predict's task score says, not max(p, 1 - p) = 0.7."""
    from types import SimpleNamespace

    from backend.serving.multitask import ImageOutput
    from backend.serving.predict import Served, acquisition_score
    from labeling_config import TARGETS, load_config
    from labeling_config.parse import parse_config

    meta = SimpleNamespace(targets=TARGETS, thresholds={"bcc": 0.2}, provenance=None)
    model = SimpleNamespace(meta=meta)
    served = Served("v", ("multitask",), model, None, None)  # type: ignore[arg-type]
    output = ImageOutput(probs=dict.fromkeys(TARGETS, 0.3), maps=np.zeros((0, 0, 0), np.float32))
    config = parse_config(load_config("bcc"))
    assert acquisition_score("least_confidence", config, served, output, None, True) == 0.3
    assert acquisition_score("least_confidence", config, served, output, None, True, override=0.5) == 0.7
