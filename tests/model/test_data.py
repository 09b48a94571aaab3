"""One loader for synthetic and real (derm-dev) data; lesion-grouped, stratified splits."""

import numpy as np
import pandas as pd
import pytest
import torch

from labeling_config import PATTERN_KEYS, TARGETS
from model.common.data import (
    DataError,
    DermDataset,
    load_table,
    load_tables,
    split_by_lesion,
    split_sources,
    table_hash,
)


def test_synthetic_study_loads_with_pattern_labels(small_study):
    df = load_table(small_study)
    assert len(df) == 40
    assert df["has_patterns"].all()
    assert df["mask_path"].notna().all()
    item = DermDataset(df, with_mask=True)[0]
    assert item["image"].shape == (3, 128, 128)
    assert item["image"].dtype == torch.float32
    assert item["image"].min() >= 0.0
    assert item["image"].max() <= 1.0
    assert item["target_mask"].tolist() == [1.0] * len(TARGETS)
    row = df.iloc[0]
    assert item["target"].tolist() == [float(row[t]) for t in TARGETS]
    assert item["mask"].shape == (1, 128, 128)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_split_keeps_lesions_apart_is_stratified_and_seeded(small_study):
    from model.synthetic import SynthConfig, sample_cases

    cases = sample_cases(SynthConfig(n=600, seed=0))
    df = pd.DataFrame(
        {
            "image_id": [c.image_id for c, _ in cases],
            "lesion_id": [c.lesion_id for c, _ in cases],
            "bcc": [c.bcc for c, _ in cases],
        }
    )
    train, val = split_by_lesion(df, val_fraction=0.2, seed=3)
    assert len(set(train) | set(val)) == len(df)
    assert not set(train) & set(val)
    assert not set(df.lesion_id.iloc[train]) & set(df.lesion_id.iloc[val])
    assert 0.17 < len(val) / len(df) < 0.23
    assert abs(df.bcc.iloc[val].mean() - df.bcc.iloc[train].mean()) < 0.04
    again = split_by_lesion(df, val_fraction=0.2, seed=3)
    assert np.array_equal(val, again[1])
    assert not np.array_equal(val, split_by_lesion(df, val_fraction=0.2, seed=4)[1])


def test_soft_targets_override_and_unknown_targets_are_masked(small_study):
    df = load_table(small_study)
    soft = pd.DataFrame({"bcc": 0.25, "ulceration": 0.9}, index=df["image_id"])
    ds = DermDataset(df, targets=soft)
    assert ds[3]["target"][0].item() == pytest.approx(0.25)
    assert ds[3]["target"][TARGETS.index("ulceration")].item() == pytest.approx(0.9)
    partial = soft.iloc[:5]  # images without a consensus get no target for those labels
    ds = DermDataset(df, targets=partial)
    assert ds[10]["target_mask"][0].item() == 0.0
    assert ds[2]["target_mask"][0].item() == 1.0
    with pytest.raises(ValueError, match="unknown target columns \\['melanoma'\\]"):
        DermDataset(df, targets=pd.DataFrame({"melanoma": [0.1]}, index=df["image_id"][:1]))
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        DermDataset(df, targets=pd.DataFrame({"bcc": [1.5]}, index=df["image_id"][:1]))


def _write(root, csv: str, images=("a", "b")):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(root / "images" / f"{name}.png")
    (root / "labels.csv").write_text(csv)
    return root


@pytest.mark.parametrize(
    ("csv", "images", "message"),
    [
        (None, (), "labels.csv not found"),
        ("image_id,age\na,50\n", ("a",), "needs the diagnosis: a column 'bcc'"),
        ("image_id,bcc\n", (), "has no rows"),
        ("image_id,bcc\na,1\na,0\n", ("a",), "more than once: \\['a'\\]"),
        ("image_id,bcc\na,1\nb,2\n", ("a", "b"), "must be 0 or 1; not so for \\['b'\\]"),
        ("image_id,bcc\na,1\nzz,0\n", ("a",), "not found in .*\\['zz'\\]"),
        ('image_id,bcc\na,1\n"b,0\n', ("a", "b"), "not a readable CSV"),
        (
            "image_id,bcc," + ",".join(PATTERN_KEYS) + "\na,1" + ",3" * 7 + "\n",
            ("a",),
            "pattern columns must be 0, 1 or empty",
        ),
    ],
    ids=[
        "no-table",
        "no-bcc",
        "empty",
        "duplicate",
        "bad-label",
        "missing-image",
        "malformed",
        "bad-pattern",
    ],
)
def test_bad_datasets_get_a_clear_error(tmp_path, csv, images, message):
    root = tmp_path / "ds"
    if csv is None:
        root.mkdir()
    else:
        _write(root, csv, images)
    with pytest.raises(DataError, match=message):
        load_table(root)


def test_table_without_lesion_ids_or_masks_still_loads(tmp_path):
    df = load_table(_write(tmp_path, "image_id,bcc\na,1\nb,0\n"))
    assert df.lesion_id.tolist() == ["a", "b"]
    assert df.mask_path.isna().all()
    assert not df.has_patterns.any()
    assert DermDataset(df, with_mask=True)[0]["mask"].sum().item() == 0.0


def test_table_hash_changes_with_targets(small_study):
    df = load_table(small_study)
    other = df.copy()
    other.loc[0, "bcc"] = 1 - other.loc[0, "bcc"]
    assert table_hash(df) == table_hash(df.copy()) != table_hash(other)


def test_split_rejects_bad_fractions_and_too_few_lesions():
    df = pd.DataFrame({"image_id": list("abc"), "lesion_id": list("aab"), "bcc": [0, 0, 1]})
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_by_lesion(df, val_fraction=0.9)
    with pytest.raises(ValueError, match="2 lesions cannot be split 5 ways"):
        split_by_lesion(df, val_fraction=0.2)


def test_real_derm_dev_loads_and_splits_by_lesion(derm_dev):
    df = load_table(derm_dev)
    assert len(df) == 4038
    assert df.bcc.sum() == 207
    assert not df.has_patterns.any()  # HAM10000 has no pattern labels: only the BCC head trains
    assert df.mask_path.notna().all()
    train, val = split_by_lesion(df, val_fraction=0.2, seed=0)
    assert not set(df.lesion_id.iloc[train]) & set(df.lesion_id.iloc[val])
    assert abs(df.bcc.iloc[val].mean() - df.bcc.mean()) < 0.01
    item = DermDataset(df.iloc[val[:1]], with_mask=True)[0]
    assert item["target_mask"].tolist() == [1.0] + [0.0] * len(PATTERN_KEYS)
    assert item["mask"].shape[1:] == item["image"].shape[1:]


def test_regions_are_aligned_with_the_targets_and_move_with_the_image(small_study):
    from PIL import Image
    from torchvision.transforms import v2

    df = load_table(small_study)
    row = df[df.has_patterns & (df.ulceration == 1)].iloc[0]
    i = int(df.index[df.image_id == row.image_id][0])
    item = DermDataset(df, with_regions=True)[i]
    assert item["regions"].shape == (len(TARGETS), 128, 128)
    k = TARGETS.index("ulceration")
    with Image.open(small_study / "masks" / f"{row.image_id}_ulceration.png") as m:
        expected = torch.from_numpy((np.array(m) > 127).astype(np.float32))
    assert torch.equal(item["regions"][k], expected)
    assert item["region_known"][0] == 1 and item["region_known"][k] == 1  # lesion and ulceration masks
    for key in PATTERN_KEYS:
        if row[key] == 0:
            assert (
                item["region_known"][TARGETS.index(key)] == 0
                and item["regions"][TARGETS.index(key)].sum() == 0
            )
    flipped = DermDataset(df, transform=v2.RandomHorizontalFlip(p=1.0), with_regions=True, with_mask=True)[i]
    assert torch.equal(flipped["regions"], item["regions"].flip(-1))
    assert torch.equal(flipped["image"], item["image"].flip(-1))
    assert torch.equal(flipped["mask"][0], item["regions"][0].flip(-1))


def test_a_mask_of_another_size_than_its_image_is_an_error(tmp_path):
    from PIL import Image

    root = _write(tmp_path, "image_id,bcc,mask\na,1,a_segmentation.png\n", images=("a",))
    (root / "masks").mkdir()
    Image.new("L", (4, 4)).save(root / "masks" / "a_segmentation.png")
    with pytest.raises(DataError, match="is 4x4, its image 8x8"):
        DermDataset(load_table(root), with_mask=True)[0]


def test_the_diagnosis_is_derived_from_dx_or_the_isic_words(tmp_path):
    ham = load_table(_write(tmp_path / "ham", "image_id,dx\na,bcc\nb,nv\n"))
    assert ham["bcc"].tolist() == [1, 0]
    isic = load_table(_write(tmp_path / "isic", "image_id,diagnosis\na,basal cell carcinoma\nb,nevus\n"))
    assert isic["bcc"].tolist() == [1, 0]
    assert not isic["synthetic"].any() and isic["source"].iat[0] == "isic"


def test_one_known_pattern_trains_that_head_only(tmp_path):
    """ISIC 2018's attributes: pigment network known (0/1), the six BCC patterns unknown."""
    root = _write(
        tmp_path / "isic", "image_id,diagnosis,pigment_network,globules\na,nevus,1,0\nb,melanoma,0,1\n"
    )
    (root / "masks").mkdir()
    from PIL import Image

    region = np.zeros((8, 8), np.uint8)
    region[2:5, 2:5] = 255
    Image.fromarray(region).save(root / "masks" / "a_pigment_network.png")
    df = load_table(root)
    assert not df["has_patterns"].any()
    ds = DermDataset(df, with_regions=True)
    pn = TARGETS.index("pigment_network")
    known = ds[0]["target_mask"].tolist()
    assert known[0] == 1.0 and known[pn] == 1.0 and sum(known) == 2.0
    assert ds[0]["target"][pn] == 1.0 and ds[1]["target"][pn] == 0.0
    assert ds[0]["region_known"][pn] == 1.0 and ds[0]["regions"][pn].sum() == 9.0


def test_several_folders_keep_each_folders_own_split(tmp_path):
    rng = np.random.default_rng(0)
    ids_a = [f"a{i}" for i in range(60)]
    ids_b = [f"b{i}" for i in range(50)]
    a = _write(
        tmp_path / "ham",
        "image_id,lesion_id,bcc\n" + "".join(f"{i},L{k // 2},{int(k < 16)}\n" for k, i in enumerate(ids_a)),
        ids_a,
    )
    pn = rng.integers(0, 2, len(ids_b))
    b = _write(
        tmp_path / "isic",
        "image_id,diagnosis,pigment_network\n"
        + "".join(f"{i},nevus,{p}\n" for i, p in zip(ids_b, pn, strict=True)),
        ids_b,
    )
    both = load_tables([a, b])
    assert both["lesion_id"].str.startswith(("ham:", "isic:")).all()  # no lesion id shared across folders
    _, val = split_sources(both, 0.2, seed=0)
    alone_a = load_table(a)
    _, val_a = split_by_lesion(alone_a, 0.2, seed=0)  # the single-folder split of earlier runs
    _, val_b = split_sources(load_table(b), 0.2, seed=0)
    chosen = set(both["image_id"].iloc[val])
    assert chosen == set(alone_a["image_id"].iloc[val_a]) | set(load_table(b)["image_id"].iloc[val_b])
    isic_val = both.iloc[val].query("source == 'isic'")
    assert 0 < isic_val["pigment_network"].sum() < len(isic_val)  # stratified by pigment network
    with pytest.raises(DataError, match="more than one folder"):
        load_tables([a, _write(tmp_path / "copy" / "ham2", "image_id,bcc\na0,1\n", ["a0"])])


def test_a_tiny_table_without_both_diagnoses_still_splits():
    """A retraining job's first few consensus items may all be non-BCC, with a pattern too rare to
    stratify by: the split falls back to the diagnosis, as it always did."""
    df = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(8)],
            "lesion_id": [f"i{k}" for k in range(8)],
            "bcc": [0.0] * 8,
            "pigment_network": [1.0, 0, 1, 0, 1, 0, 1, 0],
        }
    )
    train, val = split_sources(df, 0.2, seed=0)
    assert len(train) + len(val) == 8 and len(val) >= 1
