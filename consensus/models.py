"""The SQL store: typed SQLAlchemy 2.0 models (DESIGN.md, "SQL").

- ``raters`` — one per dermatologist (Label Studio user id where known).
- ``items`` — one per image / Label Studio task.
- ``annotation_events`` — every raw event as received (webhook, sync, import): append-only, so the
  store can always be rebuilt and audited.
- ``annotation_deletions`` — one tombstone per deleted Label Studio annotation, with the deletion's time.
- ``annotations`` — one row per (item, rater): the diagnosis, every binary target (``bcc`` and the
  seven patterns, keys from ``labeling_config.TARGETS``) and the regions, and the prediction the
  reader started from, if any (AI exposure). Updates replace the values, deletes are soft.
- ``consensus_runs`` / ``consensus_labels`` / ``rater_reliability`` — every consensus run with its
  parameters and convergence, its per-item posteriors, and its per-rater sensitivity / specificity,
  so any exported number traces back to the run that produced it. A run is of one ``kind``: the BCC
  model's targets (``bcc.xml``: diagnosis and patterns, Dawid-Skene) or the lesion pair's reference
  (``lesion.xml``: the HAM10000 diagnosis by Dawid-Skene, the lesion outline by STAPLE).
- ``consensus_masks`` — a region consensus (STAPLE) of one item in one run: the mask itself, beside its
  per-item summary posterior in ``consensus_labels``.
- ``model_versions`` / ``model_outputs`` / ``training_jobs`` — every checkpoint the backend can serve
  (released or trained), where each of its outputs comes from, and the retraining jobs.
- ``preannotation_jobs`` — whole Label Studio projects pre-annotated in the background: one active job
  per project, with its progress.

Label values are stored as JSON keyed by target (``{"bcc": 1, "ulceration": 0, ...}``) rather than as
one column per pattern, so a schema change needs no migration of the annotations.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Source(enum.StrEnum):
    """Where an annotation or event came from."""

    WEBHOOK = "webhook"
    SYNC = "sync"
    IMPORT = "import"


class RunKind(enum.StrEnum):
    """Which reference standard a consensus run builds (one per published system)."""

    BCC = "bcc"  # bcc.xml: the BCC diagnosis and the seven patterns (model.multitask), Dawid-Skene
    LESION = "lesion"  # lesion.xml: HAM10000 diagnosis (Dawid-Skene) and lesion outline (STAPLE)


def _stored_as_values(kind: type[enum.StrEnum]) -> SAEnum:
    """A StrEnum column stored as its values in a VARCHAR (no native ENUM: portable, easy to extend)."""
    return SAEnum(kind, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


def _unique_where(name: str, *columns: str, where: str) -> Index:
    """A partial unique index (SQLite and PostgreSQL): ``columns`` unique among the rows ``where`` holds."""
    return Index(name, *columns, unique=True, sqlite_where=text(where), postgresql_where=text(where))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: DateTime(timezone=True),
        # StrEnums are stored as their values in a VARCHAR (no native ENUM: portable, easy to extend).
        Source: SAEnum(Source, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        RunKind: SAEnum(
            RunKind, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]
        ),
    }


class Rater(Base):
    """A dermatologist (or any rater)."""

    __tablename__ = "raters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    ls_user_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    annotations: Mapped[list[Annotation]] = relationship(back_populates="rater")


class Item(Base):
    """An image to be labelled: a Label Studio task, or an image of an imported study."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(300), unique=True)  # image id, or "ls-<task id>"
    ls_task_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    ls_project_id: Mapped[int | None] = mapped_column(BigInteger)
    image: Mapped[str | None] = mapped_column(Text)  # URL or path as Label Studio / the study gives it
    content_hash: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the task's data (metadata fields)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    annotations: Mapped[list[Annotation]] = relationship(back_populates="item")


class AnnotationEvent(Base):
    """A raw event exactly as received. Append-only: never updated, never deleted."""

    __tablename__ = "annotation_events"
    __table_args__ = (Index("ix_annotation_events_received_at", "received_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[Source]
    action: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    ls_project_id: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)  # why it could not be applied, if it could not


class Annotation(Base):
    """One rater's labels for one item (the latest version; earlier ones live in the events)."""

    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("item_id", "rater_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    ls_annotation_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    diagnosis: Mapped[str | None] = mapped_column(String(64))  # the chosen diagnosis value, as shown
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)  # target key -> 0 / 1
    regions: Mapped[list[Any]] = mapped_column(default=list)  # [{label, rle | mask, width, height}]
    source: Mapped[Source]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[datetime | None]
    # AI exposure: the Label Studio prediction the reader started from (None: a blank task), its
    # model_version, and what it showed (target key -> 0 / 1 and the diagnosis value), where known.
    parent_prediction: Mapped[int | None] = mapped_column(BigInteger)
    parent_model_version: Mapped[str | None] = mapped_column(String(200))
    parent_labels: Mapped[dict[str, Any] | None]
    parent_diagnosis: Mapped[str | None] = mapped_column(String(64))

    item: Mapped[Item] = relationship(back_populates="annotations")
    rater: Mapped[Rater] = relationship(back_populates="annotations")


class AnnotationDeletion(Base):
    """When a Label Studio annotation was deleted: a tombstone, kept even before the annotation is known.

    A deletion wins over every version of the annotation not newer than it, in whatever order the
    events arrive (a delete before its create, a stale replay after the delete): only an update made
    after the deletion brings the reading back.
    """

    __tablename__ = "annotation_deletions"

    ls_annotation_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    deleted_at: Mapped[datetime]


class ConsensusRun(Base):
    """One consensus computation: its parameters, convergence, and the data it saw."""

    __tablename__ = "consensus_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[RunKind] = mapped_column(default=RunKind.BCC, server_default=RunKind.BCC.value)
    method: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    convergence: Mapped[dict[str, Any]] = mapped_column(default=dict)  # per label: n_iter, converged, ll
    n_items: Mapped[int] = mapped_column(Integer)
    n_raters: Mapped[int] = mapped_column(Integer)
    n_answers: Mapped[int] = mapped_column(Integer)
    data_hash: Mapped[str] = mapped_column(String(64))

    labels: Mapped[list[ConsensusLabel]] = relationship(back_populates="run", cascade="all, delete-orphan")
    reliability: Mapped[list[RaterReliability]] = relationship(
        back_populates="run", cascade="all, delete-orphan"
    )
    masks: Mapped[list[ConsensusMask]] = relationship(back_populates="run", cascade="all, delete-orphan")


class ConsensusLabel(Base):
    """The consensus of one label of one item in one run."""

    __tablename__ = "consensus_labels"
    __table_args__ = (UniqueConstraint("run_id", "item_id", "label_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("consensus_runs.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    label_key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(64))  # the consensus class, as text ("1", "0", "mel")
    posterior: Mapped[float] = mapped_column(Float)  # probability of that class
    probabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)  # every class -> probability

    run: Mapped[ConsensusRun] = relationship(back_populates="labels")


class ConsensusMask(Base):
    """The consensus region (STAPLE) of one label of one item in one run.

    Its summary lives in ``consensus_labels`` (same run, item and label): value ``"1"`` when the mask has a
    pixel, and per class the mean pixel posterior over the pixels the consensus gives that class. The mask
    is stored bit-packed, row-major (``numpy.packbits`` of the flattened boolean mask), with its size.
    """

    __tablename__ = "consensus_masks"
    __table_args__ = (UniqueConstraint("run_id", "item_id", "label_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("consensus_runs.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    label_key: Mapped[str] = mapped_column(String(64))
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    mask: Mapped[bytes] = mapped_column(LargeBinary)
    # The raters whose masks it combines (in the estimator's order) and, where STAPLE ran, its per-rater
    # sensitivity / specificity, foreground prior and convergence.
    raters: Mapped[list[Any]] = mapped_column(default=list)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    run: Mapped[ConsensusRun] = relationship(back_populates="masks")


class RaterReliability(Base):
    """A rater's sensitivity and specificity for one binary label, as estimated by one run."""

    __tablename__ = "rater_reliability"
    __table_args__ = (UniqueConstraint("run_id", "rater_id", "label_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("consensus_runs.id", ondelete="CASCADE"), index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    label_key: Mapped[str] = mapped_column(String(64))
    sensitivity: Mapped[float | None]
    sensitivity_low: Mapped[float | None]
    sensitivity_high: Mapped[float | None]
    specificity: Mapped[float | None]
    specificity_low: Mapped[float | None]
    specificity_high: Mapped[float | None]
    n_items: Mapped[int] = mapped_column(Integer)

    run: Mapped[ConsensusRun] = relationship(back_populates="reliability")


class ModelStatus(enum.StrEnum):
    """Where a trained model stands."""

    CANDIDATE = "candidate"  # trained, being evaluated
    PROMOTED = "promoted"  # the model the backend serves (one at a time)
    RETIRED = "retired"  # served before, replaced by a newer promoted model
    REJECTED = "rejected"  # evaluated worse than the promoted model: never served


class JobStatus(enum.StrEnum):
    """Where a training job stands."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ModelVersion(Base):
    """A trained checkpoint, its evaluation and whether it is served."""

    __tablename__ = "model_versions"
    # At most one promoted version per system, enforced by the database (partial unique index).
    __table_args__ = (
        _unique_where("uq_model_versions_one_promoted", "system", "status", where="status = 'promoted'"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)  # CheckpointMeta.version
    path: Mapped[str] = mapped_column(Text)  # the checkpoint file (a folder for a system of several)
    # The served system it belongs to: "multitask" (the BCC model) or "lesion" (U-Net + classifier).
    system: Mapped[str] = mapped_column(String(32), default="multitask", server_default="multitask")
    parent: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[ModelStatus] = mapped_column(
        SAEnum(ModelStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # on the fixed validation split
    consensus_run_id: Mapped[int | None] = mapped_column(ForeignKey("consensus_runs.id", ondelete="SET NULL"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("training_jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    # A released model's name (e.g. "dermassist release 2026.12 / dermnet-bcc"); None for trained ones.
    release: Mapped[str | None] = mapped_column(String(128))
    outputs: Mapped[list[ModelOutput]] = relationship(
        back_populates="model_version", cascade="all, delete-orphan", order_by="ModelOutput.id"
    )


class ModelOutput(Base):
    """Where one output of one model version comes from (``model.common.provenance``): validated on real
    images
    (with the figure, its size and its data), unvalidated, synthetic or untrained. The backend shows a
    dermatologist only validated outputs."""

    __tablename__ = "model_outputs"
    __table_args__ = (UniqueConstraint("model_version_id", "output"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    output: Mapped[str] = mapped_column(String(64))  # a target key: bcc, pigment_network, ...
    status: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str | None] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float)
    n_images: Mapped[int | None] = mapped_column(Integer)
    n_positive: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[ModelVersion] = relationship(back_populates="outputs")

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"status": self.status}
        for key in ("metric", "value", "n_images", "n_positive", "data"):
            if getattr(self, key) is not None:
                entry[key] = getattr(self, key)
        return entry


class TrainingJob(Base):
    """One retraining: what triggered it, how it went, what it produced."""

    __tablename__ = "training_jobs"
    # At most one queued and one running job, enforced by the database: concurrent triggers from any
    # number of processes coalesce into the queued job, and jobs run one at a time.
    __table_args__ = (
        _unique_where("uq_training_jobs_one_queued", "status", where="status = 'queued'"),
        _unique_where("uq_training_jobs_one_running", "status", where="status = 'running'"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    trigger: Mapped[str] = mapped_column(String(64))  # START_TRAINING, updates, cli
    status: Mapped[JobStatus] = mapped_column(_stored_as_values(JobStatus))
    triggers: Mapped[int] = mapped_column(Integer, default=1)  # requests coalesced into this job
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    pid: Mapped[int | None] = mapped_column(Integer)
    log: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(String(64))  # the model it produced
    promoted: Mapped[bool | None] = mapped_column(Boolean)


class PreannotationMode(enum.StrEnum):
    """Which tasks of a project a pre-annotation job predicts."""

    MISSING = "missing"  # tasks without a prediction of the served model version
    ALL = "all"  # every task; a prediction of the same version is replaced


class PreannotationJob(Base):
    """One pre-annotation of a whole Label Studio project: its mode, its progress, how it ended.

    The tasks still to do are read from Label Studio itself (those without a prediction of ``version``),
    so the row holds progress, not the work list; ``cursor`` (the last task id handled) lets an
    interrupted ``all`` run go on where it stopped.
    """

    __tablename__ = "preannotation_jobs"
    # At most one active (queued or running) job per project, enforced by the database: concurrent
    # starts from any number of processes get the one job.
    __table_args__ = (
        _unique_where("uq_preannotation_jobs_one_active", "project", where="status IN ('queued', 'running')"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project: Mapped[int] = mapped_column(BigInteger)  # the Label Studio project id
    mode: Mapped[PreannotationMode] = mapped_column(_stored_as_values(PreannotationMode))
    status: Mapped[JobStatus] = mapped_column(_stored_as_values(JobStatus))
    trigger: Mapped[str] = mapped_column(String(32))  # api, cli
    batch_size: Mapped[int] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(String(200))  # the model version it predicts with
    total: Mapped[int | None] = mapped_column(Integer)  # tasks to do when it started (None: not known yet)
    done: Mapped[int] = mapped_column(Integer, default=0)  # predictions posted
    failed: Mapped[int] = mapped_column(Integer, default=0)  # tasks left without one (no image)
    cursor: Mapped[int] = mapped_column(BigInteger, default=0)  # the last task id handled
    resumed_from: Mapped[int | None] = mapped_column(Integer)  # the interrupted job it continues
    pid: Mapped[int | None] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]  # the last progress written
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class GoldLabel(Base):
    """A known label of one item (gold): an adjudicator's final reading, or histopathology.

    One row per (item, label key, source); a newer statement from the same source replaces the value
    (``updated_at``), and a deleted adjudication is soft-deleted. Where several sources give one
    label, :data:`consensus.repository.gold.SOURCE_PRECEDENCE` decides which one the consensus uses
    (histopathology before adjudication). ``value`` is text as in ``consensus_labels`` ("1", "0",
    "mel"); ``reference`` says where it came from (the adjudicator, a file, a pathology report id),
    ``observed_on`` when it was established (the report's date), where given.
    """

    __tablename__ = "gold_labels"
    __table_args__ = (UniqueConstraint("item_id", "label_key", "source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    label_key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))  # histopathology, adjudication, ...
    reference: Mapped[str | None] = mapped_column(String(300))
    observed_on: Mapped[str | None] = mapped_column(String(32))  # ISO date as given
    ls_annotation_id: Mapped[int | None] = mapped_column(BigInteger)  # an adjudication's annotation
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
