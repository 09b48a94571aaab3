"""The repository's real sample (sample/ham10000): within bounds, whole, attributed, held out."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from PIL import Image

from tests.conftest import ROOT, shared_path

SAMPLE = ROOT / "sample" / "ham10000"


def test_the_sample_is_small_and_attributed():
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 3 * 1024 * 1024
    labels = pd.read_csv(SAMPLE / "labels.csv", dtype={"image_id": str})
    assert 0 < len(labels) <= 100 and labels["image_id"].is_unique and labels["lesion_id"].is_unique
    assert (labels["dx"] == "bcc").sum() >= 5, "the demo needs BCC cases"
    assert {p.name for p in (SAMPLE / "images").iterdir()} == {f"{i}.jpg" for i in labels["image_id"]}
    readme = (SAMPLE / "README.md").read_text()
    assert "CC BY-NC 4.0" in readme and "10.1038/sdata.2018.161" in readme and "Tschandl" in readme


def test_every_image_is_whole_with_a_mask_of_its_size():
    labels = pd.read_csv(SAMPLE / "labels.csv", dtype={"image_id": str})
    for row in labels.itertuples():
        path = SAMPLE / "images" / f"{row.image_id}.jpg"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row.file_sha256
        with Image.open(path) as image:
            image.load()
            assert image.size == (row.width, row.height)
        with Image.open(SAMPLE / "masks" / str(row.mask)) as mask:
            values = np.unique(np.asarray(mask.convert("L")))
            assert mask.size == (row.width, row.height) and set(values) <= {0, 255} and 255 in values


def test_the_sample_is_what_the_tool_selects_from_derm_dev(tmp_path):
    """Rebuilt from ../shared/data/derm-dev: the same images, all held out by both default splits."""
    from tools.make_sample import main

    source = shared_path("data", "derm-dev")
    assert main([str(source), str(tmp_path / "again")]) == 0
    committed = pd.read_csv(SAMPLE / "labels.csv", dtype={"image_id": str})
    rebuilt = pd.read_csv(tmp_path / "again" / "labels.csv", dtype={"image_id": str})
    pd.testing.assert_frame_equal(committed, rebuilt)
