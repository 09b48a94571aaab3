"""The next batch to label: the acquisition strategy's most informative unlabelled images, spread out.

A per-task score can only rank images one by one: sorted by it, the first twenty tasks may be twenty
views of one ambiguous lesion. :func:`next_batch` scores every task of a project (the strategy of
:mod:`backend.serving.predict`, on the BCC model's outputs and the lesion pair's where the config shows
them), then picks ``size`` of the unlabelled ones with :func:`model.common.acquisition.diverse_batch`:
among the ``pool_factor * size`` most uncertain, one at a time the farthest, in the BCC model's
embedding, from every image labelled or picked so far (k-center greedy). ``pool_factor=1`` gives the
plain top of the ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backend.images import ImageFetcher
from backend.serving.lesion import metadata_row, run_lesion
from backend.serving.multitask import run_batch
from backend.serving.predict import Served, acquisition_score, fetch_image
from labeling_config.parse import ProjectConfig
from model.common.acquisition import POOL_FACTOR, SAMPLING, check_strategy, diverse_batch

logger = logging.getLogger(__name__)

CHUNK = 16


@dataclass(frozen=True)
class Scored:
    """Every readable task of a project under one strategy."""

    tasks: list[int]  # task ids, in the order given
    uncertainty: NDArray[Any]  # (N,)
    embeddings: NDArray[Any]  # (N, C): the BCC model's pooled features
    failed: dict[int, str]  # task id -> why it could not be scored


@dataclass(frozen=True)
class Pick:
    """One task of the next batch."""

    rank: int  # 1 = picked first
    task: int
    uncertainty: float
    score: float  # the task score Label Studio shows (1 - uncertainty)


def score_tasks(
    tasks: Sequence[dict[str, Any]],
    config: ProjectConfig,
    served: Served,
    fetcher: ImageFetcher,
    strategy: str,
    show_all: bool,
    concurrency: int = 8,
    progress: Callable[[int, int], None] | None = None,
    override: float | None = None,
) -> Scored:
    """The strategy's uncertainty (one minus the task score ``/predict`` gives; ``override``:
    ``MODEL_SCORE_THRESHOLD``) and the embedding of every task whose image can be had.

    Raises:
        ValueError: an unknown strategy, or no BCC model to give the embedding.
    """
    check_strategy(strategy)
    model = served.multitask
    if model is None:
        raise ValueError(
            "a diverse batch needs the BCC model's embedding: this config has no control it fills"
        )
    ids: list[int] = []
    values: list[float] = []
    embeddings: list[NDArray[Any]] = []
    failed: dict[int, str] = {}

    def fetch(task: dict[str, Any]) -> Any:
        return fetch_image(task, config.image_key, fetcher)

    with ThreadPoolExecutor(max(1, concurrency), "dermassist-acquire") as pool:
        for start in range(0, len(tasks), CHUNK):
            chunk = list(tasks[start : start + CHUNK])
            good = []
            for task, loaded in zip(chunk, pool.map(fetch, chunk), strict=True):
                if isinstance(loaded, str):
                    failed[int(task["id"])] = loaded
                else:
                    good.append((task, loaded.image))
            if good:
                images = [image for _, image in good]
                outputs = run_batch(
                    model, images, maps=False, sampling=SAMPLING.get(strategy), embeddings=True
                )
                lesions: list[Any] = (
                    run_lesion(served.lesion, images, [metadata_row(t.get("data"), config) for t, _ in good])
                    if served.lesion is not None and config.ham_diagnosis is not None
                    else [None] * len(good)
                )
                for (task, _), output, lesion in zip(good, outputs, lesions, strict=True):
                    score = acquisition_score(strategy, config, served, output, lesion, show_all, override)
                    assert output.embedding is not None
                    ids.append(int(task["id"]))
                    values.append(1.0 - score)
                    embeddings.append(output.embedding)
            if progress is not None:
                progress(min(start + CHUNK, len(tasks)), len(tasks))
    width = embeddings[0].shape[0] if embeddings else 0
    return Scored(
        ids,
        np.asarray(values, dtype=np.float64),
        np.stack(embeddings) if embeddings else np.zeros((0, width), dtype=np.float32),
        failed,
    )


def next_batch(scored: Scored, labelled: set[int], size: int, pool_factor: int = POOL_FACTOR) -> list[Pick]:
    """``size`` unlabelled tasks of ``scored``: uncertain and spread out (see the module).

    Raises:
        ValueError: a size or pool factor below 1.
    """
    if size < 1:
        raise ValueError(f"the batch size must be at least 1, got {size}")
    if pool_factor < 1:
        raise ValueError(f"the pool factor must be at least 1, got {pool_factor}")
    is_labelled = np.array([t in labelled for t in scored.tasks], dtype=bool)
    open_rows = np.flatnonzero(~is_labelled)
    picked = diverse_batch(
        scored.uncertainty[open_rows],
        scored.embeddings[open_rows],
        size,
        labelled=scored.embeddings[is_labelled],
        pool_factor=pool_factor,
    )
    return [
        Pick(
            rank,
            scored.tasks[open_rows[row]],
            round(float(scored.uncertainty[open_rows[row]]), 6),
            round(1.0 - float(scored.uncertainty[open_rows[row]]), 6),
        )
        for rank, row in enumerate(picked, 1)
    ]
