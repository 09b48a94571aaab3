"""Gold labels in the store (histopathology files, adjudications) and in the consensus run, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from consensus.db import init_db
from consensus.models import GoldLabel, Item
from consensus.repository import get_or_create_item
from consensus.repository.gold import (
    delete_gold,
    diagnosis_labels,
    gold_counts,
    gold_table,
    import_gold,
    upsert_gold,
)


@pytest.fixture
def db(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(store_url)
    yield factory
    engine.dispose()


HISTOLOGY = pd.DataFrame(
    {
        "image_id": ["img1", "img2", "img3", "img3"],
        "diagnosis": ["Basal cell carcinoma", "mel", "seborrheic keratosis", "seborrheic keratosis"],
        "date": ["2026-10-02", "2026-10-03", None, None],
    }
)


@pytest.mark.parametrize(
    ("diagnosis", "expected"),
    [
        ("BCC", {"bcc": "1", "ham_diagnosis": "bcc"}),
        ("  basal-cell carcinoma ", {"bcc": "1", "ham_diagnosis": "bcc"}),
        ("Melanocytic nevus", {"bcc": "0", "ham_diagnosis": "nv"}),
        ("lentigo maligna", {"bcc": "0"}),
    ],
)
def test_a_diagnosis_gives_the_bcc_target_and_the_ham_class_where_known(diagnosis, expected):
    assert diagnosis_labels(diagnosis) == expected


def test_histopathology_import_is_idempotent_and_kept_with_provenance(db):
    with db.begin() as session:
        summary = import_gold(session, HISTOLOGY, reference="pathology.csv")
    assert (summary.images, summary.new_items, summary.labels, summary.unchanged) == (3, 3, 5, 0)
    with db.begin() as session:
        again = import_gold(session, HISTOLOGY, reference="pathology.csv")
        assert (again.labels, again.unchanged) == (0, 5)
        assert session.scalar(select(func.count()).select_from(GoldLabel)) == 5
        table, conflicts = gold_table(session)
    assert conflicts == 0
    row = table[(table["task"] == "img1") & (table["label_key"] == "bcc")].iloc[0]
    assert (row["value"], row["source"], row["reference"], row["observed_on"]) == (
        1,
        "histopathology",
        "pathology.csv",
        "2026-10-02",
    )
    assert table[(table["task"] == "img2") & (table["label_key"] == "ham_diagnosis")]["value"].item() == "mel"
    assert gold_counts(table) == {"bcc": {"histopathology": 3}, "ham_diagnosis": {"histopathology": 2}}


def test_histopathology_wins_over_adjudication_and_conflicts_are_counted(db):
    with db.begin() as session:
        item = get_or_create_item(session, "img9")
        upsert_gold(session, item, "bcc", "0", "adjudication", reference="senior derm", ls_annotation_id=77)
        upsert_gold(session, item, "ulceration", "1", "adjudication", ls_annotation_id=77)
        import_gold(session, pd.DataFrame({"image_id": ["img9"], "diagnosis": ["bcc"]}))
    with db.begin() as session:
        table, conflicts = gold_table(session, ["bcc", "ulceration"])
    assert conflicts == 1
    by_key = table.set_index("label_key")
    assert by_key.loc["bcc", "value"] == 1 and by_key.loc["bcc", "source"] == "histopathology"
    assert by_key.loc["ulceration", "source"] == "adjudication"


def test_a_deleted_adjudication_leaves_the_gold_and_comes_back_when_resent(db):
    with db.begin() as session:
        item = get_or_create_item(session, "img5")
        assert upsert_gold(session, item, "bcc", "1", "adjudication", ls_annotation_id=5)
        assert not upsert_gold(session, item, "bcc", "1", "adjudication", ls_annotation_id=5)
        assert delete_gold(session, [5]) == 1
        assert delete_gold(session, [5]) == 0
        assert gold_table(session)[0].empty
        assert upsert_gold(session, item, "bcc", "1", "adjudication", ls_annotation_id=5)
        assert len(gold_table(session)[0]) == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pd.DataFrame({"image": ["a"], "diagnosis": ["bcc"]}), "lacks the column"),
        (pd.DataFrame({"image_id": [], "diagnosis": []}), "no rows"),
        (pd.DataFrame({"image_id": ["a", None], "diagnosis": ["bcc", "mel"]}), "no image_id"),
        (pd.DataFrame({"image_id": ["a", "b"], "diagnosis": ["bcc", " "]}), "no diagnosis"),
        (pd.DataFrame({"image_id": ["a", "a"], "diagnosis": ["bcc", "mel"]}), "two different diagnoses"),
        (pd.DataFrame({"image_id": ["a"], "diagnosis": ["bcc"], "source": ["x" * 40]}), "at most 32"),
    ],
)
def test_a_bad_gold_file_is_refused_whole_with_a_clear_error(db, table, message):
    with db.begin() as session, pytest.raises(ValueError, match=message):
        import_gold(session, table)
    with db.begin() as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 0
