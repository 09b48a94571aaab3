"""Datasets in the derm-dev layout (real HAM10000 or synthetic), and lesion-grouped splits.

The layout::

    images/<image_id>.jpg|.png
    masks/<image_id>_segmentation.png      lesion mask (0 / 255), optional
    masks/<image_id>_<pattern>.png         pattern masks, optional (synthetic only)
    labels.csv                             one row per image

``labels.csv`` needs ``image_id`` and the diagnosis: a ``bcc`` column (0/1), or else a ``dx`` (HAM10000
codes, ``bcc`` for basal cell carcinoma) or ``diagnosis`` (words, as the ISIC Archive writes them) column
it is derived from. ``lesion_id`` (several images may show one lesion; default: one lesion per image),
``dx``, ``age``, ``sex``, ``localization`` and the seven pattern columns (0/1, empty where unknown) are used
where present. Unknown targets are masked out of the loss per image and per output: real HAM10000 has no
pattern labels and trains the BCC head only; ISIC 2018's attribute set has pigment network (and no BCC)
and trains the pigment-network head and, with its masks, that head's map.

Several folders can train one model (:func:`load_tables`); each keeps its own lesion-grouped split
(:func:`split_sources`), so a folder's validation rows are the same whether it trains alone or with others.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import Dataset

from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS, TARGETS

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
REQUIRED_COLUMNS = ("image_id",)
# the words the ISIC Archive uses for basal cell carcinoma in its ``diagnosis`` field
BCC_WORDS = ("basal cell carcinoma",)
SYNTHETIC_GENERATOR = "dermassist.model.synthetic"  # what model.synthetic writes into study.json


class DataError(ValueError):
    """A dataset folder or table that cannot be read as the derm-dev layout."""


def _image_path(images: Path, image_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = images / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def load_table(root: str | Path) -> pd.DataFrame:
    """Read ``labels.csv`` of a dataset folder and resolve its files.

    Args:
        root: the dataset folder.

    Returns:
        One row per image with ``image_id``, ``lesion_id``, ``bcc``, the seven pattern columns
        (NaN where unknown), ``has_patterns`` (bool), ``image_path``, ``mask_path`` (None when absent)
        and the metadata columns the table had.

    Raises:
        DataError: the folder, the table, a required column or an image is missing, a label is
            not 0/1, or an image id is duplicated. The message names the offending rows.
    """
    root = Path(root)
    table = root / LABELS_FILE
    if not table.is_file():
        raise DataError(f"{table} not found: a dataset folder needs labels.csv, images/ and masks/")
    try:
        df = pd.read_csv(table, dtype={"image_id": str, "lesion_id": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{table} is not a readable CSV: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{table} lacks the column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise DataError(f"{table} has no rows")
    if DIAGNOSIS_KEY not in df.columns:
        df = df.copy()
        if "dx" in df.columns:
            df[DIAGNOSIS_KEY] = (df["dx"].astype(str).str.strip().str.lower() == "bcc").astype(int)
        elif "diagnosis" in df.columns:
            words = df["diagnosis"].astype(str).str.strip().str.lower()
            df[DIAGNOSIS_KEY] = words.isin(BCC_WORDS).astype(int)
        else:
            raise DataError(
                f"{table} needs the diagnosis: a column {DIAGNOSIS_KEY!r} (0/1), or 'dx' or 'diagnosis' "
                f"to derive it from; it has {list(df.columns)}"
            )
    duplicated = df["image_id"][df["image_id"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{table} lists these image ids more than once: {duplicated[:5]}")
    bad = df.loc[~df[DIAGNOSIS_KEY].isin([0, 1]), "image_id"].tolist()
    if bad:
        raise DataError(f"{table}: column {DIAGNOSIS_KEY!r} must be 0 or 1; not so for {bad[:5]}")

    df = df.copy()
    if "lesion_id" not in df.columns:
        df["lesion_id"] = df["image_id"]
    df["lesion_id"] = df["lesion_id"].fillna(df["image_id"])
    present = [k for k in PATTERN_KEYS if k in df.columns]
    for key in PATTERN_KEYS:
        if key not in df.columns:
            df[key] = np.nan
    patterns = df[list(PATTERN_KEYS)]
    df["has_patterns"] = patterns.notna().all(axis=1) if present else False
    bad_patterns = df.loc[(patterns.notna() & ~patterns.isin([0, 1])).any(axis=1), "image_id"]
    if len(bad_patterns):
        raise DataError(
            f"{table}: pattern columns must be 0, 1 or empty; not so for {bad_patterns.tolist()[:5]}"
        )
    df["source"] = root.resolve().name
    df["synthetic"] = is_synthetic(root)

    images, masks = root / "images", root / "masks"
    paths = [_image_path(images, i) for i in df["image_id"]]
    lost = [i for i, p in zip(df["image_id"], paths, strict=True) if p is None]
    if lost:
        raise DataError(f"{len(lost)} image(s) of {table} not found in {images}: {lost[:5]}")
    df["image_path"] = [str(p) for p in paths]
    mask_names = df["mask"] if "mask" in df.columns else df["image_id"] + "_segmentation.png"
    df["mask_path"] = [
        str(masks / str(name)) if isinstance(name, str) and (masks / name).is_file() else None
        for name in mask_names
    ]
    return df


def is_synthetic(root: str | Path) -> bool:
    """Whether a dataset folder is a study drawn by :mod:`model.synthetic` (its ``study.json`` says so)."""
    study = Path(root) / "study.json"
    if not study.is_file():
        return False
    try:
        return bool(json.loads(study.read_text(encoding="utf-8")).get("generator") == SYNTHETIC_GENERATOR)
    except (ValueError, OSError, AttributeError):
        return False


def load_tables(roots: Sequence[str | Path]) -> pd.DataFrame:
    """:func:`load_table` of several folders, one table (``source`` tells the folders apart).

    Raises:
        DataError: as :func:`load_table`, no folder, or an image id in two folders.
    """
    if not roots:
        raise DataError("give at least one dataset folder")
    tables = [load_table(root) for root in roots]
    if len(tables) == 1:
        return tables[0]
    sources = [t["source"].iat[0] for t in tables]
    if len(set(sources)) < len(sources):
        raise DataError(f"dataset folders need distinct names; got {sources}")
    df = pd.concat(tables, ignore_index=True)
    twice = df["image_id"][df["image_id"].duplicated()].tolist()
    if twice:
        raise DataError(f"these image ids are in more than one folder: {twice[:5]}")
    df["lesion_id"] = df["source"] + ":" + df["lesion_id"].astype(str)
    return df


def split_sources(
    df: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, stratify: str = DIAGNOSIS_KEY
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """:func:`split_by_lesion` within each source folder, so a folder's split does not depend on the others.

    Each folder is stratified by ``stratify`` where both its classes have at least one image per fold there
    (derm-dev: BCC), else by the first pattern column that has (ISIC 2018's attributes: pigment network),
    else by ``stratify`` as it is.
    A folder whose ``stratify`` column has both classes gets exactly ``split_by_lesion(df, val_fraction,
    seed, stratify)``, so earlier runs' splits stay as they were.
    """
    trains, vals = [], []
    sources = df["source"].to_numpy() if "source" in df.columns else np.zeros(len(df), dtype=object)
    for source in sorted(set(sources)):
        rows = np.flatnonzero(sources == source)
        local = df.iloc[rows].reset_index(drop=True)
        folds = max(2, round(1.0 / val_fraction))

        def usable(c: str, local: pd.DataFrame = local, folds: int = folds) -> bool:
            counts = local[c].dropna().value_counts() if c in local else pd.Series(dtype=int)
            return len(counts) > 1 and int(counts.min()) >= folds

        column = next((c for c in (stratify, *PATTERN_KEYS) if usable(c)), None)
        if column is None and stratify in local:
            column = stratify  # as split_by_lesion always did, even with one class
        if column is None:
            local = local.assign(_all="all")
            column = "_all"
        else:
            local = local.assign(**{column: local[column].fillna(-1)})
        train, val = split_by_lesion(local, val_fraction, seed, column)
        trains.append(rows[train])
        vals.append(rows[val])
    return np.sort(np.concatenate(trains)).astype(np.int64), np.sort(np.concatenate(vals)).astype(np.int64)


def split_by_lesion(
    df: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, stratify: str = DIAGNOSIS_KEY
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split rows into train and validation so that no lesion is on both sides, stratified by a label.

    Args:
        df: a table from :func:`load_table` (needs ``lesion_id`` and the ``stratify`` column).
        val_fraction: share of rows for validation, in (0, 0.5].
        seed: random seed (the same seed gives the same split).
        stratify: a 0/1 or categorical column whose proportions both sides keep.

    Returns:
        Row positions (``np.ndarray`` of int) of the training and the validation rows.

    Raises:
        ValueError: for a fraction outside (0, 0.5] or fewer lesions than folds.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    n_splits = max(2, round(1.0 / val_fraction))
    groups = df["lesion_id"].to_numpy()
    if len(np.unique(groups)) < n_splits:
        raise ValueError(
            f"{len(np.unique(groups))} lesions cannot be split {n_splits} ways; "
            f"use more data or a larger val_fraction"
        )
    y = df[stratify].astype(str).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(df)), y, groups))
    return np.sort(train).astype(np.int64), np.sort(val).astype(np.int64)


def table_hash(df: pd.DataFrame) -> str:
    """A short content hash of the rows a model trains on (ids and targets), for checkpoints."""
    cols = ["image_id", *TARGETS]
    payload = df[cols].to_csv(index=False, lineterminator="\n").encode()
    return hashlib.sha256(payload).hexdigest()[:16]


class DermDataset(Dataset[dict[str, Any]]):
    """Images with their targets in ``TARGETS`` order (diagnosis, then the seven patterns).

    Targets are probabilities, so consensus posteriors can serve as soft labels: pass a
    ``targets`` frame (index ``image_id``, columns a subset of ``TARGETS``) to override the table's.
    Unknown targets (NaN) get ``target_mask`` 0 and do not contribute to the loss.

    Args:
        df: rows from :func:`load_table`.
        transform: called on the ``(3, H, W)`` float tensor (e.g. torchvision.transforms.v2).
        targets: optional soft targets overriding the table's.
        with_mask: also return the lesion mask (``(1, H, W)`` float; zeros when absent).
        with_regions: also return ``regions`` (``(K, H, W)``, aligned with ``TARGETS``: the lesion
            mask for the diagnosis, each pattern's mask ``masks/<id>_<pattern>.png`` for the patterns)
            and ``region_known`` (``(K,)``: 1 where that mask exists). Geometric transforms move them
            with the image.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        transform: Callable[..., Any] | None = None,
        targets: pd.DataFrame | None = None,
        with_mask: bool = False,
        with_regions: bool = False,
    ) -> None:
        self.df = df.reset_index(drop=True)
        values = self.df[list(TARGETS)].astype(float).copy()
        if targets is not None:
            unknown = set(targets.columns) - set(TARGETS)
            if unknown:
                raise ValueError(
                    f"unknown target columns {sorted(unknown)}; expected some of {list(TARGETS)}"
                )
            aligned = targets.reindex(self.df["image_id"])
            for col in targets.columns:
                values[col] = aligned[col].to_numpy(dtype=float)
        arr = values.to_numpy(dtype=np.float32)
        known = arr[~np.isnan(arr)]
        if known.size and (known.min() < 0.0 or known.max() > 1.0):
            raise ValueError("targets must be probabilities in [0, 1]")
        self.target_mask = torch.from_numpy((~np.isnan(arr)).astype(np.float32))
        self.targets = torch.from_numpy(np.nan_to_num(arr, nan=0.0))
        self.transform = transform
        self.with_mask = with_mask
        self.with_regions = with_regions

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.df.iloc[index]
        with Image.open(row["image_path"]) as img:
            array = np.array(img.convert("RGB"), dtype=np.uint8)
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        item: dict[str, Any] = {
            "image_id": row["image_id"],
            "target": self.targets[index],
            "target_mask": self.target_mask[index],
        }
        size = tuple(image.shape[1:])
        lesion = _read_mask(row["mask_path"], size)
        masks: list[torch.Tensor] = []
        if self.with_mask:
            masks.append(lesion if lesion is not None else torch.zeros(1, *size))
        if self.with_regions:
            folder = Path(row["image_path"]).parent.parent / "masks"
            regions = [lesion] + [
                _read_mask(folder / f"{row['image_id']}_{key}.png", size) for key in PATTERN_KEYS
            ]
            item["region_known"] = torch.tensor([float(r is not None) for r in regions])
            masks.extend(r if r is not None else torch.zeros(1, *size) for r in regions)
        stacked = torch.cat(masks) if masks else None
        if self.transform is not None:
            if stacked is not None:
                from torchvision import tv_tensors

                image, moved = self.transform(tv_tensors.Image(image), tv_tensors.Mask(stacked))
                stacked = moved.as_subclass(torch.Tensor)
                image = image.as_subclass(torch.Tensor)
            else:
                image = self.transform(image)
        if stacked is not None:
            if self.with_mask:
                item["mask"], stacked = stacked[:1], stacked[1:]
            if self.with_regions:
                item["regions"] = stacked
        item["image"] = image
        return item


def read_binary_mask(path: str | Path, shape: tuple[int, int] | None = None) -> NDArray[np.bool_]:
    """A mask file as a boolean array (grey level above 127 is inside), resized to ``shape`` = (H, W)
    by nearest neighbour when given and different."""
    with Image.open(path) as img:
        mask: NDArray[np.bool_] = np.asarray(img.convert("L")) > 127
    if shape is not None and mask.shape != shape:
        mask = np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    return mask


def _read_mask(path: str | Path | None, size: tuple[int, ...]) -> torch.Tensor | None:
    """A binary mask as a ``(1, H, W)`` float tensor, or None when there is no such file.

    Raises:
        DataError: a mask whose size differs from its image's.
    """
    if not path or not Path(path).is_file():
        return None
    with Image.open(path) as m:
        array = (np.array(m.convert("L")) > 127).astype(np.float32)
    if array.shape != size:
        raise DataError(f"mask {path} is {array.shape[1]}x{array.shape[0]}, its image {size[1]}x{size[0]}")
    return torch.from_numpy(array)[None]
