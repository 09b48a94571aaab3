"""Checkpoints: one format for every system, read through one function (the earlier layouts converted
on read, everything with weights_only=True), round-tripping exactly and written atomically."""

import os

import numpy as np
import pytest
import torch

from labeling_config import TARGETS
from model.common.checkpoint import (
    FORMAT,
    ModelMeta,
    read_checkpoint,
    save_checkpoint,
    update_meta,
    weights_version,
)
from model.multitask.network import ARCH, CheckpointMeta, DermNet, DermNetMeta, load_checkpoint


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


def test_the_stored_form_is_the_common_part_and_the_systems_config_part(tmp_path):
    meta = save_checkpoint(tmp_path / "m.pt", _model(), CheckpointMeta(width_mult=0.35, data_hash="abc"))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # plain types and tensors only
    assert raw["format"] == FORMAT and set(raw) == {"format", "meta", "state_dict"}
    stored = raw["meta"]
    assert (stored["system"], stored["arch"], stored["version"]) == ("multitask", ARCH, meta.version)
    assert stored["data_hash"] == "abc" and stored["config"]["width_mult"] == 0.35
    assert "width_mult" not in stored and set(stored["config"]) == set(DermNetMeta.config_fields())
    plain = read_checkpoint(tmp_path / "m.pt").meta  # without the system's class: the config as a dict
    assert type(plain) is ModelMeta and plain.config["thresholds"] == meta.thresholds
    assert DermNetMeta.from_meta(plain) == meta


def test_numpy_figures_are_stored_as_plain_numbers(tmp_path):
    meta = CheckpointMeta(width_mult=0.35, metrics={"auroc": np.float64(0.75), "n": np.int64(3)})
    save_checkpoint(tmp_path / "m.pt", _model(), meta, state={"history": [{"loss": np.float32(0.5)}]})
    checkpoint = read_checkpoint(tmp_path / "m.pt", DermNetMeta)
    assert checkpoint.meta.metrics == {"auroc": 0.75, "n": 3} and type(checkpoint.meta.metrics["n"]) is int
    assert checkpoint.state == {"history": [{"loss": 0.5}]}


def test_a_format_1_dermnet_checkpoint_is_read_in_the_current_format(tmp_path):
    model = _model()
    flat = {**CheckpointMeta(width_mult=0.35, input_size=96).config_part(), "version": "dermnet-0123",
            "arch": ARCH, "data_hash": "h", "metrics": {"auroc_bcc": 0.9}, "epoch": 3, "extra": {"n_val": 4}}  # fmt: skip
    provenance = {"bcc": {"status": "validated"}}
    torch.save({"format": 1, "meta": flat, "state_dict": model.state_dict(), "provenance": provenance},
               tmp_path / "old.pt")  # fmt: skip
    loaded, meta = load_checkpoint(tmp_path / "old.pt")
    assert (meta.system, meta.version, meta.input_size, meta.epoch) == ("multitask", "dermnet-0123", 96, 3)
    assert meta.provenance == provenance and meta.extra == {
        "n_val": 4
    }  # the release tool's provenance moves in
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    update_meta(tmp_path / "old.pt", parent="dermnet-parent")  # rewritten in the current format
    raw = torch.load(tmp_path / "old.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["meta"]["config"]["input_size"] == 96
    assert load_checkpoint(tmp_path / "old.pt")[1].parent == "dermnet-parent"


def test_a_format_1_segmentation_and_a_dual_encoder_dict_are_read_in_the_current_format(tmp_path):
    from model.lesion.dual import DualNet, load_dual_checkpoint
    from model.lesion.meta import DualMeta
    from model.lesion.segmentation import SegMeta, load_segnet
    from model.lesion.unet import SegNet

    segnet = SegNet(width_mult=0.35, input_size=64)
    flat = {**SegMeta(input_size=64, width_mult=0.35).config_part(), "arch": "segnet-mobilenet_v2",
            "version": "segnet-0123", "threshold": 0.4}  # fmt: skip
    torch.save({"format": 1, "meta": flat, "state_dict": segnet.state_dict()}, tmp_path / "seg.pt")
    _, seg_meta = load_segnet(tmp_path / "seg.pt")
    assert (seg_meta.system, seg_meta.threshold, seg_meta.input_size) == ("lesion-segmentation", 0.4, 64)

    dual = DualNet(width_mult=0.35, use_metadata=False)
    config = {"data": "d", "backbone": "mobilenet_v2", "width_mult": 0.35, "use_lesion": True,
              "use_metadata": False, "image_size": 64, "lesion_size": 48, "val_fraction": 0.2}  # fmt: skip
    torch.save({"arch": "dual-encoder", "config": config, "state_dict": dual.state_dict(), "epoch": 2,
                "metrics": {"auroc_macro": 0.8}, "data_hash": "h", "n_val": 9,
                "provenance": {"diagnosis": {"status": "validated"}}}, tmp_path / "dual.pt")  # fmt: skip
    loaded, meta = load_dual_checkpoint(tmp_path / "dual.pt")
    assert isinstance(meta, DualMeta) and (meta.use_metadata, meta.image_size, meta.lesion_size) == (
        False,
        64,
        48,
    )
    assert meta.version == weights_version(dual.state_dict(), "dual") and meta.epoch == 2
    assert meta.extra == {"train_config": config, "n_val": 9} and meta.provenance["diagnosis"]
    assert not loaded.use_metadata


def test_any_system_loads_by_its_metadata(tmp_path):
    from model import systems
    from model.lesion.dual import DualNet
    from model.lesion.meta import DualMeta
    from model.lesion.segmentation import SegMeta, save_segnet
    from model.lesion.train_dual import DualConfig, save_dual
    from model.lesion.unet import SegNet

    save_checkpoint(tmp_path / "dermnet.pt", _model(), CheckpointMeta(width_mult=0.35))
    save_segnet(tmp_path / "seg.pt", SegNet(width_mult=0.35, input_size=64), SegMeta())
    config = DualConfig(data="-", width_mult=0.35, image_size=64, lesion_size=48)
    save_dual(tmp_path / "dual.pt", DualNet(width_mult=0.35, dim=32, heads=2), config)
    found = {name: systems.load(tmp_path / name) for name in ("dermnet.pt", "seg.pt", "dual.pt")}
    assert [type(net).__name__ for net, _ in found.values()] == ["DermNet", "SegNet", "DualNet"]
    assert [type(meta) for _, meta in found.values()] == [DermNetMeta, SegMeta, DualMeta]
    dual_net, dual_meta = found["dual.pt"]
    assert (dual_meta.dim, dual_meta.image_size, dual_net.dim, dual_net.training) == (32, 64, 32, False)
    assert systems.read_meta(tmp_path / "seg.pt") == found["seg.pt"][1]
    assert set(systems.SYSTEMS) == {"multitask", "lesion-segmentation", "lesion-dual"}

    update_meta(tmp_path / "seg.pt", system="a-third-model")
    with pytest.raises(ValueError, match="system 'a-third-model', which this version does not know"):
        systems.load(tmp_path / "seg.pt")
