"""``dermassist next-batch`` and ``dermassist next-reads``: which image to label next, and which image
needs which dermatologist's read next, as Label Studio tabs."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any

from backend.cli.common import _settings, _synced_label_studio

logger = logging.getLogger("dermassist")


def _labelled(task: dict[str, Any]) -> bool:
    return any(not a.get("was_cancelled") for a in task.get("annotations") or [])


def cmd_next_batch(args: argparse.Namespace) -> int:
    """The next batch to label in a Label Studio project: every task scored by the acquisition strategy
    (--strategy, else the config's <Image acquisition>, else ACQUISITION) with the promoted models, then
    the --size most uncertain unlabelled tasks; with --pool-factor k > 1, picked among the k x size most
    uncertain, each the farthest (in the BCC model's embedding) from every labelled or picked image.
    Printed, written as CSV with --out, and shown in Label Studio as the tab "Next batch" with --view."""
    import pandas as pd
    from tqdm import tqdm

    from backend.images import ImageFetcher
    from backend.label_studio.client import LabelStudioError, connect, label_studio_errors
    from backend.serving.acquire import next_batch, score_tasks
    from backend.serving.holder import Holder, Serving
    from backend.serving.release import ReleaseError, install_configured
    from consensus.db import init_db
    from labeling_config.parse import parse_config

    settings = _settings(args)
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise ValueError(
            "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the project's tasks are read from there"
        )
    engine, sessions = init_db(settings.database_url)
    try:
        try:
            install_configured(sessions, settings)
        except ReleaseError as exc:
            logger.warning("the released models are not installed: %s", exc)
        serving = Serving(sessions, Holder(engine=settings.serving_engine, threads=settings.threads))
        try:
            ls = connect(settings.label_studio_url, settings.label_studio_api_key)
        except LabelStudioError as exc:
            raise ValueError(str(exc)) from None
        with ls, label_studio_errors(settings.label_studio_url):
            config = parse_config(ls.label_config(args.project))
            strategy = args.strategy or config.acquisition or settings.acquisition
            served = serving.for_config(config)
            tasks = ls.export_tasks(args.project)
            labelled = {int(t["id"]) for t in tasks if _labelled(t)}
            bar = tqdm(
                total=len(tasks),
                desc=f"scoring ({strategy})",
                unit="task",
                file=sys.stderr,
                disable=args.quiet,
            )
            scored = score_tasks(
                tasks,
                config,
                served,
                ImageFetcher(settings),
                strategy,
                show_all=settings.show_outputs == "all",
                concurrency=settings.image_fetch_concurrency,
                progress=lambda done, _: bar.update(done - bar.n),
                override=settings.model_score_threshold,
            )
            bar.close()
            picks = next_batch(scored, labelled, args.size, args.pool_factor)
            view = None
            if args.view:
                title = f"Next batch ({strategy}{', diverse' if args.pool_factor > 1 else ''})"
                view = ls.task_view(args.project, title, [p.task for p in picks], "tasks:predictions_score")
    finally:
        engine.dispose()
    table = pd.DataFrame([p.__dict__ for p in picks], columns=["rank", "task", "uncertainty", "score"])
    if args.out:
        table.to_csv(args.out, index=False)
    for task, why in sorted(scored.failed.items()):
        logger.warning("task %d: not scored: %s", task, why)
    print(table.to_string(index=False))
    open_count = len(scored.tasks) - len(labelled & set(scored.tasks))
    diverse = (
        f" (diverse: among the {args.pool_factor * args.size} most uncertain)" if args.pool_factor > 1 else ""
    )
    print(
        f"project {args.project}: {len(picks)} of {open_count} unlabelled tasks picked by {strategy}{diverse}"
        f"; {len(scored.failed)} not scored" + (f"; Label Studio tab {view}" if view is not None else "")
    )
    return 0


def _reader_names(ls: Any, names: list[str]) -> dict[str, str]:
    """Store rater name -> the name a coordinator knows: a reader first seen by id (``ls-user-7``) is
    shown by their Label Studio e-mail where the user list can be read."""
    from backend.collection.sync import user_emails

    emails = user_emails(ls) if any(n.startswith("ls-user-") for n in names) else {}
    shown = {}
    for name in names:
        found = re.fullmatch(r"ls-user-(\d+)", name)
        shown[name] = emails.get(int(found.group(1)), name) if found else name
    return shown


def cmd_next_reads(args: argparse.Namespace) -> int:
    """Which image needs which dermatologist's read next (adaptive reads): sync the project, run the
    consensus of --label, and keep open every image whose posterior is below --confidence or that has
    fewer than --min-reads reads; each open image goes to the least-loaded reader who has not read it
    (ties: the most reliable). Printed, written as CSV with --out, and shown in Label Studio as one tab
    per reader ("Next reads: <reader>") with --view."""
    from backend.label_studio.client import label_studio_errors
    from consensus.adaptive import StoppingRule, assign_reads, next_reads
    from consensus.db import init_db
    from consensus.repository import answers, consensus_probabilities, reader_reliability
    from consensus.service import run_consensus
    from labeling_config import TARGETS

    if args.label not in TARGETS:
        raise ValueError(f"unknown label {args.label!r}; the labels are {list(TARGETS)}")
    rule = StoppingRule(args.confidence, args.min_reads, args.max_reads)
    settings = _settings(args)
    engine, sessions = init_db(settings.database_url)
    try:
        url = settings.label_studio_url or ""
        synced, ls = _synced_label_studio(settings, sessions, args.project)
        with ls, label_studio_errors(url):
            in_project = {
                f"ls-{t['id']}" for t in ls.export_tasks(args.project) if isinstance(t.get("id"), int)
            }
            with sessions.begin() as session:
                run = run_consensus(session, label_keys=[args.label])
                run_id = run.id
                probas = consensus_probabilities(session, run, args.label)
                readers = reader_reliability(session, run, args.label)
                table = answers(session, [args.label])
            probas = probas[probas.index.isin(in_project)]
            reads = table[table["task"].isin(in_project)].rename(columns={"value": "label"})
            queue = next_reads(probas, reads[["task", "worker", "label"]], readers, rule)
            assigned = assign_reads(queue, args.per_reader)
            shown = _reader_names(ls, list(readers.index))
            assigned["reader"] = assigned["reader"].map(shown)
            readers.index = readers.index.map(shown)
            views = {}
            if args.view:
                for reader in readers.index:
                    tasks = [
                        int(str(t).removeprefix("ls-"))
                        for t in assigned["task"][assigned["reader"] == reader]
                    ]
                    views[reader] = ls.task_view(args.project, f"Next reads: {reader}", tasks)
    finally:
        engine.dispose()
    if args.out:
        assigned.to_csv(args.out, index=False)
    print(assigned.to_string(index=False) if len(assigned) else "(no image needs another read)")
    per = assigned.groupby("reader").size().to_dict() if len(assigned) else {}
    print(
        f"project {args.project}: synced ({synced.created} new, {synced.changed} changed), consensus run "
        f"{run_id}; {len(queue)} of {len(probas)} read images open for {args.label} (posterior < "
        f"{rule.confidence:g} or < {rule.min_reads} reads); next reads: "
        + (", ".join(f"{r} {n}" for r, n in per.items()) or "none")
        + (f"; Label Studio tabs {sorted(views.values())}" if views else "")
    )
    return 0
