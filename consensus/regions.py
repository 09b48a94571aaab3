r"""Region consensus: STAPLE per image over the raters' masks of one label, pooled rater reliability.

Two callers, one fusion (:func:`fuse_regions`):

- the lesion outline of a ``lesion.xml`` run (:func:`outline_consensuses`): every outline a rater drew
  of an image is one mask;
- the seven patterns' painted regions of a ``bcc.xml`` run (:func:`pattern_region_consensuses`): per
  image and pattern, one mask per rater, built from what that rater said and painted:

  ========================================  ===========================================================
  the rater ...                             counts as
  ========================================  ===========================================================
  painted the pattern (one or more          the union of the painted regions, whatever the pattern's
  regions with its label)                   choice says: painting is the rater pointing at it
  said the pattern is absent, painted       an **empty mask**: the rater looked and found nothing, which
  nothing                                   is evidence about every pixel (STAPLE lowers the consensus
                                            where raters who saw the image left it unmarked)
  said the pattern is present but painted   **no mask** (abstains for this image and pattern): the
  nothing, or did not answer it             rater located nothing, and an empty mask would count their
                                            "present" as "nowhere"
  ========================================  ===========================================================

  An image and pattern gets a consensus region only where at least one rater painted; one painted mask
  and no other is taken as it is. The image size is the painted masks' (they must agree).

  STAPLE estimates every rater's rates on each image anew, so one rater's stroke against the others'
  empty masks is weakly identified: EM may settle on the stroke (that rater's sensitivity near 1, the
  others' near 0; SimpleITK's filter does the same) and then needs many iterations (the demo study: 17
  of 393 images at the limit). The Dawid-Skene label of the pattern, stored beside the region, says
  whether the raters as a whole found it; :mod:`backend.training.gradcam_agreement` scores only regions
  of patterns the consensus says are present.

Per rater, sensitivity and specificity are pooled over the pixels of the images STAPLE ran on: with
:math:`W` the consensus pixel posterior of an image and :math:`p_j, q_j` STAPLE's rates for rater
:math:`j` there, the pooled sensitivity is :math:`\sum p_j \sum_i W_i / \sum \sum_i W_i` over images
(the expected true-positive pixels over the expected foreground pixels), specificity likewise with
:math:`1 - W`. No intervals: the pixels of an image are not independent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from consensus.repository import RegionConsensus
from consensus.repository.regions import region_digest
from consensus.staple import StapleResult, staple

logger = logging.getLogger(__name__)

#: Turns one stored region into a boolean mask, or None when it cannot be read. Label Studio's brush RLE
#: is the backend's knowledge: it hands its decoder in.
MaskDecoder = Callable[[Mapping[str, Any]], NDArray[np.bool_] | None]

#: The label key of a pattern's consensus region in a ``bcc.xml`` run (its mask, summary and reliability).
REGION_PREFIX = "region:"


def region_key(pattern: str) -> str:
    """The stored label key of a pattern's consensus region: ``region:<pattern>``."""
    return f"{REGION_PREFIX}{pattern}"


@dataclasses.dataclass(frozen=True)
class StapleParams:
    """STAPLE's settings for the regions (:func:`consensus.staple.staple`'s arguments)."""

    prior: float | None = None
    n_iter: int = 1000
    tol: float = 1e-7
    threshold: float = 0.5


@dataclasses.dataclass
class RegionSet:
    """The region consensus of every image for one label: what is stored and what a reference keeps.

    Attributes:
        masks: external id -> consensus mask.
        regions: the rows :func:`consensus.repository.save_consensus_run` stores.
        reliability: per rater, pixel-pooled over the images STAPLE ran on (rows ``label_key, worker,
            sensitivity, specificity, n_items``).
        convergence: images, STAPLE fits, whether all converged, the most iterations.
        skipped: masks or images left out, with why.
    """

    masks: dict[str, NDArray[np.bool_]]
    regions: list[RegionConsensus]
    reliability: pd.DataFrame
    convergence: dict[str, Any]
    skipped: list[str]


def _fuse(
    masks: list[NDArray[np.bool_]], params: StapleParams
) -> tuple[NDArray[np.bool_], NDArray[np.float64], StapleResult | None] | None:
    """The consensus mask of one image, its pixel posterior and STAPLE's fit (None where it did not run).

    None when there is no mask or the masks differ in size. One mask, or masks that leave STAPLE no
    foreground prior (all empty, or all full: then they are all equal), are taken as they are.
    """
    if not masks or len({m.shape for m in masks}) != 1:
        return None
    stacked = np.stack(masks)
    if len(masks) == 1 or not stacked.any() or stacked.all():
        return masks[0], masks[0].astype(np.float64), None
    result = staple(masks, **dataclasses.asdict(params))
    return result.mask, result.probability, result


def consensus_mask(masks: Sequence[NDArray[np.bool_]]) -> NDArray[np.bool_] | None:
    """STAPLE of two or more raters' masks of one image (same size); one mask as it is; None for none."""
    found = _fuse(list(masks), StapleParams())
    return None if found is None else found[0]


def _mean_posteriors(mask: NDArray[np.bool_], probability: NDArray[np.float64]) -> dict[str, float]:
    """Per class, the mean pixel posterior of that class over the pixels the consensus gives it."""
    out: dict[str, float] = {}
    if mask.any():
        out["1"] = float(probability[mask].mean())
    if not mask.all():
        out["0"] = float(1.0 - probability[~mask].mean())
    return out


def fuse_regions(
    rated: Mapping[str, Sequence[tuple[str, NDArray[np.bool_]]]],
    params: StapleParams,
    label: str,
    what: str = "region",
    noun: str = "mask",
) -> RegionSet:
    """STAPLE per image over the raters' masks, stored under ``label``.

    Args:
        rated: external id -> ``(rater, mask)`` in the estimator's order.
        params: STAPLE's settings.
        label: the label key of the stored masks, summaries and reliability rows.
        what: how a skip names the masks (``"lesion"``, ``"pigment_network region"``).
        noun: how the stored details name one rater's mask (``"single outline"``, ``"identical masks"``).
    """
    skipped: list[str] = []
    masks: dict[str, NDArray[np.bool_]] = {}
    regions: list[RegionConsensus] = []
    # rater -> expected true positives, foreground, true negatives, background (pixels), images
    pooled: dict[str, NDArray[np.float64]] = {}
    fits: list[StapleResult] = []
    for task, pairs in rated.items():
        consensus = _fuse([m for _, m in pairs], params)
        if consensus is None:
            skipped.append(f"{task}: the raters' {what} masks differ in size")
            continue
        mask, probability, result = consensus
        masks[task] = mask
        raters = [w for w, _ in pairs]
        details: dict[str, Any] = {"method": f"single {noun}" if len(pairs) == 1 else f"identical {noun}s"}
        if result is not None:
            fits.append(result)
            details = {"method": "STAPLE", "prior": result.prior, "n_iter": result.n_iter,
                       "converged": result.converged, "sensitivity": result.sensitivity.tolist(),
                       "specificity": result.specificity.tolist()}  # fmt: skip
            foreground, background = float(probability.sum()), float((1 - probability).sum())
            for rater, p, q in zip(raters, result.sensitivity, result.specificity, strict=True):
                pooled.setdefault(rater, np.zeros(5))
                pooled[rater] += (p * foreground, foreground, q * background, background, 1)
        summary = _mean_posteriors(mask, probability)
        regions.append(RegionConsensus(task, label, mask, summary, raters, details))
    reliability = pd.DataFrame(
        [
            {"label_key": label, "worker": rater, "sensitivity": tp / fg if fg else None,
             "specificity": tn / bg if bg else None, "n_items": int(n)}
            for rater, (tp, fg, tn, bg, n) in pooled.items()
        ]
    )  # fmt: skip
    convergence = {
        "n_images": len(regions),
        "n_staple": len(fits),
        "converged": all(f.converged for f in fits),
        "max_n_iter": max((f.n_iter for f in fits), default=0),
    }
    stalled = sum(not f.converged for f in fits)
    if stalled:
        logger.info("%s: STAPLE reached its iteration limit on %d of %d images", label, stalled, len(fits))
    return RegionSet(masks, regions, reliability, convergence, skipped)


def outline_consensuses(
    outlines: pd.DataFrame, decode: MaskDecoder, params: StapleParams, label: str
) -> RegionSet:
    """STAPLE per image over the decoded lesion outlines (rows ``task, worker, region``, in the store's
    order; each outline is one mask)."""
    skipped: list[str] = []
    rated: dict[str, list[tuple[str, NDArray[np.bool_]]]] = {}
    for task, worker, region in outlines[["task", "worker", "region"]].itertuples(index=False):
        mask = decode(region)
        if mask is None:
            skipped.append(f"{task}/{worker}: unreadable lesion region")
        else:
            rated.setdefault(task, []).append((worker, mask))
    found = fuse_regions(rated, params, label, "lesion", "outline")
    found.skipped[:0] = skipped
    return found


@dataclasses.dataclass
class PatternRegions:
    """The pattern regions of a ``bcc.xml`` run, one :class:`RegionSet` per pattern (stored under
    :func:`region_key`), and the digest of the stored regions they came from."""

    sets: dict[str, RegionSet]
    data_hash: str
    unread: list[str] = dataclasses.field(default_factory=list)

    @property
    def regions(self) -> list[RegionConsensus]:
        return [r for s in self.sets.values() for r in s.regions]

    @property
    def reliability(self) -> pd.DataFrame:
        frames = [s.reliability for s in self.sets.values() if len(s.reliability)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def convergence(self) -> dict[str, Any]:
        return {region_key(k): s.convergence for k, s in self.sets.items()}

    @property
    def skipped(self) -> list[str]:
        return [*self.unread, *(line for s in self.sets.values() for line in s.skipped)]


def rater_pattern_masks(
    table: pd.DataFrame, decode: MaskDecoder
) -> tuple[dict[tuple[str, str], list[tuple[str, NDArray[np.bool_] | None]]], list[str]]:
    """Each rater's mask per (image, pattern) from a
    :func:`consensus.repository.regions.pattern_region_answers` table.

    The union of what they painted, None (empty, size not yet known) where they said absent; raters who
    abstain (present but not painted, or every painted region unreadable) are left out. Only (image,
    pattern) pairs with at least one painted mask are kept.
    """
    skipped: list[str] = []
    out: dict[tuple[str, str], list[tuple[str, NDArray[np.bool_] | None]]] = {}
    for (task, key), group in table.groupby(["task", "label_key"], sort=True):
        per_rater: list[tuple[str, NDArray[np.bool_] | None]] = []
        painted_any = False
        for worker, rows in group.groupby("worker", sort=False):
            painted = [r for r in rows["region"] if r is not None]
            if painted:
                decoded = [decode(r) for r in painted]
                readable = [m for m in decoded if m is not None]
                if len(readable) < len(painted):
                    skipped.append(f"{task}/{worker}: unreadable {key} region")
                if not readable or len({m.shape for m in readable}) != 1:
                    if readable:
                        skipped.append(f"{task}/{worker}: {key} regions of different sizes")
                    continue
                per_rater.append((str(worker), np.logical_or.reduce(readable)))
                painted_any = True
            elif (rows["value"] == 0).any():
                per_rater.append((str(worker), None))
        if painted_any:
            out[(str(task), str(key))] = per_rater
    return out, skipped


def pattern_region_consensuses(
    table: pd.DataFrame, decode: MaskDecoder, params: StapleParams, label_keys: Sequence[str]
) -> PatternRegions:
    """Per image and pattern, STAPLE over the raters' masks (see the module docstring for who counts how).

    Args:
        table: :func:`consensus.repository.regions.pattern_region_answers`'s table.
        decode: a stored region -> boolean mask, or None when it cannot be read.
        params: STAPLE's settings.
        label_keys: the patterns, in the order the sets are kept.
    """
    by_pair, skipped = rater_pattern_masks(table, decode)
    rated: dict[str, dict[str, list[tuple[str, NDArray[np.bool_]]]]] = {k: {} for k in label_keys}
    for (task, key), pairs in by_pair.items():
        if key not in rated:
            continue
        shapes = {m.shape for _, m in pairs if m is not None}
        if len(shapes) != 1:
            skipped.append(f"{task}: the raters' {key} region masks differ in size")
            continue
        (shape,) = shapes
        rated[key][task] = [(w, m if m is not None else np.zeros(shape, bool)) for w, m in pairs]
    sets = {
        key: fuse_regions(tasks, params, region_key(key), f"{key} region") for key, tasks in rated.items()
    }
    digest_rows = sorted(
        f"{t}\t{w}\t{k}\t{v}\t{region_digest(r) if r is not None else ''}"
        for t, w, k, v, r in table.itertuples(index=False)
    )
    data_hash = hashlib.sha256("\n".join(digest_rows).encode()).hexdigest()
    return PatternRegions({k: s for k, s in sets.items() if s.regions or s.skipped}, data_hash, skipped)
