"""Build the repository's small real sample from derm-dev (HAM10000): ``sample/ham10000/``.

The sample is what the demo and the tests can show of real dermoscopy without ``../shared``. It holds
images at their stored size with their lesion masks and labels, unchanged (the SHA-256 of every file
equals derm-dev's), and the attribution / licence beside them (HAM10000 is CC BY-NC 4.0).

Selection, deterministic: only lesions in the validation split of *both* default lesion-grouped
splits (``model.common.data.split_by_lesion`` with val_fraction 0.2, seed 0, stratified by ``bcc`` as
DermNet's training and by ``dx`` as the second system's), so a model trained with the default splits
has never seen a sample image; one image per lesion (the first by image id); per diagnosis up to
``QUOTA`` images, the lesions taken in the order of a seeded shuffle.

    .venv/bin/python tools/make_sample.py ../shared/data/derm-dev sample/ham10000
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from model.common.data import load_table, split_by_lesion

#: Most lesions per diagnosis; every held-out lesion of the rarer ones (bcc 8, mel 10, bkl 13,
#: akiec 2, vasc 1; no df lesion is held out by both splits) and 30 of the 98 naevi.
QUOTA = {"bcc": 20, "mel": 20, "bkl": 20, "nv": 30, "akiec": 20, "vasc": 20, "df": 20}
COLUMNS = [
    "image_id",
    "dx",
    "bcc",
    "age",
    "sex",
    "localization",
    "mask",
    "lesion_id",
    "dx_type",
    "width",
    "height",
]
SEED = 13


def select(table: pd.DataFrame) -> pd.DataFrame:
    """The sample's rows (see the module docstring)."""
    _, val_bcc = split_by_lesion(table, 0.2, 0, stratify="bcc")
    _, val_dx = split_by_lesion(table, 0.2, 0, stratify="dx")
    held = set(table.iloc[val_bcc]["image_id"]) & set(table.iloc[val_dx]["image_id"])
    rows = table[table["image_id"].isin(held)].sort_values("image_id")
    rows = rows.drop_duplicates("lesion_id", keep="first")
    rng = np.random.default_rng(SEED)
    chosen = []
    for dx, quota in QUOTA.items():
        group = rows[rows["dx"] == dx]
        order = rng.permutation(len(group))[:quota]
        chosen.append(group.iloc[sorted(order)])
    return pd.concat(chosen).sort_values("image_id").reset_index(drop=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="derm-dev (labels.csv, images/, masks/)")
    parser.add_argument("out", type=Path, help="the sample folder to (re)write")
    args = parser.parse_args(argv)
    table = load_table(args.source)
    full = pd.read_csv(args.source / "labels.csv", dtype={"image_id": str})
    rows = select(table)
    sample = full.set_index("image_id").loc[rows["image_id"]].reset_index()
    for sub in ("images", "masks"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
        (args.out / sub).mkdir(parents=True)
    for row in sample.itertuples():
        image = args.source / "images" / f"{row.image_id}.jpg"
        if _sha256(image) != row.file_sha256:
            sys.exit(f"{image} does not match derm-dev's recorded SHA-256")
        shutil.copyfile(image, args.out / "images" / image.name)
        shutil.copyfile(args.source / "masks" / str(row.mask), args.out / "masks" / str(row.mask))
    sample[[*COLUMNS, "file_sha256"]].to_csv(args.out / "labels.csv", index=False)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    counts = ", ".join(f"{k} {v}" for k, v in sample["dx"].value_counts().items())
    print(f"{len(sample)} images ({counts}); {size / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
