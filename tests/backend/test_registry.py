"""One registry for both served systems: a version per row with its system, one promoted per system, a
promotion reaching a running app without a restart, and a pair from before the registry adopted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from backend.api.app import create_app
from backend.serving import holder, registry
from backend.serving.holder import Holder, Serving
from backend.serving.lesion import DUAL_FILE, SEG_FILE, adopt_legacy_pair, pair_candidate
from consensus.models import ModelStatus, ModelVersion
from labeling_config import load_config
from tests.backend.conftest import promote_lesion, tiny_lesion_pair

LESION_XML = load_config("lesion")


def test_each_system_has_its_own_promoted_version(sessions, settings, promoted, tmp_path):
    first = promote_lesion(sessions, settings.model_dir, *tiny_lesion_pair(tmp_path))
    with sessions() as session:
        assert registry.promoted(session).version == promoted  # type: ignore[union-attr]
        row = registry.promoted(session, registry.LESION)
        assert row is not None and row.version == first and row.system == "lesion"
        assert {p.name for p in Path(row.path).iterdir()} == {SEG_FILE, DUAL_FILE, "segnet.onnx", "dual.onnx"}
        assert [o.output for o in row.outputs] == ["lesion", "diagnosis"]
    # Another pair retires the first pair and leaves the BCC model served.
    (tmp_path / "other").mkdir()
    seg, dual = tiny_lesion_pair(tmp_path / "other")  # the same networks (seeded) ...
    with open(dual, "ab") as fh:
        fh.write(b"\0")  # ... in another file: the pair's version is a hash of both files
    second = promote_lesion(sessions, settings.model_dir, seg, dual)
    assert second != first
    with sessions() as session:
        statuses = {v.version: (v.system, v.status) for v in session.scalars(select(ModelVersion))}
    assert statuses == {
        promoted: ("multitask", ModelStatus.PROMOTED),
        first: ("lesion", ModelStatus.RETIRED),
        second: ("lesion", ModelStatus.PROMOTED),
    }


def test_the_database_refuses_two_promoted_versions_of_one_system(sessions, settings, tmp_path):
    seg, dual = tiny_lesion_pair(tmp_path)
    with sessions() as session:
        first = registry.register(session, pair_candidate(seg, dual), settings.model_dir)
        first.status = ModelStatus.PROMOTED
        session.commit()
        with open(dual, "ab") as fh:
            fh.write(b"\0")
        second = registry.register(session, pair_candidate(seg, dual), settings.model_dir)
        second.status = ModelStatus.PROMOTED
        with pytest.raises(IntegrityError):
            session.commit()


def test_a_promoted_pair_reaches_a_running_app(sessions, settings, promoted, tmp_path, monkeypatch):
    monkeypatch.setattr(holder, "PROMOTED_CHECK_S", 0.0)
    client = create_app(settings, sessions=sessions).test_client()
    refused = client.post("/setup", json={"schema": LESION_XML})
    assert refused.status_code == 422 and "promote-lesion" in refused.get_json()["message"]
    version = promote_lesion(sessions, settings.model_dir, *tiny_lesion_pair(tmp_path))
    answer = client.post("/setup", json={"schema": LESION_XML})
    assert answer.status_code == 200 and answer.get_json()["model_version"] == version
    listed = client.get("/versions").get_json()
    assert listed["lesion"]["version"] == version and listed["lesion"]["released"] is False
    assert listed["versions"] == [promoted]  # the BCC model's versions
    assert {m["system"] for m in listed["models"]} == {"multitask", "lesion"}


def test_a_pair_promoted_before_the_registry_is_adopted_once(sessions, settings, tmp_path):
    legacy = settings.model_dir / "lesion"
    legacy.mkdir(parents=True)
    seg, dual = tiny_lesion_pair(tmp_path)
    shutil.copy(seg, legacy / SEG_FILE)
    shutil.copy(dual, legacy / DUAL_FILE)
    version = adopt_legacy_pair(sessions, settings.model_dir)
    assert version is not None and version.startswith("lesion-")
    assert adopt_legacy_pair(sessions, settings.model_dir) is None  # a pair is promoted now
    assert Serving(sessions).lesion_pair().version == version  # type: ignore[union-attr]


def test_the_holder_loads_each_system_once_per_version():
    loads: list[tuple[str, str]] = []

    class Loaded:
        def __init__(self, version: str) -> None:
            self.version = version

    def loader(system: str):
        def load(path: str, version: str, engine: str, threads: int) -> Loaded:
            loads.append((system, version))
            return Loaded(version)

        return load

    held = Holder({"a": loader("a"), "b": loader("b")})
    assert held.ensure("a", "v1", "p").version == "v1"
    assert held.ensure("a", "v1", "p").version == "v1"
    assert held.ensure("b", "v1", "p").version == "v1"
    assert held.ensure("a", "v2", "p").version == "v2"
    assert loads == [("a", "v1"), ("b", "v1"), ("a", "v2")]


def test_setup_and_health_load_no_model(sessions, settings, promoted, tmp_path):
    """Label Studio gives /setup 3 s and polls /health: both read the registry, the first /predict loads."""
    promote_lesion(sessions, settings.model_dir, *tiny_lesion_pair(tmp_path))
    app = create_app(settings, sessions=sessions)
    client = app.test_client()
    held = app.extensions["dermassist"].serving.holder
    assert (
        client.post("/setup", json={"schema": LESION_XML}).get_json()["model_version"].startswith("lesion-")
    )
    assert client.get("/health").get_json()["model_version"] == promoted
    assert held.current(registry.LESION) is None and held.current(registry.MULTITASK) is None


def test_metrics_are_stored_without_nan(sessions, settings, tiny_checkpoint):
    """A job with no validation item has NaN figures: stored as null (PostgreSQL's JSON has no NaN)."""
    with sessions() as session:
        row = registry.register(
            session, tiny_checkpoint, settings.model_dir, metrics={"candidate": {"val_loss": float("nan")}}
        )
        session.commit()
        assert row.metrics == {"candidate": {"val_loss": None}}
