"""The SQL store, on SQLite always and on PostgreSQL when one is reachable: idempotent, nothing lost."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from consensus.db import init_db, make_engine, upgrade
from consensus.models import (
    Annotation,
    AnnotationEvent,
    ConsensusLabel,
    Item,
    Rater,
    RaterReliability,
    Source,
)
from consensus.repository import (
    answers,
    consensus_table,
    get_or_create_item,
    get_or_create_rater,
    import_ratings,
    latest_run,
    save_consensus_run,
    soft_delete_annotations,
    upsert_annotation,
    validate_ratings,
)


@pytest.fixture
def db(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(store_url)
    yield factory
    engine.dispose()


def counts(session: Session) -> dict[str, int]:
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model))
        for model in (Item, Rater, Annotation, AnnotationEvent, ConsensusLabel)
    }


def test_migrations_create_every_table_and_are_idempotent(db):
    engine = db.kw["bind"]
    upgrade(engine)  # a second upgrade is a no-op
    tables = set(inspect(engine).get_table_names())
    assert {"raters", "items", "annotation_events", "annotations", "consensus_runs", "consensus_labels",
            "rater_reliability", "model_versions", "training_jobs", "alembic_version"} <= tables  # fmt: skip


def test_migrations_match_the_models(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from consensus.models import Base

    with db.kw["bind"].connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 10000


def test_importing_ratings_twice_changes_nothing_but_the_event_log(db, small_study):
    ratings = pd.read_csv(small_study / "ratings.csv")
    with db.begin() as session:
        first = import_ratings(session, ratings, origin="ratings.csv")
    pairs = ratings.groupby(["image_id", "rater"]).ngroups
    assert (first.created, first.items, first.raters) == (pairs, 40, 4)
    with db() as session:
        before = counts(session)
        table = answers(session)
    assert len(table) == len(ratings)
    with db.begin() as session:
        second = import_ratings(session, ratings, origin="ratings.csv")
    assert (second.created, second.changed, second.unchanged) == (0, 0, pairs)
    with db() as session:
        after = counts(session)
        assert answers(session).equals(table)
    assert after == {**before, "annotation_events": before["annotation_events"] + 1}


def test_upserts_are_idempotent_updates_replace_and_deletes_are_soft(db):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with db.begin() as session:
        item = get_or_create_item(session, "ls-7", ls_task_id=7, image="/data/upload/1/a.png")
        rater = get_or_create_rater(session, ls_user_id=3)
        a = upsert_annotation(session, item, rater, {"bcc": 1, "ulceration": 1}, Source.WEBHOOK,
                              diagnosis="BCC", ls_annotation_id=100, updated_at=t0)  # fmt: skip
        b = upsert_annotation(session, item, rater, {"bcc": 1, "ulceration": 1}, Source.WEBHOOK,
                              diagnosis="BCC", ls_annotation_id=100, updated_at=t0)  # fmt: skip
        assert a.created and not b.changed
        c = upsert_annotation(session, item, rater, {"bcc": 0, "ulceration": 0, "pigment_network": 1},
                              Source.WEBHOOK, diagnosis="non-BCC", ls_annotation_id=100,
                              updated_at=t0 + timedelta(minutes=5))  # fmt: skip
        assert c.changed and not c.created
        stale = upsert_annotation(session, item, rater, {"bcc": 1}, Source.SYNC, ls_annotation_id=100,
                                  updated_at=t0 + timedelta(minutes=1))  # fmt: skip
        assert not stale.changed  # an older replay does not overwrite a newer version
    with db() as session:
        (row,) = session.scalars(select(Annotation)).all()
        assert row.labels == {"bcc": 0, "ulceration": 0, "pigment_network": 1} and row.diagnosis == "non-BCC"
        assert len(answers(session)) == 3
    with db.begin() as session:
        assert soft_delete_annotations(session, [100, 999]) == 1
        assert soft_delete_annotations(session, [100]) == 0  # deleting twice is one deletion
    with db() as session:
        (row,) = session.scalars(select(Annotation)).all()
        assert row.deleted and row.deleted_at is not None
        assert answers(session).empty
    with db.begin() as session:  # the rater annotates again (a new Label Studio annotation)
        item = get_or_create_item(session, "ls-7", ls_task_id=7)
        rater = get_or_create_rater(session, ls_user_id=3)
        again = upsert_annotation(session, item, rater, {"bcc": 1}, Source.WEBHOOK, ls_annotation_id=101)
        assert again.changed and not again.created
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Annotation)) == 1
        assert len(answers(session)) == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pd.DataFrame({"image_id": ["a"], "rater": ["r"], "label": ["bcc"]}), r"lacks the column\(s\) \['value'\]"),
        (pd.DataFrame(columns=["image_id", "rater", "label", "value"]), "has no rows"),
        (pd.DataFrame({"image_id": ["a", "b"], "rater": ["r", None], "label": ["bcc", "bcc"], "value": [1, 0]}),
         r"missing values in column\(s\) \['rater'\] at CSV line\(s\) \[3\]"),
        (pd.DataFrame({"image_id": ["a"], "rater": ["r"], "label": ["melanoma"], "value": [1]}),
         r"unknown label keys \['melanoma'\]"),
        (pd.DataFrame({"image_id": ["a"], "rater": ["r"], "label": ["bcc"], "value": [float("nan")]}),
         r"missing values in column\(s\) \['value'\]"),
        (pd.DataFrame({"image_id": ["a"], "rater": ["r"], "label": ["bcc"], "value": ["yes"]}),
         "values must be 0 or 1"),
        (pd.DataFrame({"image_id": ["a", "a"], "rater": ["r", "r"], "label": ["bcc", "bcc"], "value": [1, 0]}),
         "rater 'r' gives two values for 'bcc' of image 'a'"),
    ],
    ids=["no-value-column", "empty", "rater-missing", "unknown-label", "nan", "not-binary", "conflict"],
)  # fmt: skip
def test_bad_ratings_are_refused_and_nothing_is_written(db, table, message):
    with pytest.raises(ValueError, match=message):
        validate_ratings(table)
    with pytest.raises(ValueError, match=message), db.begin() as session:
        import_ratings(session, table)
    with db() as session:
        assert counts(session) == dict.fromkeys(counts(session), 0)


def test_a_consensus_run_is_stored_with_its_parameters_and_traced_back(db, small_study):
    with db.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
    with db() as session:
        table = answers(session)
    bcc = table[table.label_key == "bcc"]
    share = bcc.groupby("task")["value"].mean()
    probas = {"bcc": pd.DataFrame({"0": 1 - share, "1": share})}
    reliability = pd.DataFrame([{"label_key": "bcc", "worker": "derm1", "sensitivity": 0.9, "sensitivity_low": 0.8,
                                 "sensitivity_high": 0.95, "specificity": 0.97, "specificity_low": 0.9,
                                 "specificity_high": 0.99, "n_items": 40}])  # fmt: skip
    with db.begin() as session:
        run = save_consensus_run(session, "majority-vote", {"smoothing": 0}, bcc, probas, {"bcc": {"n_iter": 1}},
                                 reliability)  # fmt: skip
        run_id = run.id
    with db() as session:
        run = latest_run(session)
        assert run is not None and run.id == run_id
        assert run.params == {"smoothing": 0} and run.n_items == 40 and run.n_raters == 4
        assert len(run.data_hash) == 64
        stored = consensus_table(session, run)
        assert len(stored) == 40 and set(stored.label_key) == {"bcc"}
        assert (stored.posterior >= 0.5).all()
        (rel,) = session.scalars(select(RaterReliability)).all()
        assert rel.sensitivity == 0.9 and rel.n_items == 40
    with pytest.raises(ValueError, match="consensus for unknown items"), db.begin() as session:
        save_consensus_run(session, "x", {}, bcc, {"bcc": pd.DataFrame({"1": [1.0]}, index=["nope"])})
    with db() as session:
        assert latest_run(session).id == run_id  # the failed run left nothing behind
