"""Checkpoints carry their metadata, round-trip exactly and are written atomically."""

import os

import pytest
import torch

from labeling_config import TARGETS
from model.common.checkpoint import (
    CheckpointMeta,
    read_checkpoint,
    save_checkpoint,
    weights_version,
)
from model.multitask.network import DermNet, load_checkpoint


def _model(seed: int = 0) -> DermNet:
    torch.manual_seed(seed)
    return DermNet(width_mult=0.35)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = _model().eval()
    meta = CheckpointMeta(
        input_size=96, width_mult=0.35, thresholds=dict.fromkeys(TARGETS, 0.3), data_hash="abc"
    )
    stored = save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    assert loaded_meta == stored
    assert loaded_meta.version.startswith("dermnet-") and loaded_meta.thresholds["bcc"] == 0.3
    assert loaded_meta.targets == list(TARGETS) and loaded_meta.target_names["ulceration"] == "Ulceration"


def test_version_is_derived_from_the_weights():
    a, b = _model(0).state_dict(), _model(1).state_dict()
    assert weights_version(a) == weights_version(_model(0).state_dict())
    assert weights_version(a) != weights_version(b)


def test_a_failed_write_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    first = save_checkpoint(path, _model(0), CheckpointMeta(width_mult=0.35))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _model(1), CheckpointMeta(width_mult=0.35))
    monkeypatch.undo()
    assert load_checkpoint(path)[1].version == first.version
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_unreadable_foreign_and_mismatched_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a dermassist checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(
        tmp_path / "old.pt", _model(), CheckpointMeta(width_mult=0.35, targets=["bcc", "ulceration"])
    )
    with pytest.raises(ValueError, match="was trained for the targets \\['bcc', 'ulceration'\\]"):
        load_checkpoint(tmp_path / "old.pt")


def test_unknown_metadata_keys_from_newer_versions_are_ignored():
    meta = CheckpointMeta.from_dict({"version": "v", "input_size": 128, "added_later": 1})
    assert meta.input_size == 128


def test_output_stride_travels_with_the_checkpoint(tmp_path):
    model = DermNet(width_mult=0.35, output_stride=16).eval()
    save_checkpoint(tmp_path / "m.pt", model, CheckpointMeta(width_mult=0.35, output_stride=16))
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta.output_stride == 16 and loaded.output_stride == 16
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
