"""The frozen study bundle: the same store gives the same bytes; verify names a changed file, answer or gold."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from backend import bundle
from backend.cli import main
from consensus.db import init_db
from consensus.repository import import_ratings
from consensus.repository.gold import import_gold
from consensus.service import run_consensus


@pytest.fixture
def store(tmp_path: Path, small_study: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(bundle, "N_BOOT", 50)  # the intervals' resamples: enough to test, quick
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    engine, sessions = init_db(url)
    with sessions.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
    with sessions.begin() as session:
        run_consensus(session)
    engine.dispose()
    return url


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_freezing_twice_gives_the_same_bytes_and_verify_agrees(store, tmp_path, capsys):
    assert main(["study", "freeze", "--out", str(tmp_path / "a"), "--db", store]) == 0
    assert main(["study", "freeze", "--out", str(tmp_path / "b"), "--db", store]) == 0
    first, second = files(tmp_path / "a"), files(tmp_path / "b")
    assert first == second
    expected = {"manifest.json", "methods.md", "report.html", "study.json", "gold.csv",
                "label_studio_import.json", "agreement_intervals.csv", "consensus/consensus.csv",
                "consensus/rater_reliability.csv", "regions/region_consensus.csv"}  # fmt: skip
    assert expected <= set(first)
    manifest = json.loads(first["manifest.json"])
    assert set(manifest["files"]) == set(first) - {"manifest.json"}
    assert manifest["run"]["id"] == 1 and manifest["gold"]["n"] == 0 and manifest["n_boot"] == 50
    methods = first["methods.md"].decode()
    assert "4 readers" in methods and "kappa" in methods and "held-out" in methods
    capsys.readouterr()
    assert main(["study", "verify", str(tmp_path / "a"), "--db", store]) == 0
    assert "verified" in capsys.readouterr().out
    # A second freeze into a folder that holds a bundle is refused, not mixed in.
    assert main(["study", "freeze", "--out", str(tmp_path / "a"), "--db", store]) == 2


def test_verify_names_a_changed_annotation_gold_label_or_file(store, tmp_path, small_study, capsys):
    out = tmp_path / "bundle"
    assert main(["study", "freeze", "--out", str(out), "--db", store]) == 0
    engine, sessions = init_db(store)
    ratings = pd.read_csv(small_study / "ratings.csv")
    one = ratings.iloc[0]
    reading = ratings[(ratings["image_id"] == one["image_id"]) & (ratings["rater"] == one["rater"])]
    changed = reading.copy()
    changed.loc[changed["label"] == "bcc", "value"] = 1 - changed.loc[changed["label"] == "bcc", "value"]
    with sessions.begin() as session:
        import_ratings(session, changed)  # one reader changes one diagnosis
    with sessions() as session:
        problems = bundle.verify(session, out)
    assert any("answers changed" in p for p in problems)
    assert any(p.startswith("consensus/") and "differently" in p for p in problems)

    with sessions.begin() as session:
        import_ratings(session, reading)  # changed back
    with sessions() as session:
        assert bundle.verify(session, out) == []
        image = str(ratings["image_id"].iloc[0])
    with sessions.begin() as session:
        import_gold(session, pd.DataFrame({"image_id": [image], "diagnosis": ["bcc"]}))
    with sessions() as session:
        assert "the store's gold labels changed since the freeze" in bundle.verify(session, out)
    engine.dispose()

    (out / "methods.md").write_text("edited", encoding="utf-8")
    (out / "extra.txt").write_text("x", encoding="utf-8")
    capsys.readouterr()
    assert main(["study", "verify", str(out), "--db", store]) == 1
    err = capsys.readouterr().err
    assert "methods.md: changed since the freeze" in err and "extra.txt: not in the manifest" in err
    assert main(["study", "verify", str(tmp_path), "--db", store]) == 1
