"""Acquisition: which image a dermatologist should label next.

Every strategy turns a model's outputs for one image into an **uncertainty** between 0 (nothing to
learn: the model is sure) and 1 (the most a label could tell it), so that strategies compare on one
scale and Label Studio's task score can be ``1 - uncertainty`` (sorting ascending puts the images to
label first, as the confidence score always did):

- ``least_confidence``: one minus the probability of the chosen answer (at most ``1 - 1/C`` for C
  classes: 0.5 for BCC), so that its task score is the confidence itself, as it always was.
- ``entropy``: the outputs' entropy, summed over every output served and divided by its largest
  possible value (``log C`` per output): BCC and the seven patterns count as eight binary outputs,
  the HAM10000 diagnosis as one seven-class output.
- ``bald``: the mutual information between the answer and the network's weights (Houlsby et al.
  2011, Gal et al. 2017), estimated from Monte Carlo dropout samples: entropy of the mean minus mean
  entropy, scaled as ``entropy``. Zero when the samples agree (e.g. dropout off), whatever their level.
- ``tta``: the same mutual information over test-time augmentations (the image flipped and rotated:
  dermoscopy has no up or left) instead of dropout samples: how much the answer depends on the view.

:func:`diverse_batch` adds diversity to any of them: among the most uncertain images it picks, one
at a time, the one farthest (in the network's embedding) from everything labelled or picked so far
(the k-center greedy core-set of Sener & Savarese 2018), so a batch is not eight views of one lesion.

All functions are pure NumPy; probabilities are calibrated ones (sigmoid for binary outputs, softmax
rows for a categorical one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from labeling_config.schema import ACQUISITION_STRATEGIES

FloatArray = NDArray[np.float64]

#: The strategies a deployment or project can choose (``ACQUISITION`` / the config's ``acquisition``).
STRATEGIES = ACQUISITION_STRATEGIES

#: The default: the calibrated confidence, as the task score always was.
DEFAULT_STRATEGY = "least_confidence"

#: How the BCC model is sampled for the strategies that need more than one output per image: Monte Carlo
#: dropout (``bald``, from the same pass) or the test-time views (``tta``, one more pass per view).
SAMPLING: dict[str, str] = {"bald": "dropout", "tta": "views"}

#: :func:`diverse_batch` draws its batch from this many times its size of the most uncertain images.
POOL_FACTOR = 4

_EPS = 1e-12


def check_strategy(name: str) -> str:
    """``name`` if it is one of :data:`STRATEGIES`.

    Raises:
        ValueError: naming the known strategies.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown acquisition strategy {name!r}; use one of {', '.join(STRATEGIES)}")
    return name


def _as_probs(probs: ArrayLike, name: str = "probs") -> FloatArray:
    array = np.asarray(probs, dtype=np.float64)
    if array.size and (not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return array


def binary_entropy(p: ArrayLike) -> FloatArray:
    """Entropy (nats) of Bernoulli(p), elementwise; 0 at p = 0 or 1, log 2 at 0.5."""
    q = np.clip(_as_probs(p, "p"), _EPS, 1.0 - _EPS)
    out: FloatArray = -(q * np.log(q) + (1.0 - q) * np.log1p(-q))
    return out


def categorical_entropy(probs: ArrayLike) -> FloatArray:
    """Entropy (nats) of each row of ``probs`` (``(..., C)``, rows summing to one)."""
    q = np.clip(_as_probs(probs), _EPS, 1.0)
    out: FloatArray = -(q * np.log(q)).sum(axis=-1)
    return out


class Outputs:
    """One model's probabilities for N images, grouped into binary and categorical outputs.

    Args:
        binary: ``(N, K)`` sigmoid probabilities of K binary outputs (BCC, the patterns), or None.
        categorical: ``(N, C)`` softmax rows of one C-class output (the diagnosis), or None.

    Samples (Monte Carlo dropout, augmentations) add an axis: ``(N, T, K)`` and ``(N, T, C)``.
    """

    def __init__(self, binary: ArrayLike | None = None, categorical: ArrayLike | None = None) -> None:
        self.binary = None if binary is None else _as_probs(binary, "binary")
        self.categorical = None if categorical is None else _as_probs(categorical, "categorical")
        if self.binary is None and self.categorical is None:
            raise ValueError("no outputs: give binary and / or categorical probabilities")
        sizes = {len(a) for a in (self.binary, self.categorical) if a is not None}
        if len(sizes) != 1:
            raise ValueError("binary and categorical outputs must cover the same images")

    def __len__(self) -> int:
        first = self.binary if self.binary is not None else self.categorical
        assert first is not None
        return len(first)

    def _max_entropy(self) -> float:
        total = 0.0
        if self.binary is not None:
            total += self.binary.shape[-1] * np.log(2.0)
        if self.categorical is not None:
            total += np.log(self.categorical.shape[-1])
        return float(total)

    def _entropy(self, binary: FloatArray | None, categorical: FloatArray | None) -> FloatArray:
        parts = []
        if binary is not None:
            parts.append(binary_entropy(binary).sum(axis=-1))
        if categorical is not None:
            parts.append(categorical_entropy(categorical))
        total: FloatArray = np.sum(parts, axis=0)
        return total


def least_confidence(outputs: Outputs) -> FloatArray:
    """Per image, one minus the confidence of its chosen answer (0 to ``1 - 1/C``).

    The first binary output (BCC) decides when there is one, as the task score always did;
    otherwise the categorical output (the diagnosis).
    """
    if outputs.binary is not None:
        p = outputs.binary[:, 0]
        confidence = np.maximum(p, 1.0 - p)
    else:
        assert outputs.categorical is not None
        confidence = outputs.categorical.max(axis=-1)
    out: FloatArray = np.clip(1.0 - confidence, 0.0, 1.0)
    return out


def entropy(outputs: Outputs) -> FloatArray:
    """Per image, the entropy of every output together, scaled to [0, 1]."""
    total = outputs._entropy(outputs.binary, outputs.categorical)
    out: FloatArray = np.clip(total / outputs._max_entropy(), 0.0, 1.0)
    return out


def mutual_information(samples: Outputs) -> FloatArray:
    """Per image, the mutual information of ``T`` samples (``(N, T, ...)`` outputs), scaled to [0, 1].

    Entropy of the mean prediction minus the mean of the samples' entropies (BALD); zero when all
    samples agree, at most the entropy of the mean.
    """
    binary, categorical = samples.binary, samples.categorical
    for array in (binary, categorical):
        if array is not None and array.ndim != 3:
            raise ValueError("samples must be (images, samples, outputs)")
    mean_entropy = samples._entropy(
        None if binary is None else binary.mean(axis=1),
        None if categorical is None else categorical.mean(axis=1),
    )
    entropy_mean = samples._entropy(binary, categorical).mean(axis=1)
    out: FloatArray = np.clip((mean_entropy - entropy_mean) / samples._max_entropy(), 0.0, 1.0)
    return out


def uncertainty(strategy: str, outputs: Outputs, samples: Outputs | None = None) -> FloatArray:
    """The uncertainty :func:`check_strategy` ``strategy`` gives each image.

    Args:
        outputs: the model's (deterministic) probabilities.
        samples: for ``bald``, Monte Carlo dropout samples; for ``tta``, the augmented views' outputs.

    Raises:
        ValueError: an unknown strategy, or ``bald`` / ``tta`` without samples.
    """
    check_strategy(strategy)
    if strategy == "least_confidence":
        return least_confidence(outputs)
    if strategy == "entropy":
        return entropy(outputs)
    if samples is None:
        raise ValueError(f"the {strategy} strategy needs sampled outputs")
    return mutual_information(samples)


def task_score(uncertainty_value: float) -> float:
    """Label Studio's task score for an uncertainty: ``1 - u``, rounded (ascending: label first)."""
    return round(1.0 - float(uncertainty_value), 6)


def k_center_greedy(
    embeddings: ArrayLike, n: int, centers: ArrayLike | None = None, candidates: Sequence[int] | None = None
) -> list[int]:
    """Pick ``n`` rows of ``embeddings`` by k-center greedy: each pick the farthest from all before.

    Args:
        embeddings: ``(N, D)`` image embeddings.
        n: how many to pick (at most the number of candidates).
        centers: ``(M, D)`` embeddings already labelled (the first pick is farthest from them); with
            none, the first pick is the candidate farthest from the candidates' mean.
        candidates: rows that may be picked (default: all).

    Returns:
        Row indices in pick order.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("embeddings must be (images, dimensions)")
    pool = np.arange(len(x)) if candidates is None else np.asarray(list(candidates), dtype=np.int64)
    n = min(int(n), len(pool))
    if n <= 0:
        return []
    points = x[pool]
    given = None if centers is None else np.asarray(centers, dtype=np.float64).reshape(-1, x.shape[1])
    if given is None or len(given) == 0:
        given = points.mean(axis=0, keepdims=True)
    norms = (points * points).sum(1)  # once: each pick then costs one matrix-vector product
    nearest = np.full(len(pool), np.inf)
    for start in range(0, len(given), 1024):
        nearest = np.minimum(nearest, _sq_dist(points, norms, given[start : start + 1024]).min(axis=1))
    picked: list[int] = []
    for _ in range(n):
        best = int(np.argmax(nearest))
        picked.append(int(pool[best]))
        nearest = np.minimum(nearest, _sq_dist(points, norms, points[best : best + 1])[:, 0])
        nearest[best] = -np.inf
    return picked


def _sq_dist(a: FloatArray, a_norms: FloatArray, b: FloatArray) -> FloatArray:
    d: FloatArray = a_norms[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def diverse_batch(
    uncertainties: ArrayLike,
    embeddings: ArrayLike,
    n: int,
    labelled: ArrayLike | None = None,
    pool_factor: int = POOL_FACTOR,
) -> list[int]:
    """A batch of ``n`` images both uncertain and spread out.

    The ``pool_factor * n`` most uncertain images are the candidates; :func:`k_center_greedy` picks
    the batch among them, away from the ``labelled`` embeddings. ``pool_factor=1`` is the plain top-n
    by uncertainty (in a k-center order); a uniform uncertainty makes it a pure core-set.

    Returns:
        Row indices in pick order.
    """
    u = np.asarray(uncertainties, dtype=np.float64)
    if pool_factor < 1:
        raise ValueError("pool_factor must be at least 1")
    order = np.lexsort((np.arange(len(u)), -u))  # most uncertain first, ties by row
    candidates = order[: max(0, int(n)) * int(pool_factor)]
    return k_center_greedy(embeddings, n, labelled, candidates.tolist())
