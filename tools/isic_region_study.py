"""ISIC 2018's real pigment-network masks as a one-rater region study, for the Grad-CAM agreement on real
images.

The released model's pigment-network head was trained on ISIC 2018 (Tasks 1-2) with its own validation
split (``model.common.data.split_sources``, seed 0: 519 images). This writes that split as a study folder
that ``dermassist consensus import-ratings --regions`` reads: ``ratings.csv`` (one rater, ``isic2018``:
``bcc`` 0 and ``pigment_network`` 0 / 1 per image) and the real masks as the rater's painted regions
(``regions/isic2018/<image_id>_pigment_network.png``). One rater's region is its own consensus, so the
agreement is the model's map against the ISIC annotators' mask::

    DATA=../shared/data/isic2018-attributes; D=runs/isic-regions; DB=sqlite:///$D/store.sqlite
    .venv/bin/python tools/isic_region_study.py $DATA $D/study
    dermassist consensus import-ratings $D/study/ratings.csv --regions --db $DB
    dermassist consensus run --db $DB
    dermassist consensus gradcam-agreement --db $DB --images $DATA --model models/dermnet-bcc.pt --out $D
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd

from model.common.data import load_table, split_sources

RATER = "isic2018"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the isic2018-attributes folder")
    parser.add_argument("out", type=Path, help="the study folder to write")
    parser.add_argument("--all", action="store_true", help="every image, not only the validation split")
    args = parser.parse_args()
    table = load_table(args.data)
    ids = table["image_id"].astype(str).tolist()
    if not args.all:
        _, val = split_sources(table)
        ids = table.iloc[val]["image_id"].astype(str).tolist()
    labels = pd.read_csv(args.data / "labels.csv", dtype={"image_id": str}).set_index("image_id").loc[ids]
    folder = args.out / "regions" / RATER
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, present in labels["pigment_network"].astype(int).items():
        rows += [(image_id, RATER, "bcc", 0), (image_id, RATER, "pigment_network", present)]
        if present:
            name = f"{image_id}_pigment_network.png"
            shutil.copy(args.data / "masks" / name, folder / name)
    pd.DataFrame(rows, columns=["image_id", "rater", "label", "value"]).to_csv(
        args.out / "ratings.csv", index=False
    )
    print(f"{len(ids)} images, {int(labels['pigment_network'].sum())} with pigment network -> {args.out}")


if __name__ == "__main__":
    main()
