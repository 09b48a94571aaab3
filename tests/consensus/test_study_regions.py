"""The study export with pattern regions: region tables instead of region columns, the report's Regions
section (with a Grad-CAM agreement table when given), and the readers' pages with thumbnails."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from consensus.db import init_db
from consensus.export import build_study, to_json, write_csv, write_report
from consensus.export.raters import Overlay, page_name, thumbnail, write_rater_pages
from consensus.models import Source
from consensus.repository import get_or_create_item, get_or_create_rater, upsert_annotation
from consensus.service import run_consensus

SIZE = (40, 48)
PN = "pigment_network"


def decode(region):
    """The test's stand-in for Label Studio's RLE: the mask is stored as nested lists."""
    return np.asarray(region["mask"], dtype=bool) if "mask" in region else None


def blob(top: int, left: int, h: int = 12, w: int = 14) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[top : top + h, left : left + w] = True
    return mask


def painted(mask: np.ndarray) -> dict:
    return {"label": PN, "mask": mask.astype(int).tolist()}


# Three readers paint pigment network on i1..i4; r4 says it is absent on i1 (against the consensus) and
# paints a stray one on i5, where everyone else says absent.
STUDY: dict[str, dict[str, tuple[int, list[dict]]]] = {
    **{f"i{n}": {r: (1, [painted(blob(5 + n, 5))]) for r in ("r1", "r2", "r3", "r4")} for n in (2, 3, 4)},
    "i1": {"r1": (1, [painted(blob(5, 5))]), "r2": (1, [painted(blob(6, 5))]), "r3": (1, [painted(blob(5, 7))]),
           "r4": (0, [])},
    "i5": {"r1": (0, []), "r2": (0, []), "r3": (0, []), "r4": (1, [painted(blob(20, 30, 8, 8))])},
    "i6": {r: (0, []) for r in ("r1", "r2", "r3", "r4")},
}  # fmt: skip


@pytest.fixture
def db(tmp_path) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(f"sqlite:///{tmp_path / 'regions.sqlite'}")
    with factory.begin() as session:
        raters = {}
        for image, by_rater in STUDY.items():
            item = get_or_create_item(session, image)
            for name, (value, regions) in by_rater.items():
                raters.setdefault(name, get_or_create_rater(session, name=name))
                upsert_annotation(
                    session, item, raters[name], {"bcc": 0, PN: value}, Source.WEBHOOK, None, regions
                )
    with factory.begin() as session:
        run_consensus(session, decode=decode)
    yield factory
    engine.dispose()


@pytest.fixture
def images(tmp_path) -> dict[str, str]:
    """i1 and i5 as image files on disk, i2 as a Label Studio URL (not readable here)."""
    out = {}
    for image in ("i1", "i5"):
        path = tmp_path / f"{image}.png"
        Image.fromarray(np.full((*SIZE, 3), 120, np.uint8)).save(path)
        out[image] = str(path)
    return {**out, "i2": "http://localhost:8080/data/upload/1/i2.png"}


def test_regions_leave_the_consensus_columns_for_their_own_tables(db, tmp_path):
    with db() as session:
        study = build_study(session)
    assert not [c for c in study.consensus.columns if c.startswith("region:")]
    assert not study.reliability["label_key"].str.startswith("region:").any()
    assert set(study.regions["pattern"]) == {PN}
    assert set(study.regions["image_id"]) >= {"i1", "i2", "i3", "i4"}
    assert set(study.region_reliability["rater"]) == {"r1", "r2", "r3", "r4"}
    written = {p.name for p in write_csv(study, tmp_path / "csv")}
    assert {"region_consensus.csv", "region_reliability.csv"} <= written
    assert list(pd.read_csv(tmp_path / "csv" / "region_consensus.csv")["pattern"].unique()) == [PN]
    assert "region:" not in (tmp_path / "csv" / "consensus.csv").read_text()
    doc = json.loads(json.dumps(to_json(study)))
    assert {r["pattern"] for r in doc["regions"]} == {PN} and len(doc["region_reliability"]) == 4


def test_the_report_has_a_regions_section_and_the_gradcam_table(db, tmp_path):
    gradcam = pd.DataFrame([{
        "model_version": "dermnet-abc", "pattern": PN, "n_images": 4,
        "energy_inside": 0.61, "energy_inside_low": 0.52, "energy_inside_high": 0.7,
        "pointing": 0.75, "pointing_low": 0.25, "pointing_high": 1.0,
        "iou": 0.31, "iou_low": 0.2, "iou_high": 0.42, "area": 0.09, "area_low": 0.08, "area_high": 0.1,
        "resampled": "lesions", "n_groups": 3,
    }])  # fmt: skip
    with db() as session:
        study = build_study(session)
    html = write_report(study, tmp_path / "report.html", gradcam=gradcam).read_text()
    regions = html[html.index('<h2 id="regions">') :]
    assert "This run has no region consensus" not in regions
    assert "<td>pigment_network</td>" in regions and "region sensitivity" in regions
    assert "0.610 [0.520, 0.700]" in regions and "0.090 [0.080, 0.100]" in regions  # energy beside chance
    assert "0.310 [0.200, 0.420]" in regions and "dermnet-abc" in regions and "<td>lesions</td>" in regions
    assert (
        "regions of patterns the consensus says are present; IoU at ≥ 0.5 of the map&#39;s maximum" in regions
    )
    plain = write_report(study, tmp_path / "plain.html").read_text()
    assert "Grad-CAM against" not in plain


def test_each_reader_gets_a_page_with_the_images_they_disagreed_on(db, tmp_path, images):
    with db() as session:
        study = build_study(session, decode=decode)
    mine = study.disagreements[study.disagreements["rater"] == "r4"]
    assert set(zip(mine["image_id"], mine["label_key"], mine["rater_value"], mine["consensus"], strict=True)) >= {
        ("i1", PN, "0", "1"), ("i5", PN, "1", "0")
    }  # fmt: skip
    assert "r4" in study.overlays[("i5", PN)].raters  # their stray stroke, at thumbnail size
    assert study.overlays[("i1", PN)].consensus is not None and "r4" not in study.overlays[("i1", PN)].raters
    report = write_report(study, tmp_path / "report.html", images=images).read_text()
    pages = sorted((tmp_path / "raters").iterdir())
    assert [p.name for p in pages] == sorted(page_name(r) for r in ("r1", "r2", "r3", "r4"))
    assert f'href="raters/{page_name("r4")}"' in report
    page = (tmp_path / "raters" / page_name("r4")).read_text()
    assert "Feedback for r4" in page and "<b>i1</b>" in page and "<b>i5</b>" in page
    shots = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="(\w+)"', page)
    assert {alt for _, alt in shots} == {"i1", "i5"}  # readable files only; i6 etc. are named without
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode({a: s for s, a in shots}["i5"]))))
    inside, outside = picture[24, 34], picture[2, 2]
    assert inside[0] > 150 and inside[1] < 100 and tuple(outside) == (120, 120, 120)  # r4's stroke in magenta
    assert "consensus" in page and "reference" in page
    # The same store and images give the same bytes.
    again = tmp_path / "again"
    write_report(study, again / "report.html", images=images)
    assert (again / "report.html").read_text() == report
    assert [p.read_bytes() for p in sorted((again / "raters").iterdir())] == [p.read_bytes() for p in pages]


def test_thumbnails_never_fail_and_page_names_are_safe(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for image in (None, "", "http://ls/data/upload/x.png", tmp_path / "missing.png", broken, tmp_path):
        assert thumbnail(image, Overlay()) is None
    big = tmp_path / "big.jpg"
    Image.fromarray(np.zeros((300, 600, 3), np.uint8)).save(big)
    small = Image.open(io.BytesIO(base64.b64decode(thumbnail(big) or "")))
    assert small.size == (96, 48)
    names = ["../../etc/passwd", "ana@example.org", "Ana Ruiz", "ana ruiz", "", "Ωμέγα", "a" * 300]
    files = [page_name(n) for n in names]
    assert len(set(files)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9-]{1,60}\.html", f) for f in files)
    assert files[0].startswith("etc-passwd-") and files[1].startswith("ana-example-org-")


def test_pages_without_readers_write_nothing(tmp_path):
    from consensus.export import Study

    empty = Study(run={}, consensus=pd.DataFrame(), ratings=pd.DataFrame(), reliability=pd.DataFrame(),
                  agreement=pd.DataFrame(), pairwise=pd.DataFrame(), vs_consensus=pd.DataFrame())  # fmt: skip
    assert write_rater_pages(empty, Path(tmp_path / "raters")) == []


def test_dermassist_export_report_takes_the_gradcam_csv(db, tmp_path, capsys):
    from backend.cli import main

    url = f"sqlite:///{tmp_path / 'regions.sqlite'}"
    gradcam = tmp_path / "gradcam.csv"
    pd.DataFrame([{"model_version": "dermnet-cli", "pattern": PN, "n_images": 4, "energy_inside": 0.5,
                   "energy_inside_low": 0.4, "energy_inside_high": 0.6}]).to_csv(gradcam, index=False)  # fmt: skip
    out = tmp_path / "cli" / "report.html"
    assert (
        main(["export", "--format", "report", "--out", str(out), "--gradcam", str(gradcam), "--db", url]) == 0
    )
    html = out.read_text()
    assert "dermnet-cli" in html and "0.500 [0.400, 0.600]" in html
    assert "a page per reader" in capsys.readouterr().out
    # The pages are beside the report (this store's regions are not Label Studio RLE: no own regions shown).
    page = (out.parent / "raters" / page_name("r4")).read_text()
    assert "<b>i5</b>" in page and "you painted it" not in page
