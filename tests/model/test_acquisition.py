"""Acquisition strategies on constructed cases: a confident image scores below an ambiguous one under
every strategy; Monte Carlo dropout has no spread with dropout off; the core-set spreads its picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.common.acquisition import (
    STRATEGIES,
    Outputs,
    binary_entropy,
    check_strategy,
    diverse_batch,
    entropy,
    k_center_greedy,
    least_confidence,
    mutual_information,
    task_score,
    uncertainty,
)
from model.multitask.export import Explained
from model.multitask.network import MC_SAMPLES, DermNet, dropout_masks

CONFIDENT, AMBIGUOUS = 0, 1


def two_images() -> Outputs:
    """A confident image (BCC 0.98, patterns near 0 or 1) and an ambiguous one (all near 0.5)."""
    return Outputs(
        binary=[[0.98, 0.01, 0.99, 0.02], [0.55, 0.45, 0.5, 0.6]],
        categorical=[[0.94, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]],
    )


def test_least_confidence_and_entropy_rank_the_ambiguous_image_first():
    outputs = two_images()
    for u in (least_confidence(outputs), entropy(outputs)):
        assert u[AMBIGUOUS] > u[CONFIDENT]
        assert np.all((u >= 0.0) & (u <= 1.0))
    assert least_confidence(outputs)[CONFIDENT] == pytest.approx(0.02)  # 1 - max(p, 1 - p) of BCC


def test_entropy_is_scaled_by_its_largest_value():
    half = Outputs(binary=np.full((1, 8), 0.5))
    assert entropy(half)[0] == pytest.approx(1.0)
    uniform = Outputs(categorical=np.full((1, 7), 1 / 7))
    assert entropy(uniform)[0] == pytest.approx(1.0)
    sure = Outputs(binary=[[0.0, 1.0]], categorical=[[1.0, 0.0, 0.0]])
    assert entropy(sure)[0] == pytest.approx(0.0, abs=1e-9)
    assert binary_entropy([0.5])[0] == pytest.approx(np.log(2))


def test_mutual_information_needs_disagreement_not_just_uncertainty():
    # Image 0: every sample says 0.5 (uncertain, but the weights agree). Image 1: the samples disagree.
    agree = np.full((4, 2), 0.5)
    disagree = np.array([[0.95, 0.95], [0.05, 0.05], [0.95, 0.95], [0.05, 0.05]])
    mi = mutual_information(Outputs(binary=np.stack([agree, disagree])))
    assert mi[0] == pytest.approx(0.0, abs=1e-9)
    assert mi[1] > 0.5
    # the same for a categorical output
    rows = np.array([[[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]], [[1 / 3] * 3, [1 / 3] * 3]])
    mi = mutual_information(Outputs(categorical=rows))
    assert mi[0] > 0.3 and mi[1] == pytest.approx(0.0, abs=1e-9)


def test_every_strategy_scores_a_confident_image_above_an_ambiguous_one():
    outputs = two_images()
    rng = np.random.default_rng(0)
    confident = np.clip(outputs.binary[CONFIDENT] + rng.normal(0, 0.005, (10, 4)), 0, 1)
    ambiguous = np.clip(outputs.binary[AMBIGUOUS] + rng.normal(0, 0.3, (10, 4)), 0, 1)
    samples = Outputs(binary=np.stack([confident, ambiguous]))
    for strategy in STRATEGIES:
        u = uncertainty(strategy, outputs, samples)
        score = [task_score(x) for x in u]
        assert score[CONFIDENT] > score[AMBIGUOUS], strategy


def test_bad_requests_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown acquisition strategy 'margin'"):
        check_strategy("margin")
    with pytest.raises(ValueError, match="needs sampled outputs"):
        uncertainty("bald", two_images())
    with pytest.raises(ValueError, match="probabilities"):
        Outputs(binary=[[1.5]])
    with pytest.raises(ValueError, match="no outputs"):
        Outputs()
    with pytest.raises(ValueError, match="same images"):
        Outputs(binary=[[0.5]], categorical=[[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="samples must be"):
        mutual_information(Outputs(binary=[[0.5]]))


def test_mc_dropout_has_no_spread_with_dropout_off_and_some_with_it_on():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)

    def network(dropout: float) -> DermNet:
        net = DermNet(width_mult=0.35, dropout=dropout).eval()
        for head in (net.bcc_head, net.pattern_head):
            torch.nn.init.normal_(head.weight, 0.0, 0.5)
        return net

    off = Explained(network(0.0)).eval()
    with torch.no_grad():
        logits, _, _, samples = off(images)
    assert samples.shape == (3, MC_SAMPLES, logits.shape[1])
    assert samples.var(dim=1).max().item() < 1e-12  # every sample is the deterministic output
    assert torch.allclose(samples.mean(dim=1), logits, atol=1e-5)
    assert np.abs(mutual_information(Outputs(binary=torch.sigmoid(samples).numpy()))).max() < 1e-9

    on_network = network(0.5)
    on = Explained(on_network).eval()
    with torch.no_grad():
        logits, _, pooled, samples = on(images)
    assert samples.std(dim=1).min() > 0
    assert torch.allclose(samples.mean(dim=1), logits, atol=0.5)  # inverted dropout: unbiased on average
    heads = on_network.forward_heads(on_network.forward_features(images))
    assert torch.allclose(heads, logits, atol=1e-5)  # eval mode: the served logits have no dropout
    assert pooled.shape == (3, on_network.bcc_head.in_features)
    assert mutual_information(Outputs(binary=torch.sigmoid(samples).numpy())).min() > 0


def test_dropout_masks_are_fixed_and_scaled():
    a, b = dropout_masks(1280, 0.2), dropout_masks(1280, 0.2)
    assert torch.equal(a, b)  # the same image gets the same estimate on every call
    assert set(a.unique().tolist()) == {0.0, 1.25}
    assert a.eq(0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert torch.equal(dropout_masks(16, 0.0), torch.ones(MC_SAMPLES, 16))


def clusters() -> tuple[np.ndarray, np.ndarray]:
    """Four tight clusters of 25 points at the corners of a square; each point's cluster."""
    rng = np.random.default_rng(1)
    corners = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    labels = np.repeat(np.arange(4), 25)
    return corners[labels] + rng.normal(0, 0.1, (100, 2)), labels


def test_core_set_picks_one_point_per_cluster_before_a_second_anywhere():
    points, labels = clusters()
    picked = k_center_greedy(points, 4)
    assert sorted(labels[picked]) == [0, 1, 2, 3]
    # with cluster 0 labelled already, the first three picks are the other clusters
    picked = k_center_greedy(points, 3, centers=points[labels == 0][:1])
    assert sorted(labels[picked]) == [1, 2, 3]
    assert len(set(k_center_greedy(points, 100))) == 100 and k_center_greedy(points, 0) == []


def test_diverse_batch_spreads_the_most_uncertain_images():
    points, labels = clusters()
    u = np.where(labels == 0, 0.9, 0.5) + np.linspace(0, 0.01, 100)  # cluster 0 the most uncertain
    top = diverse_batch(u, points, 4, pool_factor=1)
    assert set(top) == set(np.argsort(-u)[:4]) and set(labels[top]) == {0}  # the plain top-n
    spread = diverse_batch(u, points, 4, pool_factor=100)
    assert sorted(labels[spread]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="pool_factor"):
        diverse_batch(u, points, 4, pool_factor=0)
