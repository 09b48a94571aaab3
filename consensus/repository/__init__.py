"""SQL <-> long tables: the only way annotations and consensus results enter or leave the store.

By what they hold: :mod:`.annotations` (raters, items, events, annotations), :mod:`.answers` (the
raters' answers as long tables), :mod:`.runs` (consensus runs), :mod:`.operations` (what the routes read),
:mod:`.preannotation` (background pre-annotation jobs).

Writes are idempotent: the same Label Studio annotation id twice is one row; an update replaces the
values (unless it is older than what is stored: replays may arrive out of order); a delete is soft
and recorded. Every function takes the session explicitly and never commits: the caller owns the
transaction, so a batch either lands whole or not at all.
"""

from __future__ import annotations

from consensus.repository.annotations import (
    MAX_MODEL_VERSION_CHARS,
    Exposure,
    Upsert,
    get_or_create_item,
    get_or_create_rater,
    insert_if_absent,
    record_event,
    soft_delete_annotations,
    upsert_annotation,
)
from consensus.repository.answers import (
    ANSWER_COLUMNS,
    HAM_KEY,
    RATINGS_COLUMNS,
    ImportSummary,
    answers,
    answers_hash,
    ham_code,
    import_ratings,
    lesion_answers,
    validate_ratings,
)
from consensus.repository.operations import (
    items_changed_since_last_job,
    model_versions,
    recent_jobs,
    store_counts,
)
from consensus.repository.preannotation import (
    active_preannotation,
    add_preannotation,
    claim_preannotation,
    end_preannotation,
    interrupted_preannotation,
    recent_preannotations,
    record_preannotation_progress,
)
from consensus.repository.runs import (
    RELIABILITY_COLUMNS,
    RegionConsensus,
    consensus_masks,
    consensus_probabilities,
    consensus_table,
    latest_run,
    pack_mask,
    reader_reliability,
    save_consensus_run,
    unpack_mask,
)

__all__ = [
    "ANSWER_COLUMNS",
    "HAM_KEY",
    "MAX_MODEL_VERSION_CHARS",
    "RATINGS_COLUMNS",
    "RELIABILITY_COLUMNS",
    "Exposure",
    "ImportSummary",
    "RegionConsensus",
    "Upsert",
    "active_preannotation",
    "add_preannotation",
    "answers",
    "answers_hash",
    "claim_preannotation",
    "consensus_masks",
    "consensus_probabilities",
    "consensus_table",
    "end_preannotation",
    "get_or_create_item",
    "get_or_create_rater",
    "ham_code",
    "import_ratings",
    "insert_if_absent",
    "interrupted_preannotation",
    "items_changed_since_last_job",
    "latest_run",
    "lesion_answers",
    "model_versions",
    "pack_mask",
    "reader_reliability",
    "recent_jobs",
    "recent_preannotations",
    "record_event",
    "record_preannotation_progress",
    "save_consensus_run",
    "soft_delete_annotations",
    "store_counts",
    "unpack_mask",
    "upsert_annotation",
    "validate_ratings",
]
