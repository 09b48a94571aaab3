"""Build the release folder (``models/``) from trained checkpoints and their evaluations.

For each model: the weights in fp16 (the loaders cast them back to fp32), each output's provenance
(``model.common.provenance``) written into the checkpoint from the evaluation's figures, a model card beside
it, and one ``release.json`` listing every file with its SHA-256 (``backend.serving.release`` checks them)::

    python tools/release.py --name 2026.12 --out models \\
        --dermnet runs/i13-bcc-pn/best.pt --dermnet-eval runs/i13-bcc-pn/eval-dermdev \\
        --pn-eval runs/i13-bcc-pn/eval-isic \\
        --segnet runs/i13-seg/best.pt --segnet-eval runs/i13-seg/eval-val \\
        --dual runs/i13-dual/best.pt --dual-eval runs/i13-dual/eval-val \\
        --recipe docs/release-recipe.json

``--recipe`` is a JSON object with, per kind (dermnet, segnet, dual), the exact training command and
the training time, for the cards. The figures are read from the evaluations' ``metrics.json``; nothing
is typed in by hand.

The BCC model's ONNX graph (``<name>.onnx``, for ONNX Runtime; registering copies it instead of exporting)
is written with the release; ``python tools/release.py graphs models`` adds it to an existing release
(same weights: the checks and versions do not change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from labeling_config import PATTERN_KEYS, TARGET_NAMES
from model.common.checkpoint import read_checkpoint, write_checkpoint
from model.common.files import file_sha256
from model.common.provenance import MIN_AUROC, MIN_DICE, Provenance, from_auroc, record

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE = 15 * 1024 * 1024
MAX_TOTAL = 40 * 1024 * 1024
LICENCE = (
    "CC BY-NC 4.0: trained on HAM10000 (Tschandl et al. 2018, CC BY-NC 4.0); the weights are for "
    "non-commercial research use only"
)
USE = (
    "Research pre-annotation of dermoscopic images in Label Studio, for dermatologists who review and "
    "correct every suggestion. **Not a diagnostic device**: not validated prospectively, not cleared "
    "by any regulator, and not for decisions about a patient."
)
HAM = "derm-dev: 4,038 HAM10000 dermoscopic images (CC BY-NC 4.0), lesion-grouped split, seed 0"
ISIC = "ISIC 2018 Tasks 1-2 training images (CC-0 in the ISIC Archive), 256 px thumbnails"


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _metrics(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "metrics.json").read_text(encoding="utf-8")))


def _iv(entry: dict[str, Any]) -> tuple[float, list[float]]:
    value = entry["value"] if "value" in entry else entry["mean"]
    return float(value), [float(entry["low"]), float(entry["high"])]


def dermnet_provenance(dermdev: dict[str, Any], isic: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    cls = dermdev["classification"]
    value, interval = _iv(cls["bcc"]["auroc"])
    out = {
        "bcc": from_auroc(
            value, int(cls["n_images"]), int(cls["n_bcc"]), f"{HAM}: validation split", interval=interval
        )
    }
    for key in PATTERN_KEYS:
        entry = (isic or {}).get("classification", {}).get("patterns", {}).get(key)
        if entry is None:
            out[key] = record(
                Provenance.UNTRAINED,
                note="no real image with this pattern labelled: HAM10000 has no pattern labels, "
                "ISIC 2018's attributes have no BCC pattern",
            )
            continue
        n = int(isic["classification"]["n_images"])  # type: ignore[index]
        value, interval = _iv(entry["auroc"])
        n_pos = round(float(entry["prevalence"]) * n)
        out[key] = from_auroc(value, n, n_pos, f"{ISIC}: validation split", interval=interval)
    return out


def _validated(
    output: str, metric: str, entry: dict[str, Any], n: int, data: str, passed: bool
) -> dict[str, dict[str, Any]]:
    value, interval = _iv(entry)
    status = Provenance.VALIDATED if passed else Provenance.UNVALIDATED
    return {output: record(status, metric=metric, value=value, interval=interval, n_images=n, data=data)}


def segnet_provenance(seg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Validated when the lower end of the Dice interval reaches ``MIN_DICE`` on >= 100 images."""
    data = f"{HAM}: validation split (stratified by diagnosis), each image at its own size"
    n = int(seg["n_images"])
    return _validated("lesion", "dice", seg["dice"], n, data, n >= 100 and seg["dice"]["low"] >= MIN_DICE)


def dual_provenance(dual: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Validated when the macro one-vs-rest AUROC reaches the patterns' bar (``MIN_AUROC``) on >= 100
    images; the figure shown is the balanced accuracy of the seven-class choice."""
    data = (
        f"{HAM}: validation split (stratified by diagnosis); macro AUROC {dual['auroc_macro']['value']:.3f}"
    )
    n = int(dual["n"])
    passed = n >= 100 and dual["auroc_macro"]["value"] >= MIN_AUROC
    return _validated("diagnosis", "balanced_accuracy", dual["balanced_accuracy"], n, data, passed)


def convert(source: Path, target: Path, kind: str, provenance: dict[str, dict[str, Any]], name: str) -> str:
    """Write ``source`` as a release file (fp16 weights, provenance, no optimizer state); its version.

    The file has the one checkpoint format (``model.common.checkpoint``); its version is the fp16
    weights' (``<dermnet|segnet|dual>-<hash>``), the training run's fp32 version is kept in ``extra``.
    """
    checkpoint = read_checkpoint(source)
    meta = dataclasses.replace(
        checkpoint.meta,
        provenance=provenance,
        extra={**checkpoint.meta.extra, "fp32_version": checkpoint.meta.version, "release": name},
    )
    return write_checkpoint(target, meta, _half(checkpoint.state_dict)).version


def _row(key: str, entry: dict[str, Any]) -> str:
    name = TARGET_NAMES.get(
        key, {"lesion": "Lesion mask", "diagnosis": "Seven-class diagnosis"}.get(key, key)
    )
    if entry["status"] == Provenance.UNTRAINED:
        return f"| {name} | untrained | {entry.get('note', '')} |"
    low, high = entry.get("interval", [float("nan")] * 2)
    size = f"{entry.get('n_images')} images" + (
        f", {entry['n_positive']} positive" if entry.get("n_positive") is not None else ""
    )
    figure = f"{entry['metric']} {entry['value']:.3f} [{low:.3f}, {high:.3f}] on {size}"
    return f"| {name} | **{entry['status']}** | {figure}; {entry.get('data', '')} |"


def card(name: str, release: str, kind: str, facts: dict[str, Any]) -> str:
    """A model card in Markdown."""
    rows = "\n".join(_row(k, v) for k, v in facts["provenance"].items())
    extra = "\n".join(f"- {line}" for line in facts.get("figures", []))
    return f"""# {name} (dermassist release {release})

{facts["what"]}

| | |
|---|---|
| file | `{facts["file"]}` ({facts["bytes"] / 1e6:.1f} MB, fp16 weights; loaded as fp32) |
| SHA-256 | `{facts["sha256"]}` (checked by `backend/serving/release.py` before anything is served) |
| version | `{facts["version"]}` (fp32 original `{facts.get("fp32_version") or "n/a"}`) |
| licence | {LICENCE} |

## Intended use and limits

{USE}

- Trained and validated on HAM10000 (and, where said, ISIC 2018) images: mostly fair-skinned patients
  from Austria and Australia, one dermatoscope per site. Performance on other skin types, devices or
  clinics is unknown: validate on your own images first (`dermassist evaluate`).
- Thresholds and temperatures were fitted on the same validation split that gives the figures below,
  so the sensitivity / specificity pairs are optimistic; AUROC and Dice do not depend on them.
{facts.get("limits", "")}

## Training

```
{facts["command"]}
```

{facts.get("time", "")}

Data: {facts["data"]}

## Outputs and their provenance

Only outputs marked **validated** are pre-annotated in Label Studio (`SHOW_OUTPUTS=all` shows the rest).
Intervals: 95%, bootstrap over lesions (1,000 replicates).

| output | provenance | figure and data |
|---|---|---|
{rows}

{extra}
"""


def reference_outputs(
    folder: Path, entries: list[dict[str, Any]], images: Path, n: int
) -> list[dict[str, Any]]:
    """The released files' outputs on the first ``n`` images of ``images`` (BCC first), through the serving
    code: DermNet's calibrated probabilities, the U-Net's lesion share, the dual classifier's classes."""
    import pandas as pd
    from PIL import Image

    from backend.serving.lesion import load_pair, run_lesion
    from backend.serving.multitask import load_served, run_batch

    torch.set_num_threads(1)
    files = {e["kind"]: folder / e["file"] for e in entries}
    labels = pd.read_csv(images / "labels.csv", dtype={"image_id": str}).sort_values("bcc", ascending=False)
    served = load_served(files["dermnet"])
    pair = (files["segnet"], files["dual"]) if "segnet" in files and "dual" in files else None
    system = load_pair(*pair) if pair else None
    checks = []
    for image_id in labels["image_id"].head(n):
        path = next(p for p in (images / "images").glob(f"{image_id}.*"))
        with Image.open(path) as im:
            image = im.convert("RGB")
        (output,) = run_batch(served, [image])
        check: dict[str, Any] = {
            "image": str(path.resolve().relative_to(ROOT)),  # the shipped sample, from the repository root
            "dermnet": {k: round(v, 6) for k, v in output.probs.items()},
        }
        if system is not None:
            (lesion,) = run_lesion(system, [image], [{}])
            check["lesion_share"] = round(float(lesion.mask.mean()), 6)
            check["diagnosis"] = {k: round(v, 6) for k, v in lesion.probs.items()}
        checks.append(check)
    return checks


def add_graph(out: Path, entry: dict[str, Any], limit: bool = True) -> int:
    """Write a released model's ONNX graph beside it and list it in its manifest ``entry``; its size.

    Args:
        limit: refuse a graph over the 15 MB limit of a committed file (off for an image build).
    """
    from backend.serving.lesion import export_graph
    from backend.serving.multitask import export_served, graph_version

    checkpoint = out / entry["file"]
    if entry["kind"] == "dermnet":
        graph = export_served(checkpoint)
    else:
        graph = checkpoint.with_suffix(".onnx")
        export_graph(checkpoint, graph)
    if graph_version(graph) != entry["version"]:
        raise SystemExit(f"{graph} holds {graph_version(graph)}, not {entry['version']}")
    size = graph.stat().st_size
    if limit and size > MAX_FILE:
        raise SystemExit(f"{graph} is {size / 1e6:.1f} MB, over the 15 MB limit")
    entry["graph"] = {"file": graph.name, "sha256": file_sha256(graph), "bytes": size}
    card = out / entry["card"]
    row = (
        f"| ONNX graph | `{graph.name}` ({size / 1e6:.1f} MB, fp32; SHA-256 `{entry['graph']['sha256']}`): "
        + (
            "the same weights for ONNX Runtime, with every output's Grad-CAM map, the embedding and 20 Monte "
            "Carlo dropout samples from the same pass |\n"
            if entry["kind"] == "dermnet"
            else "the same weights for ONNX Runtime |\n"
        )
    )
    text = card.read_text(encoding="utf-8")
    if "| ONNX graph |" not in text:
        anchor = text.index("| version |")
        card.write_text(text[:anchor] + row + text[anchor:], encoding="utf-8")
    return size


def _total(entries: list[dict[str, Any]]) -> int:
    return sum(e["bytes"] + e.get("graph", {}).get("bytes", 0) for e in entries)


def graphs_main(argv: list[str]) -> int:
    """``tools/release.py graphs FOLDER [--all]``: add the ONNX graphs to an existing release: the BCC
    model's (committed with it), and with ``--all`` the lesion pair's too (fp32, over the size limits of
    the committed folder: the serving image's build writes them into its own copy)."""
    parser = argparse.ArgumentParser(prog="tools/release.py graphs", description=graphs_main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--all", action="store_true", help="the lesion pair's graphs too (no size limits)")
    args = parser.parse_args(argv)
    folder, every = args.folder, args.all
    manifest = json.loads((folder / "release.json").read_text(encoding="utf-8"))
    for entry in manifest["models"]:
        if entry["kind"] == "dermnet" or every:
            add_graph(folder, entry, limit=not every)
    total = _total(manifest["models"])
    if total > MAX_TOTAL and not every:
        raise SystemExit(f"the release would be {total / 1e6:.1f} MB, over the 40 MB limit")
    (folder / "release.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"total {total / 1e6:.1f} MB -> {folder / 'release.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["graphs"]:
        return graphs_main(given[1:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="release name, e.g. 2026.12")
    parser.add_argument("--out", default="models")
    parser.add_argument("--dermnet", type=Path, required=True)
    parser.add_argument("--dermnet-eval", type=Path, required=True, help="evaluate on derm-dev (val)")
    parser.add_argument("--pn-eval", type=Path, default=None, help="evaluate on isic2018-attributes (val)")
    parser.add_argument("--segnet", type=Path, default=None)
    parser.add_argument("--segnet-eval", type=Path, default=None)
    parser.add_argument("--dual", type=Path, default=None)
    parser.add_argument("--dual-eval", type=Path, default=None)
    parser.add_argument("--recipe", type=Path, required=True, help="JSON: per kind, command, time, figures")
    parser.add_argument(
        "--check-images",
        type=Path,
        default=None,
        help="a dataset folder (the shipped sample): record the released models' outputs on its first "
        "images, which tests/test_release_models.py recomputes",
    )
    parser.add_argument("--check-n", type=int, default=8)
    args = parser.parse_args(given)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = json.loads(args.recipe.read_text(encoding="utf-8"))

    plan: list[tuple[str, str, Path, dict[str, dict[str, Any]]]] = [
        ("dermnet", "dermnet-bcc", args.dermnet, dermnet_provenance(
            _metrics(args.dermnet_eval), _metrics(args.pn_eval) if args.pn_eval else None
        )),
    ]  # fmt: skip
    if args.segnet and args.segnet_eval:
        plan.append(("segnet", "lesion-unet", args.segnet, segnet_provenance(_metrics(args.segnet_eval))))
    if args.dual and args.dual_eval:
        plan.append(("dual", "lesion-dual", args.dual, dual_provenance(_metrics(args.dual_eval))))

    entries, total = [], 0
    for kind, name, source, provenance in plan:
        target = out / f"{name}.pt"
        version = convert(source, target, kind, provenance, f"{args.name}/{name}")
        size = target.stat().st_size
        if size > MAX_FILE:
            raise SystemExit(f"{target} is {size / 1e6:.1f} MB, over the 15 MB limit")
        total += size
        sha = file_sha256(target)
        fp32 = read_checkpoint(source).meta.version
        facts = {
            **recipe[kind],
            "file": target.name,
            "bytes": size,
            "sha256": sha,
            "version": version,
            "fp32_version": fp32,
            "provenance": provenance,
        }
        (out / f"{name}.md").write_text(card(name, args.name, kind, facts), encoding="utf-8")
        entries.append(
            {
                "name": name,
                "kind": kind,
                "file": target.name,
                "sha256": sha,
                "bytes": size,
                "version": version,
                "card": f"{name}.md",
                "outputs": provenance,
                "metrics": recipe[kind].get("metrics", {}),
            }
        )
    for entry in entries:
        if entry["kind"] == "dermnet":
            add_graph(out, entry)
    total = _total(entries)
    if total > MAX_TOTAL:
        raise SystemExit(f"the release is {total / 1e6:.1f} MB, over the 40 MB limit")
    manifest = {"format": 1, "release": args.name, "licence": LICENCE, "models": entries}
    if args.check_images:
        manifest["checks"] = reference_outputs(out, entries, args.check_images, args.check_n)
    (out / "release.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for entry in entries:
        print(f"{entry['file']}\t{entry['bytes'] / 1e6:.1f} MB\t{entry['version']}\t{entry['sha256'][:16]}")
    print(f"total {total / 1e6:.1f} MB -> {out / 'release.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
