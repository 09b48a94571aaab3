"""Gold labels: ``adjudicate`` (disputed images to a senior dermatologist) and ``consensus import-gold``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from backend.cli.common import _database_url, _settings, _synced_label_studio

logger = logging.getLogger("dermassist")


def cmd_import_gold(args: argparse.Namespace) -> int:
    """Store known diagnoses (histopathology) as gold labels: a CSV with columns image_id, diagnosis and
    optionally source and date. image_id is the store's item id (the image id of imported ratings, or
    ls-<task id> for Label Studio tasks). The next consensus run holds them at their class."""
    import pandas as pd

    from consensus.db import init_db
    from consensus.repository.gold import import_gold

    path = Path(args.file)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    engine, sessions = init_db(_database_url(args))
    try:
        with sessions.begin() as session:
            summary = import_gold(session, table, reference=path.name)
    finally:
        engine.dispose()
    print(
        f"gold: {summary.images} images ({summary.new_items} new to the store), "
        f"{summary.labels} labels written, {summary.unchanged} unchanged"
    )
    return 0


def cmd_adjudicate(args: argparse.Namespace) -> int:
    """Send a project's disputed images to a senior dermatologist: sync the project, run the consensus,
    select per label the images whose posterior lies in [--low, --high) or whose readers have no majority
    (gold images excepted), and add them to the project's adjudication project in Label Studio (made on
    the first call), each with every reader's annotation shown as a prediction. The adjudicator's
    annotations come back (webhook or `dermassist sync --project <adjudication project>`) as gold labels."""
    from backend.label_studio.adjudication import queue_adjudication
    from backend.label_studio.client import label_studio_errors
    from consensus.adjudication import DisputeRule, disputed_items
    from consensus.db import init_db
    from consensus.repository import answers, consensus_probabilities
    from consensus.repository.gold import gold_table
    from consensus.service import run_consensus
    from labeling_config import TARGETS

    settings = _settings(args)
    rule = DisputeRule(
        low=args.low, high=args.high, no_majority=args.no_majority, min_answers=args.min_answers
    )
    keys = list(TARGETS) if args.labels is None else [k.strip() for k in args.labels.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; the labels are {list(TARGETS)}")
    engine, sessions = init_db(settings.database_url)
    try:
        url = settings.label_studio_url or ""
        synced, ls = _synced_label_studio(settings, sessions, args.project)
        with ls, label_studio_errors(url):
            source_tasks = ls.export_tasks(args.project)
            with sessions.begin() as session:
                run = run_consensus(session, label_keys=keys)
                run_id = run.id
                table = answers(session, keys)
                posteriors = {key: consensus_probabilities(session, run, key) for key in keys}
                gold, _ = gold_table(session, keys)
            in_project = {f"ls-{t['id']}" for t in source_tasks if isinstance(t.get("id"), int)}
            table = table[table["task"].isin(in_project)]
            pairs = list(zip(gold["task"], gold["label_key"], strict=True)) if len(gold) else []
            disputed = disputed_items(posteriors, table, rule, gold=pairs)
            queue = queue_adjudication(ls, args.project, source_tasks, disputed, args.adjudicator, run_id)
    finally:
        engine.dispose()
    if args.out:
        disputed.to_csv(args.out, index=False)
    by_label = disputed.groupby("label_key").size().to_dict() if len(disputed) else {}
    shown = ", ".join(f"{k} {by_label[k]}" for k in keys if k in by_label) or "none"
    n_images = disputed["task"].nunique() if len(disputed) else 0
    print(
        f"project {args.project}: synced ({synced.created} new, {synced.changed} changed), "
        f"consensus run {run_id}; {n_images} disputed images (by label: {shown}); "
        f"adjudication project {queue.project} ({'created' if queue.created else 'found'}): "
        f"{queue.added} tasks added, {queue.already} already there"
    )
    return 0
