"""``/predict``'s work: tasks in, Label Studio predictions out, for whichever systems a config uses.

Per request: every task's image is fetched (a task whose image cannot be had gets an empty prediction
that says why, the others go on); one batched pass of the BCC model (probabilities and Grad-CAM maps)
and one of the lesion pair, each only when the config has a control it fills; then each task's result
items. Regions are drawn inside the lesion: the U-Net's outline, segmented only for a task that draws a
region. Outputs not validated on real images are left out unless ``SHOW_OUTPUTS=all``.

The task ``score`` is ``1 - uncertainty`` under the project's acquisition strategy (the config's
``<Image acquisition>``, else ``ACQUISITION``; :mod:`model.common.acquisition`), so that sorting by it
ascending puts first the images the strategy would have labelled next. ``least_confidence`` keeps the
confidence of the diagnosis; ``entropy`` counts every output the config shows; ``bald`` and ``tta``
sample the BCC model (with the lesion pair alone they fall back to ``entropy``). A task whose diagnosis
is not shown (not validated on real images) gets no score, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from backend import metrics
from backend.images import ImageError, ImageFetcher
from backend.label_studio.predictions import empty_prediction, task_prediction, threshold_for
from backend.serving.lesion import LesionSystem, lesion_prediction, metadata_row, run_lesion, segment
from backend.serving.multitask import ImageOutput, ServedModel, run_batch
from labeling_config.parse import ProjectConfig
from labeling_config.schema import DIAGNOSIS_KEY
from model.common.acquisition import DEFAULT_STRATEGY, SAMPLING, Outputs, task_score, uncertainty

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What fills one config: the BCC model and / or the lesion pair, and the version LS is told."""

    version: str
    systems: tuple[str, ...]  # the systems the config uses
    multitask: ServedModel | None
    lesion: LesionSystem | None
    outliner: LesionSystem | None  # the U-Net that outlines a region's lesion (the pair, if any)


#: Tasks run through the models together; the next chunk's images are fetched meanwhile.
CHUNK = 16


def _image_ref(task: Any, image_key: str) -> str | None:
    data = task.get("data") if isinstance(task, dict) else None
    ref = data.get(image_key) if isinstance(data, dict) else None
    return ref if isinstance(ref, str) else None


def fetch_image(task: Any, image_key: str, fetcher: ImageFetcher) -> Any:
    """A task's image (:meth:`ImageFetcher.fetch`), or why it cannot be had (a string)."""
    ref = _image_ref(task, image_key)
    if ref is None:
        return f"task has no '{image_key}' in its data"
    try:
        return fetcher.fetch(ref)
    except ImageError as exc:
        return str(exc)


def predict_tasks(
    tasks: Sequence[Any],
    config: ProjectConfig,
    served: Served,
    fetcher: ImageFetcher,
    model_score_threshold: float | None,
    show_all: bool,
    concurrency: int = 8,
    acquisition: str = DEFAULT_STRATEGY,
) -> list[dict[str, Any]]:
    """One prediction per task, in order (Label Studio's ``results``).

    Images are fetched ``concurrency`` at a time (``IMAGE_FETCH_CONCURRENCY``) while the models run:
    the tasks go through the models in chunks of :data:`CHUNK`, and the fetches of the next chunk
    overlap the current chunk's inference (at most two chunks of images are held at once).
    ``acquisition`` (``ACQUISITION``) sets the task score unless the config names its own strategy.
    """
    predictions: list[dict[str, Any] | None] = [None] * len(tasks)
    starts = list(range(0, len(tasks), CHUNK))

    def fetch(i: int) -> Any:
        return fetch_image(tasks[i], config.image_key, fetcher)

    with ThreadPoolExecutor(max(1, concurrency), "dermassist-fetch") as pool:
        submitted: dict[int, list[Future[Any]]] = {}

        def submit(start: int) -> None:
            if start < len(tasks) and start not in submitted:
                submitted[start] = [
                    pool.submit(fetch, i) for i in range(start, min(start + CHUNK, len(tasks)))
                ]

        for start in starts:
            submit(start)
            submit(start + CHUNK)  # the next chunk is fetched while this one runs
            good: list[tuple[int, Any]] = []
            for i, future in enumerate(submitted.pop(start), start):
                loaded = future.result()
                if isinstance(loaded, str):
                    task_id = tasks[i].get("id") if isinstance(tasks[i], dict) else None
                    logger.warning("task %s: no prediction: %s", task_id, loaded)
                    metrics.PREDICT_TASKS.labels("no image").inc()
                    predictions[i] = empty_prediction(served.version, loaded)
                else:
                    good.append((i, loaded))
            if good:
                found = _predict_images(
                    [loaded.image for _, loaded in good],
                    [tasks[i].get("data") for i, _ in good],
                    [(loaded.width, loaded.height) for _, loaded in good],
                    config,
                    served,
                    model_score_threshold,
                    show_all,
                    config.acquisition or acquisition,
                )
                for (i, _), prediction in zip(good, found, strict=True):
                    predictions[i] = prediction
    done = [p for p in predictions if p is not None]
    metrics.PREDICT_TASKS.labels("predicted").inc(sum("error" not in p for p in done))
    return done


def _predict_images(
    images: list[Any],
    data_rows: list[Any],
    sizes: list[tuple[int, int]],
    config: ProjectConfig,
    served: Served,
    model_score_threshold: float | None,
    show_all: bool,
    strategy: str = DEFAULT_STRATEGY,
) -> list[dict[str, Any]]:
    model, system = served.multitask, served.lesion
    if model is None and strategy in SAMPLING:
        strategy = "entropy"  # the lesion pair alone: nothing to sample
    outputs = (
        run_batch(model, images, sampling=SAMPLING.get(strategy))
        if model is not None
        else [None] * len(images)
    )
    lesions = (
        run_lesion(system, images, [metadata_row(row, config) for row in data_rows])
        if system is not None
        else [None] * len(images)
    )

    def outline_of(found: Any, image: Any) -> Callable[[], Any] | None:
        if found is not None:
            return lambda: found.mask
        if served.outliner is not None:  # called only for a task that draws a region
            outliner = served.outliner
            return lambda: segment(outliner, image)[0]
        return None

    results = []
    for image, (width, height), output, lesion_output in zip(images, sizes, outputs, lesions, strict=True):
        prediction: dict[str, Any] = {"result": [], "score": None, "model_version": served.version}
        if model is not None and output is not None:
            prediction = task_prediction(
                output,
                config,
                served.version,
                width,
                height,
                model.meta.thresholds,
                model_score_threshold,
                provenance=None if show_all else model.meta.provenance,
                outline=outline_of(lesion_output, image),
            )
        if system is not None and lesion_output is not None:
            items, score = lesion_prediction(
                lesion_output, config, served.version, None if show_all else system.provenance
            )
            prediction["result"].extend(items)
            if prediction["score"] is None:
                prediction["score"] = score
        if prediction["score"] is not None and strategy != DEFAULT_STRATEGY:
            prediction["score"] = acquisition_score(strategy, config, served, output, lesion_output, show_all)
        results.append(prediction)
    return results


def served_targets(config: ProjectConfig, model: ServedModel, show_all: bool) -> list[str]:
    """The BCC model's outputs this config shows: the diagnosis, the patterns its controls hold
    (choices or regions), each only where shown (validated on real images, unless ``show_all``)."""
    from model.common.provenance import shown

    wanted = {DIAGNOSIS_KEY} if config.diagnosis is not None else set()
    for control in (config.patterns, config.regions):
        if control is not None:
            wanted |= set(control.values)
    return [k for k in model.meta.targets if k in wanted and shown(model.meta.provenance, k, show_all)]


def acquisition_score(
    strategy: str,
    config: ProjectConfig,
    served: Served,
    output: ImageOutput | None,
    lesion_output: Any,
    show_all: bool,
    override: float | None = None,
) -> float:
    """One task's score under ``strategy``: ``1 - uncertainty`` over the outputs the config shows.

    ``least_confidence`` with the BCC model is the prediction's own score: the confidence of the
    diagnosis chosen at its threshold (the control's, else ``override``, else the checkpoint's).
    """
    if strategy == DEFAULT_STRATEGY and output is not None and served.multitask is not None:
        control = config.diagnosis.threshold if config.diagnosis is not None else None
        t = threshold_for(DIAGNOSIS_KEY, served.multitask.meta.thresholds, control, override)
        p = output.probs[DIAGNOSIS_KEY]
        return round(p if p >= t else 1.0 - p, 6)
    binary = samples = None
    if output is not None and served.multitask is not None:
        targets = list(served.multitask.meta.targets)
        keys = served_targets(config, served.multitask, show_all) or [DIAGNOSIS_KEY]
        columns = [targets.index(k) for k in keys]
        binary = [[output.probs[k] for k in keys]]
        if output.samples is not None:
            samples = Outputs(binary=output.samples[None][:, :, columns])
    categorical = None
    if lesion_output is not None and config.ham_diagnosis is not None:
        categorical = [list(lesion_output.probs.values())]
    value = uncertainty(strategy, Outputs(binary=binary, categorical=categorical), samples)
    return task_score(float(value[0]))
