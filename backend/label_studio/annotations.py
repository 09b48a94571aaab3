"""Label Studio annotation JSON -> the store's vocabulary (target keys, 0/1 values, regions).

Pure functions: no SQL, no HTTP. The project's own labeling config (parsed by
:func:`labeling_config.parse_config`) says which control holds what, so a project that renamed its
controls or its choices is read correctly.

The reading of one annotation's ``result``:

- the diagnosis control's choice gives ``bcc`` (1 for BCC, 0 for non-BCC); with the HAM10000 config,
  the seven-class choice gives ``bcc`` = 1 for "bcc" and 0 for any other class;
- once the rater has answered anything, every pattern the config offers counts as 0 unless chosen
  (Label Studio sends no result item for a multiple choice with nothing ticked);
- brush results are kept as regions ``{label, format, rle, width, height}`` with the target key as label;
- values the config offers but the model does not know (a team's own extra choice) are ignored;
  values the config does not offer at all, and controls that are not in it, are errors: the
  annotation was made against another config and guessing would corrupt the reference standard.

The prediction an annotation started from (``parent_prediction``, AI exposure) is read by
:func:`parent_prediction`: its id, its ``model_version`` and, where the payload carries the prediction,
what it showed, read with :func:`parse_result`. Label Studio 1.23.2 sends with every annotation, in
webhooks and exports alike, the task's prediction as ``prediction`` (also when the read did not start
from it: only ``parent_prediction`` says it did); its webhooks' tasks have no ``predictions``, its
exports' tasks list them by id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from labeling_config import DIAGNOSIS_KEY
from labeling_config.parse import Control, ProjectConfig, Role

logger = logging.getLogger(__name__)

#: The result types of the controls dermassist reads: ``<Choices>`` and ``<BrushLabels>``.
CHOICE_TYPE = "choices"
BRUSH_TYPE = "brushlabels"


class AnnotationError(ValueError):
    """An annotation this project's labeling config cannot read; the message says what is wrong."""


@dataclass(frozen=True)
class ParsedAnnotation:
    """One rater's answer in the store's terms.

    Attributes:
        labels: target key -> 0 / 1, for the targets the rater answered.
        diagnosis: the diagnosis value as chosen (``"BCC"``, ``"non-BCC"``, ``"mel"``), if any.
        regions: brush regions with target keys as labels.
    """

    labels: dict[str, int] = field(default_factory=dict)
    diagnosis: str | None = None
    regions: list[dict[str, Any]] = field(default_factory=list)


def _controls_by_name(config: ProjectConfig) -> dict[str, list[Control]]:
    by_name: dict[str, list[Control]] = {}
    for control in config.controls.values():
        by_name.setdefault(control.name, []).append(control)
    return by_name


def _inverse(control: Control) -> dict[str, str]:
    return {value: key for key, value in control.values.items()}


def _check_values(control: Control, given: Sequence[Any], kind: str) -> list[str]:
    if not isinstance(given, list) or not all(isinstance(v, str) for v in given):
        raise AnnotationError(f'control "{control.name}": {kind} must be a list of strings, got {given!r}')
    known = set(control.values.values()) | set(control.unmapped)
    unknown = [v for v in given if v not in known]
    if unknown:
        offered = ", ".join(sorted(known))
        raise AnnotationError(
            f'control "{control.name}" has no value(s) {unknown}; this project\'s config offers: {offered}. '
            "Was the annotation made with another labeling config?"
        )
    return list(given)


def parse_result(result: Any, config: ProjectConfig) -> ParsedAnnotation:
    """Read an annotation's ``result`` list with the project's config.

    Raises:
        AnnotationError: a malformed item, a control the config does not have, or a value it does not offer.
    """
    if not isinstance(result, list):
        raise AnnotationError(f"an annotation's result must be a list, got {type(result).__name__}")
    by_name = _controls_by_name(config)
    ignored = set(config.skipped) | set(config.ignored)
    labels: dict[str, int] = {}
    diagnosis: str | None = None
    chosen_patterns: set[str] = set()
    regions: list[dict[str, Any]] = []
    answered = False

    for index, item in enumerate(result):
        if not isinstance(item, Mapping):
            raise AnnotationError(f"result item {index} is not an object")
        name, value, kind = item.get("from_name"), item.get("value"), str(item.get("type", "")).lower()
        if not isinstance(name, str) or not isinstance(value, Mapping):
            raise AnnotationError(f"result item {index} needs a from_name and a value object")
        if name in ignored:
            continue
        controls = by_name.get(name)
        if controls is None:
            known = ", ".join(sorted(set(by_name) | ignored))
            raise AnnotationError(
                f'result item {index} is for control "{name}", which this project\'s config does not have '
                f"(controls: {known})"
            )
        if kind not in (CHOICE_TYPE, BRUSH_TYPE):
            expected = " or ".join(
                sorted(
                    {BRUSH_TYPE if c.role in (Role.REGIONS, Role.LESION) else CHOICE_TYPE for c in controls}
                )
            )
            raise AnnotationError(
                f'result item {index} is a "{kind}" result for control "{name}", which takes {expected} '
                "results; was the annotation made with another labeling config?"
            )
        if kind == CHOICE_TYPE:
            control = next(
                (c for c in controls if c.role in (Role.DIAGNOSIS, Role.PATTERNS, Role.HAM_DIAGNOSIS)), None
            )
            if control is None:
                raise AnnotationError(f'result item {index}: control "{name}" is not a choices control')
            chosen = _check_values(control, value.get("choices", []), "choices")
            inverse = _inverse(control)
            keys = [inverse[v] for v in chosen if v in inverse]
            answered = answered or bool(chosen)
            if control.role is Role.PATTERNS:
                chosen_patterns.update(keys)
            elif chosen:
                if len(chosen) > 1:
                    raise AnnotationError(f'control "{name}" is a single choice but holds {chosen}')
                diagnosis = chosen[0]
                if keys:
                    labels[DIAGNOSIS_KEY] = int(keys[0] == DIAGNOSIS_KEY)
        else:
            given = value.get(BRUSH_TYPE, [])
            brush = [c for c in controls if c.role in (Role.REGIONS, Role.LESION)]
            if not brush:
                raise AnnotationError(f'result item {index}: control "{name}" is not a brush control')
            merged = Control(
                role=brush[0].role,
                name=name,
                to_name=brush[0].to_name,
                values={k: v for c in brush for k, v in c.values.items()},
                unmapped=brush[0].unmapped,
            )
            chosen = _check_values(merged, given if given is not None else [], "labels")
            inverse = _inverse(merged)
            for label in chosen:
                if label not in inverse:
                    continue
                regions.append(
                    {
                        "label": inverse[label],
                        "format": value.get("format", "rle"),
                        "rle": value.get("rle"),
                        "width": item.get("original_width"),
                        "height": item.get("original_height"),
                    }
                )
            answered = answered or bool(chosen)

    patterns = config.patterns
    if patterns is not None and answered:
        for key in patterns.values:
            labels[key] = int(key in chosen_patterns)
    return ParsedAnnotation(labels=labels, diagnosis=diagnosis, regions=regions)


#: The largest id SQL's BIGINT holds (every Label Studio id is stored in one).
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class ParentPrediction:
    """The Label Studio prediction an annotation started from (what the reader saw).

    Attributes:
        id: the prediction's id (the annotation's ``parent_prediction``); None: a blank task.
        model_version: the prediction's ``model_version``, where the payload carries the prediction.
        shown: its ``result`` read like an annotation's; None where the payload does not carry it
            (its ``prediction`` is empty or another one) or it cannot be read with this config.
    """

    id: int | None = None
    model_version: str | None = None
    shown: ParsedAnnotation | None = None


def _prediction_object(
    parent: int, annotation: Mapping[str, Any], task: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The prediction ``parent`` as the payload carries it: the annotation's ``prediction`` (Label
    Studio 1.23), an expanded ``parent_prediction``, or an object among the task's ``predictions`` (the
    documented export format; 1.23 lists ids there). Only an object whose id is ``parent`` counts."""
    candidates: list[Any] = [annotation.get("prediction"), annotation.get("parent_prediction")]
    if task is not None and isinstance(task.get("predictions"), list):
        candidates.extend(task["predictions"])
    for candidate in candidates:
        if isinstance(candidate, Mapping) and candidate.get("id") == parent and "result" in candidate:
            return candidate
    return None


def parent_prediction(
    annotation: Mapping[str, Any],
    task: Mapping[str, Any] | None,
    config: ProjectConfig,
    max_version_chars: int = 200,
) -> ParentPrediction:
    """The prediction an annotation started from (``parent_prediction``), with what it showed.

    A prediction the payload names but does not carry, or whose result this config cannot read, gives
    its id and version without ``shown``: the reader's own answer is never refused for the prediction's
    sake.

    Raises:
        AnnotationError: ``parent_prediction`` is not an id in 1..2**63-1, or the prediction's
            ``model_version`` is not text of at most ``max_version_chars`` characters.
    """
    raw = annotation.get("parent_prediction")
    if isinstance(raw, Mapping):  # an expanded prediction object
        raw = raw.get("id")
    if raw is None:
        return ParentPrediction()
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 < raw <= MAX_ID:
        text = repr(raw)
        text = text if len(text) <= 60 else text[:60] + "..."
        raise AnnotationError(f"parent_prediction must be a prediction id in 1..2**63-1, got {text}")
    prediction = _prediction_object(raw, annotation, task)
    if prediction is None:
        return ParentPrediction(id=raw)
    version = prediction.get("model_version")
    if version is not None and (not isinstance(version, str) or len(version) > max_version_chars):
        raise AnnotationError(
            f"prediction {raw}: model_version must be text of at most {max_version_chars} characters"
        )
    try:
        shown: ParsedAnnotation | None = parse_result(prediction.get("result"), config)
    except AnnotationError as exc:
        logger.warning("prediction %s: its result is not stored (%s)", raw, exc)
        shown = None
    return ParentPrediction(id=raw, model_version=version or None, shown=shown)


def user_id(completed_by: Any) -> int:
    """Label Studio's ``completed_by``: an integer user id, or an object with ``id``.

    Raises:
        AnnotationError: when there is no usable user id.
    """
    if isinstance(completed_by, Mapping):
        completed_by = completed_by.get("id")
    if isinstance(completed_by, bool) or not isinstance(completed_by, int):
        raise AnnotationError(f"completed_by must be a user id, got {completed_by!r}")
    return completed_by


def timestamp(value: Any) -> datetime | None:
    """An ISO 8601 time from Label Studio (``...Z`` or an offset) in UTC; None if absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
