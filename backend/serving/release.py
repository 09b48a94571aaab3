"""The released models: shipped in ``models/``, SHA-256 checked, served when nothing else is promoted.

``models/release.json`` lists each released file (and the BCC model's ONNX graph, which registering
copies instead of exporting) with its SHA-256, its version and each output's provenance
(:mod:`model.common.provenance`); a model card (``<name>.md``) stands beside each file. At start,
``serve`` (every worker) verifies the files and registers each released system in the store's
``model_versions`` (with its outputs in ``model_outputs``): the BCC model (DermNet) and the lesion pair
(U-Net + dual classifier, one version of the ``lesion`` system). Each is promoted when its system has
no promoted version yet or an earlier release is: a fresh deployment serves it with no promote step,
an upgraded checkout serves its new release, and a model someone promotes or a retraining job produces
replaces it for good (``dermassist models promote release`` returns to the BCC model).

``RELEASE_DIR`` points at the folder (default: ``models/`` of this checkout; the Docker image sets it);
``RELEASE_DIR=none`` turns the release off.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from backend.serving import registry
from backend.settings import Settings
from model.common.files import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "release.json"
FORMAT = 1
KINDS = ("dermnet", "segnet", "dual")


class ReleaseError(ValueError):
    """A release folder whose manifest or files cannot be trusted (missing, altered, malformed)."""


@dataclass(frozen=True)
class ReleasedModel:
    """One released file."""

    name: str
    kind: str
    path: Path
    sha256: str
    version: str
    card: Path
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    graph: Path | None = None  # its ONNX graph (same weights, for ONNX Runtime), checked like the file
    graph_sha256: str | None = None


@dataclass(frozen=True)
class Release:
    """A release folder: its name, licence and models by kind."""

    folder: Path
    name: str
    licence: str
    models: dict[str, ReleasedModel]

    def label(self, kind: str) -> str:
        return f"{self.name}/{self.models[kind].name}"


def read_release(folder: str | Path | None) -> Release | None:
    """The release in ``folder`` with every file checked against its SHA-256; None when there is none.

    Raises:
        ReleaseError: the manifest is malformed, a file is missing, or a file's SHA-256 differs.
    """
    if folder is None:
        return None
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ReleaseError(f"{manifest}: format {raw.get('format')!r}, this version reads {FORMAT}")
        models: dict[str, ReleasedModel] = {}
        for entry in raw["models"]:
            kind = entry["kind"]
            if kind not in KINDS or kind in models:
                raise ReleaseError(f"{manifest}: kind {kind!r} unknown or listed twice (kinds: {KINDS})")
            models[kind] = ReleasedModel(
                name=str(entry["name"]),
                kind=kind,
                path=folder / entry["file"],
                sha256=str(entry["sha256"]).lower(),
                version=str(entry["version"]),
                card=folder / entry["card"],
                outputs=dict(entry.get("outputs", {})),
                metrics=dict(entry.get("metrics", {})),
                graph=folder / entry["graph"]["file"] if "graph" in entry else None,
                graph_sha256=str(entry["graph"]["sha256"]).lower() if "graph" in entry else None,
            )
        release = Release(folder, str(raw["release"]), str(raw["licence"]), models)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, ReleaseError):
            raise
        raise ReleaseError(f"{manifest} is not a release manifest: {exc!r}") from None
    for model in release.models.values():
        files = [(model.path, model.sha256)]
        if model.graph is not None and model.graph_sha256 is not None:
            files.append((model.graph, model.graph_sha256))
        for path, sha256 in files:
            if not path.is_file():
                raise ReleaseError(f"released model {path} is missing (listed in {manifest})")
            found = file_sha256(path)
            if found != sha256:
                raise ReleaseError(
                    f"released model {path} has SHA-256 {found}, the manifest says {sha256}: the file was "
                    "altered or damaged; restore it (git checkout models/) or set RELEASE_DIR=none"
                )
    return release


def install_configured(sessions: sessionmaker[Session], settings: Settings) -> Release | None:
    """What every serving process does at start: the release ``RELEASE_DIR`` names, checked and
    installed (its lesion graphs cached in ``DERMASSIST_CACHE/graphs/``), and a lesion pair promoted
    before the registry knew that system adopted; the release (None: none).

    Raises:
        ReleaseError: the release's manifest or files cannot be trusted.
    """
    from backend.serving.lesion import adopt_legacy_pair

    release = read_release(settings.release_dir)
    if release is not None:
        install(sessions, Path(settings.model_dir), release, Path(settings.cache_dir) / "graphs")
    adopt_legacy_pair(sessions, Path(settings.model_dir))
    return release


def install(
    sessions: sessionmaker[Session], model_dir: Path, release: Release, graph_cache: Path | None = None
) -> str | None:
    """Register each released system in the store, each promoted if its system has no promoted version
    (or an earlier release is); the released DermNet's version (or None).

    ``graph_cache``: where the lesion pair's graphs, when the release does not list them, are kept once
    exported (by the checkpoint's SHA-256), so another model folder on this machine copies them instead
    of exporting again (about 30 s).

    A version already registered is not read again: every worker's start costs a lookup, not a
    checkpoint load. Safe from any number of workers at once: a version or a promotion another one
    recorded first is kept as it is.
    """
    installed: dict[str, str] = {}
    model = release.models.get("dermnet")
    if model is not None:
        installed["dermnet"] = _install(
            sessions,
            model_dir,
            model.version,
            lambda: dermnet_candidate(model),
            release.label("dermnet"),
            model.metrics,
            model.outputs,
        )
    if lesion_pair(release) is not None:
        from backend.serving.lesion import pair_version

        seg, dual = release.models["segnet"], release.models["dual"]
        installed["lesion"] = _install(
            sessions,
            model_dir,
            pair_version(seg.path, dual.path),
            lambda: pair_candidate(seg, dual, graph_cache),
            f"{release.name}/lesion",
            {"segnet": seg.metrics, "dual": dual.metrics},
        )
    return installed.get("dermnet")


def dermnet_candidate(model: ReleasedModel) -> registry.Candidate:
    """The released BCC model as a version of the ``multitask`` system, described by its manifest entry:
    no checkpoint is read (the SHA-256 check vouches for the file), so a serving worker installing the
    release imports no PyTorch. Its graph is copied from the release."""
    path, version = model.path, model.version
    return registry.Candidate(
        system=registry.MULTITASK,
        version=version,
        files={f"{version}.pt": path},
        outputs=tuple(model.outputs),
        provenance=dict(model.outputs),
        graphs=lambda target: registry.write_graph(target, path, version),
    )


def pair_candidate(
    seg: ReleasedModel, dual: ReleasedModel, graph_cache: Path | None = None
) -> registry.Candidate:
    """The released U-Net and classifier as a version of the ``lesion`` system, described by their
    manifest entries (no checkpoint read, as :func:`dermnet_candidate`). Their graphs are copied where
    the release lists them (the serving image's) or ``graph_cache`` has them, else exported in a child
    process (into ``graph_cache`` when given)."""
    from backend.serving.lesion import (
        DIAGNOSIS_OUTPUT,
        DUAL_FILE,
        LESION_OUTPUT,
        SEG_FILE,
        export_graphs,
        pair_version,
    )

    given: dict[str, tuple[Path, str]] = {}
    for name, model in ((SEG_FILE, seg), (DUAL_FILE, dual)):
        graph = model.graph or (cached_graph(model, graph_cache) if graph_cache is not None else None)
        if graph is not None:
            given[name] = (graph, model.version)
    return registry.Candidate(
        system=registry.LESION,
        version=pair_version(seg.path, dual.path),
        files={SEG_FILE: seg.path, DUAL_FILE: dual.path},
        outputs=(LESION_OUTPUT, DIAGNOSIS_OUTPUT),
        provenance={**seg.outputs, **dual.outputs},
        graphs=lambda folder: export_graphs(folder, given),
    )


#: Part of a cached graph's name: a change to what the graphs hold or take bumps it.
GRAPH_FORMAT = 1


def cached_graph(model: ReleasedModel, cache: Path) -> Path | None:
    """``model``'s graph in ``cache`` (``<checkpoint SHA-256>-g<format>.onnx``), exported there in a child
    process when absent; None when it cannot be had (the caller exports as usual)."""
    from backend.serving.lesion import export_graph_apart

    path = Path(cache) / f"{model.sha256}-g{GRAPH_FORMAT}.onnx"
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        export_graph_apart(model.path, path)
    except Exception:
        logger.exception("the graph of %s could not be cached in %s", model.path.name, cache)
        return None
    return path


def _install(
    sessions: sessionmaker[Session],
    model_dir: Path,
    version: str,
    describe: Callable[[], registry.Candidate],
    label: str,
    metrics: dict[str, Any],
    outputs: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Register ``version`` (described by ``describe`` only when it is not registered yet) and promote
    it as :func:`install` says."""
    for attempt in range(3):
        with sessions() as session:
            try:
                row = registry.find(session, version)
                if row is None:
                    row = registry.register(
                        session, describe(), model_dir, metrics=metrics, release=label, provenance=outputs
                    )
                current = registry.promoted(session, row.system)
                # Served when nothing is, or when an earlier release is (an upgrade of the checkout):
                # a model someone promoted or a retraining job produced is never replaced here.
                if current is None or (current.release is not None and current.version != row.version):
                    registry.promote(session, row)
                    logger.info("serving the released %s %s (%s)", row.system, row.version, label)
                session.commit()
                return row.version
            except IntegrityError:  # another worker registered or promoted at the same moment
                session.rollback()
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def lesion_pair(release: Release | None) -> tuple[Path, Path] | None:
    """The released U-Net and dual classifier, if the release has both."""
    if release is None or "segnet" not in release.models or "dual" not in release.models:
        return None
    return release.models["segnet"].path, release.models["dual"].path
