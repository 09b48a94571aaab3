"""Training: a 1-2 step smoke run, checkpoint round-trip, reproducibility, resume, kill mid-epoch."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from labeling_config import TARGETS
from model.common.checkpoint import read_checkpoint
from model.common.data import load_table
from model.multitask.network import load_checkpoint
from model.multitask.train import TrainConfig, masked_bce, train

ROOT = Path(__file__).resolve().parents[2]


def tiny(study: Path, out: Path, **overrides) -> TrainConfig:
    settings = {
        "data": str(study), "out": str(out), "epochs": 2, "batch_size": 8, "image_size": 64, "width_mult": 0.35,
        "max_steps_per_epoch": 2, "warmup_steps": 1, "progress": False, "threads": 1,
    }  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_smoke_run_writes_loadable_calibrated_checkpoints(small_study, tmp_path):
    result = train(tiny(small_study, tmp_path))
    assert result.best.is_file() and result.last.is_file()
    model, meta = load_checkpoint(result.best)
    assert set(meta.thresholds) == set(TARGETS) and set(meta.temperatures) == set(TARGETS)
    assert all(0.0 <= t <= 1.0 for t in meta.thresholds.values())
    assert meta.input_size == 64 and meta.data_hash and meta.version == result.meta.version
    assert meta.threshold_rule == "youden"
    assert len(result.history) == 2 and "auroc_bcc" in result.history[0]
    assert (tmp_path / "history.csv").is_file()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, len(TARGETS))


def test_same_seed_same_weights(small_study, tmp_path):
    a = train(tiny(small_study, tmp_path / "a", epochs=1))
    b = train(tiny(small_study, tmp_path / "b", epochs=1))
    c = train(tiny(small_study, tmp_path / "c", epochs=1, seed=1))
    version = lambda r: read_checkpoint(r.last).meta.version  # noqa: E731
    assert version(a) == version(b) != version(c)


def test_resume_continues_where_it_stopped(small_study, tmp_path):
    train(tiny(small_study, tmp_path, epochs=1))
    resumed = train(tiny(small_study, tmp_path, epochs=2, resume=str(tmp_path / "last.pt")))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    state = read_checkpoint(tmp_path / "last.pt").state
    assert state is not None and state["epoch"] == 2


def test_screening_thresholds_follow_the_target_sensitivity(small_study, tmp_path):
    result = train(tiny(small_study, tmp_path, epochs=1, target_sensitivity=0.9))
    assert result.meta.threshold_rule == "sensitivity>=0.9"


def test_soft_targets_and_unlabelled_patterns(small_study, tmp_path):
    table = load_table(small_study)
    table.loc[table.index[:20], "has_patterns"] = False  # as HAM10000: diagnosis only
    soft = pd.DataFrame({"bcc": 0.7}, index=table["image_id"])
    result = train(tiny(small_study, tmp_path, epochs=1), table=table, targets=soft)
    assert result.best.is_file()


def test_masked_targets_do_not_contribute_to_the_loss():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    changed = target.clone()
    changed[:, 1] = 1 - changed[:, 1]  # flip the masked column
    weights = torch.ones(2)
    assert masked_bce(logits, target, mask, weights) == masked_bce(logits, changed, mask, weights)
    full = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0])
    assert torch.isclose(masked_bce(logits, target, mask, weights), full)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be at least 1"),
    ("image_size", 8, "image_size must be between"),
    ("lr", 0.0, "lr must be positive"),
])  # fmt: skip
def test_bad_training_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_killing_training_mid_epoch_leaves_a_resumable_checkpoint(small_study, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        from model.multitask.train import TrainConfig, train
        train(TrainConfig(data={str(small_study)!r}, out={str(out)!r}, epochs=200, batch_size=4, image_size=64,
                          width_mult=0.35, warmup_steps=1, progress=False, threads=1))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "last.pt").exists(), "training wrote no checkpoint"
        time.sleep(0.3)  # well inside the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = read_checkpoint(out / "last.pt").state
    assert state is not None
    assert state["epoch"] >= 1
    load_checkpoint(out / "best.pt")
    resumed = train(tiny(small_study, out, epochs=state["epoch"] + 1, batch_size=4, max_steps_per_epoch=None,
                         resume=str(out / "last.pt")))  # fmt: skip
    assert resumed.history[-1]["epoch"] == state["epoch"] + 1


def test_the_same_code_runs_under_torchrun_with_two_cpu_processes(small_study, tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        from model.multitask.train import TrainConfig, train
        train(TrainConfig(data={str(small_study)!r}, out={str(tmp_path / "run")!r}, epochs=1, batch_size=4,
                          image_size=64, width_mult=0.35, max_steps_per_epoch=2, progress=False, threads=1))
    """)
    )
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    model, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta.epoch == 1
    assert not any(k.startswith("module.") for k in model.state_dict())  # saved unwrapped from DDP


def test_localisation_loss_rewards_maps_inside_the_region():
    from model.multitask.train import localisation_loss

    weights = torch.eye(2)  # target k reads channel k
    features = torch.zeros(1, 2, 4, 4)
    features[0, 0, 0, 0] = 5.0  # target 0 looks at the top-left cell
    features[0, 1, 3, 3] = 5.0  # target 1 looks at the bottom-right cell
    regions = torch.zeros(1, 2, 16, 16)
    regions[0, :, :4, :4] = 1.0  # both regions: the top-left cell
    valid = torch.ones(1, 2)
    assert localisation_loss(features, weights, regions, torch.tensor([[1.0, 0.0]])) < 1e-3
    assert localisation_loss(features, weights, regions, torch.tensor([[0.0, 1.0]])) > 0.999
    assert localisation_loss(features, weights, regions, valid) == pytest.approx(0.5, abs=1e-3)
    assert localisation_loss(features, weights, regions, torch.zeros(1, 2)) == 0.0


def test_training_with_the_localisation_loss(small_study, tmp_path):
    result = train(tiny(small_study, tmp_path, epochs=1, cam_loss=1.0))
    assert result.best.is_file()
    assert result.meta.extra["train_config"]["cam_loss"] == 1.0


def test_training_from_a_checkpoint_records_it_as_the_parent(small_study, tmp_path):
    first = train(tiny(small_study, tmp_path / "a", epochs=1))
    second = train(tiny(small_study, tmp_path / "b", epochs=1, weights=str(first.best)))
    assert first.meta.parent is None
    assert second.meta.parent == first.meta.version


def test_with_the_localisation_loss_selection_watches_the_whole_validation_objective(small_study, tmp_path):
    result = train(tiny(small_study, tmp_path, epochs=2, cam_loss=1.0))
    for row in result.history:
        assert 0.0 <= row["val_localisation"] <= 1.0
        assert row["val_objective"] == pytest.approx(row["val_loss"] + row["val_localisation"])
    best = min(result.history, key=lambda row: row["val_objective"])
    assert result.meta.epoch == best["epoch"]
    plain = train(tiny(small_study, tmp_path / "plain", epochs=1))
    assert "val_objective" not in plain.history[0]
