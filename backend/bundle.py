"""A frozen study bundle: everything a paper's numbers come from, locked by hashes, checkable later.

``dermassist study freeze --out DIR`` writes, for one consensus run (default: the latest BCC run):

- ``consensus/*.csv``, ``study.json``, ``report.html`` and ``raters/*.html`` (a page per reader): the
  study export of the run;
- ``regions/``: the consensus region masks (PNG) and their tables;
- ``label_studio_import.json``: the consensus as Label Studio ground truth (regions as brushes);
- ``gold.csv``: the gold labels the run used, with their sources;
- ``methods.md``: the methods paragraph (readers, reads per image, kappa / alpha with intervals, the
  consensus method and its settings, the rater model chosen per label, gold sources, the model);
- ``manifest.json``: the run, the served model version, the hash of the answers and of the gold, the
  run's settings, and the SHA-256 of every other file.

Nothing in a bundle depends on when or where it was written: freezing the same store twice gives the
same bytes. ``dermassist study verify DIR`` checks the files against the manifest and freezes the
store again beside it: any changed answer, gold label or file is named.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.label_studio.brush import decode_region
from backend.label_studio.export import ls_import_tasks
from backend.label_studio.ground_truth import add_region_ground_truth
from consensus.agreement import bootstrap_interval, fleiss_kappa, krippendorff_alpha
from consensus.export import Study, build_study, write_csv, write_json, write_report
from consensus.groups import lesion_group
from consensus.models import ConsensusRun, Item, ModelStatus, ModelVersion, RunKind
from consensus.region_export import region_masks, write_region_export
from consensus.repository import ANSWER_COLUMNS, HAM_KEY, answers, answers_hash, lesion_answers
from consensus.repository.gold import gold_table
from labeling_config import TARGET_NAMES, TARGETS, load_config, parse_config

#: The bundle's format, in its manifest.
FORMAT = "dermassist-study/1"
MANIFEST = "manifest.json"
#: Bootstrap resamples behind the agreement intervals of the methods paragraph.
N_BOOT = 1000


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def _model_versions(session: Session) -> list[dict[str, Any]]:
    """The served (promoted) model versions: version, system, release and the run they learnt from."""
    rows = session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.PROMOTED).order_by(ModelVersion.version)
    ).all()
    return [
        {"version": m.version, "system": m.system, "release": m.release, "consensus_run": m.consensus_run_id}
        for m in rows
    ]


def _agreement(run_answers: pd.DataFrame, groups: Mapping[Hashable, Hashable], n_boot: int) -> pd.DataFrame:
    """Per label: Fleiss' kappa and Krippendorff's alpha with bootstrap intervals over lesion groups."""
    rows = []
    for key, part in run_answers.groupby("label_key", sort=False):
        data = part[["task", "worker", "value"]].rename(columns={"value": "label"})
        per_item = data.groupby("task").size()
        if (per_item >= 2).sum() < 2:
            continue
        row: dict[str, Any] = {"label_key": key}
        for name, statistic in (("kappa", fleiss_kappa), ("alpha", krippendorff_alpha)):
            row[name] = statistic(data)
            row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(data, statistic, groups, n_boot)
        rows.append(row)
    return pd.DataFrame(rows)


def methods_paragraph(
    run: ConsensusRun,
    run_answers: pd.DataFrame,
    agreement: pd.DataFrame,
    n_groups: int,
    grouped_by: str,
    gold: pd.DataFrame,
    models: list[dict[str, Any]],
    n_boot: int = N_BOOT,
) -> str:
    """The methods section of a paper, written from the run (Markdown)."""
    reads = run_answers.drop_duplicates(["task", "worker"]).groupby("task").size()
    lines = [
        f"# Methods (consensus run {run.id})",
        "",
        f"**Readers.** {run.n_raters} readers gave {int(reads.sum())} reads of {len(reads)} images "
        f"({reads.mean():.2f} reads per image, range {reads.min()}–{reads.max()}).",
        "",
        f"**Agreement.** Fleiss' kappa and Krippendorff's alpha (nominal) per label, with 95% percentile "
        f"bootstrap intervals ({n_boot} resamples of {n_groups} {grouped_by}, seed 0):",
        "",
    ]
    for row in agreement.itertuples(index=False):
        name = TARGET_NAMES.get(str(row.label_key), str(row.label_key))
        lines.append(
            f"- {name}: kappa {row.kappa:.3f} ({row.kappa_low:.3f}–{row.kappa_high:.3f}), "
            f"alpha {row.alpha:.3f} ({row.alpha_low:.3f}–{row.alpha_high:.3f})"
        )
    params, convergence = run.params or {}, run.convergence or {}
    lines += ["", f"**Consensus.** {run.method}, one estimator per label."]
    candidates = params.get("candidates")
    if isinstance(candidates, Mapping):
        shown = "; ".join(
            f"{name}: {c.get('method')} (smoothing {c.get('smoothing')}, diagonal {c.get('diag_smoothing')}, "
            f"prior {c.get('prior_smoothing')})"
            for name, c in candidates.items()
        )
        lines.append(
            f"The rater model of each label was chosen without truth by {params.get('n_folds')}-fold "
            f"cross-validated likelihood of held-out answers among {shown}. Chosen:"
        )
        for key, info in convergence.items():
            selection = info.get("selection") if isinstance(info, Mapping) else None
            if isinstance(selection, Mapping):
                scores = selection.get("scores", {})
                score = float(scores.get(selection.get("choice"), float("nan")))
                lines.append(
                    f"- {TARGET_NAMES.get(key, key)}: {selection.get('choice')} "
                    f"(held-out log-likelihood per answer {score:.4f})"
                )
    else:
        settings = {k: v for k, v in params.items() if k not in ("gold", "regions")}
        lines.append(f"Settings: {json.dumps(settings, sort_keys=True, default=str)}.")
    regions = params.get("regions")
    if isinstance(regions, Mapping):
        lines.append(
            f"Painted regions: STAPLE per image and pattern (threshold {regions.get('threshold')}, tolerance "
            f"{regions.get('tol')}, at most {regions.get('n_iter')} iterations; regions SHA-256 "
            f"{regions.get('data_hash')})."
        )
    n_gold = int((params.get("gold") or {}).get("n", 0))
    if n_gold:
        sources = gold.groupby("source").size().to_dict() if len(gold) else {}
        shown = ", ".join(f"{n} from {s}" for s, n in sorted(sources.items()))
        lines += ["", f"**Gold.** {n_gold} labels were held at their known class ({shown}); "
                  "where sources disagreed, histopathology was preferred over adjudication."]  # fmt: skip
    else:
        lines += ["", "**Gold.** None: the reference standard is the consensus alone."]
    if models:
        shown = ", ".join(f"{m['version']} ({m['system']})" for m in models)
        lines += ["", f"**Model.** Pre-annotation by {shown}."]
    lines += ["", f"Answers SHA-256 {run.data_hash}; every file's hash is in manifest.json.", ""]
    return "\n".join(lines)


def _write(
    session: Session, out: Path, run_id: int | None, config_xml: str | None, n_boot: int
) -> dict[str, Any]:
    """Write every file but the manifest into ``out``; return the manifest (without file hashes)."""
    study: Study = build_study(session, run_id, decode=decode_region)  # the readers' pages show their regions
    run = session.get_one(ConsensusRun, study.run["id"])
    if run.kind is RunKind.LESION:
        keys = [HAM_KEY]
        run_answers = lesion_answers(session)
        run_answers = run_answers[run_answers["label_key"] == HAM_KEY][list(ANSWER_COLUMNS)]
    else:
        keys = [k for k in TARGETS if k in (run.convergence or {})]
        run_answers = answers(session, keys)
    items: dict[str, Any] = {e: d for e, d in session.execute(select(Item.external_id, Item.data))}  # noqa: C416
    groups: dict[Hashable, Hashable] = {
        task: lesion_group(task, items.get(task))[1] for task in run_answers["task"].unique()
    }
    n_groups = len(set(groups.values()))
    grouped_by = "images" if n_groups == len(groups) else "lesions / patients"
    gold, conflicts = gold_table(session, keys)
    models = _model_versions(session)

    write_csv(study, out / "consensus")
    write_json(study, out / "study.json")
    write_report(study, out / "report.html")
    write_region_export(session, run, out / "regions")
    xml = config_xml or load_config("lesion" if run.kind is RunKind.LESION else "bcc")
    config = parse_config(xml)
    images = {e: i for e, i in session.execute(select(Item.external_id, Item.image)) if i}
    tasks = ls_import_tasks(study.consensus, config, images, run_id=run.id)
    add_region_ground_truth(tasks, region_masks(session, run), config)
    (out / "label_studio_import.json").write_text(
        json.dumps(tasks, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    gold.to_csv(out / "gold.csv", index=False)
    agreement = _agreement(run_answers, groups, n_boot)
    agreement.to_csv(out / "agreement_intervals.csv", index=False, float_format="%.6f")
    text = methods_paragraph(run, run_answers, agreement, n_groups, grouped_by, gold, models, n_boot)
    (out / "methods.md").write_text(text, encoding="utf-8")
    gold_hash = hashlib.sha256(gold.to_csv(index=False).encode()).hexdigest()
    counts = {"n_items": run.n_items, "n_raters": run.n_raters, "n_answers": run.n_answers}
    return {
        "format": FORMAT,
        "run": {"id": run.id, "kind": str(run.kind), "method": run.method, "data_hash": run.data_hash,
                "created_at": run.created_at.isoformat(), **counts},
        "answers_hash": answers_hash(run_answers),
        "gold": {"n": len(gold), "conflicts": conflicts, "hash": gold_hash},
        "models": models,
        "settings": run.params,
        "n_boot": n_boot,
        "config_sha256": hashlib.sha256(xml.encode()).hexdigest(),
    }  # fmt: skip


def freeze(
    session: Session,
    out: Path,
    run_id: int | None = None,
    config_xml: str | None = None,
    n_boot: int | None = None,
) -> dict[str, Any]:
    """Write the bundle of a run into ``out`` (a new or empty folder); return its manifest.

    ``n_boot`` is the number of bootstrap resamples behind the agreement intervals (default
    :data:`N_BOOT`); it is kept in the manifest, so ``verify`` freezes again with the same.

    The files are written into a temporary folder beside ``out`` and moved into place at the end, so
    an interrupted freeze leaves no half bundle.

    Raises:
        ValueError: ``out`` holds files, the store has no such run, or ``n_boot`` is below 1.
    """
    if n_boot is not None and n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(
            f"{out} is not empty: freeze writes a new bundle (remove it, or choose another folder)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".freeze-", dir=out.parent))
    try:
        manifest = _write(session, work, run_id, config_xml, N_BOOT if n_boot is None else int(n_boot))
        files = sorted(p for p in work.rglob("*") if p.is_file())
        manifest["files"] = {p.relative_to(work).as_posix(): _sha256(p) for p in files}
        (work / MANIFEST).write_text(_json(manifest), encoding="utf-8")
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def verify(session: Session, bundle: Path, config_xml: str | None = None) -> list[str]:
    """Check a bundle against its manifest and against the store; an empty list means it holds.

    Returns:
        One line per problem: a file missing, changed or not in the manifest; the store's answers or
        gold labels changed since the freeze; a file that the store gives differently now.
    """
    path = bundle / MANIFEST
    if not path.is_file():
        return [f"{path} is missing: not a dermassist study bundle"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{path} cannot be read: {exc}"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return [f"{path} is not a {FORMAT} manifest"]
    problems: list[str] = []
    listed: dict[str, str] = manifest.get("files") or {}
    for name, digest in sorted(listed.items()):
        file = bundle / name
        if not file.is_file():
            problems.append(f"{name}: missing from the bundle")
        elif _sha256(file) != digest:
            problems.append(f"{name}: changed since the freeze (SHA-256 differs from the manifest)")
    for file in sorted(p for p in bundle.rglob("*") if p.is_file()):
        name = file.relative_to(bundle).as_posix()
        if name != MANIFEST and name not in listed:
            problems.append(f"{name}: not in the manifest")
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        try:
            again = freeze(
                session, Path(tmp) / "bundle", int(manifest["run"]["id"]), config_xml, manifest.get("n_boot")
            )
        except (ValueError, KeyError, TypeError) as exc:
            return [*problems, f"the store cannot give this bundle again: {exc}"]
    if again["answers_hash"] != manifest.get("answers_hash"):
        problems.append(
            "the store's answers changed since the freeze (an annotation was added, changed or deleted)"
        )
    if again["gold"]["hash"] != (manifest.get("gold") or {}).get("hash"):
        problems.append("the store's gold labels changed since the freeze")
    for name, digest in sorted(again["files"].items()):
        if listed.get(name) not in (None, digest):
            problems.append(f"{name}: the store gives it differently now")
        elif name not in listed:
            problems.append(f"{name}: the store gives a file the bundle lacks")
    return problems
