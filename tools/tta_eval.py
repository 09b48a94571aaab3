"""Test-time augmentation and checkpoint averaging, measured: validation AUROC of each output with and
without flips, for one checkpoint or the average of several (same architecture), on a folder's split::

    python tools/tta_eval.py runs/i13-bcc-pn/best.pt --data ../shared/data/derm-dev --out runs/tta
    python tools/tta_eval.py runs/a/best.pt runs/b/best.pt --data ... --out ...   # weights averaged

Intervals: 95% bootstrap over lesions; the paired difference (flips - plain) has its own interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from labeling_config import TARGETS
from model.common.data import DermDataset, load_table, split_sources
from model.common.metrics import bootstrap
from model.common.training import transforms
from model.multitask.network import load_checkpoint


@torch.no_grad()
def _logits(model: Any, images: torch.Tensor, flips: bool) -> torch.Tensor:
    out: torch.Tensor = model(images)
    if not flips:
        return out
    views = [out, model(images.flip(-1)), model(images.flip(-2)), model(images.flip(-1, -2))]
    return torch.stack(views).mean(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, meta = load_checkpoint(args.checkpoints[0])
    if len(args.checkpoints) > 1:  # uniform average of the weights (same architecture)
        states = [load_checkpoint(c)[0].state_dict() for c in args.checkpoints]
        averaged = {
            k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()
        }
        model.load_state_dict(averaged)
    model.eval()
    table = load_table(args.data)
    cfg = meta.extra.get("train_config", {})
    _, val = split_sources(table, cfg.get("val_fraction", 0.2), seed=cfg.get("split_seed", 0))
    rows = table.iloc[val].reset_index(drop=True)
    dataset = DermDataset(rows, transforms(meta.input_size, False))
    plain, flipped, targets, known = [], [], [], []
    for start in range(0, len(dataset), 32):
        batch = [dataset[i] for i in range(start, min(len(dataset), start + 32))]
        images = torch.stack([b["image"] for b in batch])
        plain.append(_logits(model, images, False))
        flipped.append(_logits(model, images, True))
        targets.append(torch.stack([b["target"] for b in batch]))
        known.append(torch.stack([b["target_mask"] for b in batch]))
    p, f = torch.cat(plain).numpy(), torch.cat(flipped).numpy()
    y, m = torch.cat(targets).numpy() >= 0.5, torch.cat(known).numpy() > 0
    result: dict[str, Any] = {"checkpoints": args.checkpoints, "data": args.data, "n_images": len(rows)}
    for k, key in enumerate(TARGETS):
        sel = np.flatnonzero(m[:, k])
        if not 0 < y[sel, k].sum() < len(sel):
            continue

        def stat(idx: Any, k: int = k, sel: Any = sel) -> dict[str, float]:
            yy = y[sel[idx], k]
            if not 0 < yy.sum() < len(yy):
                return {"plain": np.nan, "flips": np.nan, "gain": np.nan}
            a, b = roc_auc_score(yy, p[sel[idx], k]), roc_auc_score(yy, f[sel[idx], k])
            return {"plain": a, "flips": b, "gain": b - a}

        result[key] = {
            "n": len(sel),
            "positives": int(y[sel, k].sum()),
            **bootstrap(stat, rows["lesion_id"].to_numpy()[sel], args.bootstrap, 0),
        }
        r, gain = result[key], result[key]["gain"]
        print(
            f"{key:18s} n={len(sel)} pos={r['positives']}: AUROC {r['plain']['value']:.4f} -> flips "
            f"{r['flips']['value']:.4f} (gain {gain['value']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}])"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
