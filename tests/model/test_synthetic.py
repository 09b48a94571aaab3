"""Synthetic dermoscopy: deterministic, realistic where it matters, raters with known error rates."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from labeling_config import PATTERN_KEYS, TARGETS, bcc_consistent
from model.synthetic import (
    Case,
    RaterProfile,
    SynthConfig,
    contact_sheet,
    draw_rater_quality,
    generate,
    render,
    sample_cases,
    simulate_ratings,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img) > 127


def test_same_seed_gives_byte_identical_files(tmp_path):
    config = SynthConfig(n=24, size=128, raters=4, seed=1)
    generate(config, tmp_path / "a")
    generate(config, tmp_path / "b")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b
    assert len(a) > 24 * 2  # images, lesion masks, pattern masks, rater regions, tables


def test_other_seed_gives_other_images(tmp_path):
    generate(SynthConfig(n=4, size=96, raters=0, seed=1), tmp_path / "a")
    generate(SynthConfig(n=4, size=96, raters=0, seed=2), tmp_path / "b")
    img = "images/SYN_000000.jpg"
    assert (tmp_path / "a" / img).read_bytes() != (tmp_path / "b" / img).read_bytes()


def test_image_i_does_not_depend_on_n(tmp_path):
    generate(SynthConfig(n=6, size=96, raters=0, seed=3), tmp_path / "small")
    generate(SynthConfig(n=10, size=96, raters=0, seed=3), tmp_path / "large")
    for i in range(6):
        name = f"images/SYN_{i:06d}.jpg"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "large" / name).read_bytes()


def test_layout_matches_derm_dev_plus_ratings(small_study):
    labels = pd.read_csv(small_study / "labels.csv")
    assert len(labels) == 40
    for column in ("image_id", "lesion_id", "dx", "bcc", "age", "sex", "localization", "mask", *PATTERN_KEYS):
        assert column in labels.columns
    for row in labels.itertuples():
        assert (small_study / "images" / f"{row.image_id}.jpg").is_file()
        assert (small_study / "masks" / row.mask).is_file()
        for key in PATTERN_KEYS:
            assert (small_study / "masks" / f"{row.image_id}_{key}.png").is_file() == bool(getattr(row, key))
    ratings = pd.read_csv(small_study / "ratings.csv")
    assert list(ratings.columns) == ["image_id", "rater", "label", "value"]
    assert set(ratings["label"]) == set(TARGETS)
    assert set(ratings["value"]) <= {0, 1}
    # One region per pattern a rater reported, and none other.
    reported = ratings[(ratings["value"] == 1) & ratings["label"].isin(PATTERN_KEYS)]
    files = {
        p.relative_to(small_study / "regions").as_posix() for p in (small_study / "regions").rglob("*.png")
    }
    assert files == {f"{r.rater}/{r.image_id}_{r.label}.png" for r in reported.itertuples()}


def test_every_pattern_mask_lies_inside_the_lesion_and_contact_sheet_renders(small_study, tmp_path):
    labels = pd.read_csv(small_study / "labels.csv")
    checked = 0
    for row in labels.itertuples():
        lesion = _mask(small_study / "masks" / row.mask)
        assert lesion.mean() > 0.05
        for key in PATTERN_KEYS:
            path = small_study / "masks" / f"{row.image_id}_{key}.png"
            if path.exists():
                mask = _mask(path)
                assert mask.any(), f"{path.name} is empty"
                assert not (mask & ~lesion).any(), f"{path.name} leaves the lesion"
                checked += 1
    assert checked >= 40
    sheet = contact_sheet(small_study, columns=4, tile=128)
    out = tmp_path / "contact_sheet.png"
    sheet.save(out)
    with Image.open(out) as written:
        assert written.size == (4 * 128, 4 * (128 + 14))
    # The outlines are drawn: the sheet has the ulceration colour somewhere.
    assert (np.asarray(sheet) == (0xE4, 0x57, 0x2E)).all(axis=-1).any()


def _case(**patterns: int) -> Case:
    present = {key: int(patterns.get(key, 0)) for key in PATTERN_KEYS}
    bcc = int(bcc_consistent(present))
    return Case("SYN_000000", "SYNL_000000", bool(bcc), present, bcc, 60.0, "male", "face")


def _colour_inside(key: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB inside the pattern's mask and in the rest of the lesion."""
    r = render(_case(**{key: 1}), [seed, 0], [seed, 1], 256)
    img = r.image.astype(float) / 255
    mask = r.patterns[key]
    rest = r.lesion & ~mask
    return img[mask].mean(axis=0), img[rest].mean(axis=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patterns_look_like_what_dermatologists_look_for(seed):
    # Ulceration and vessels are redder than the rest of the lesion.
    for key in ("ulceration", "arborizing_telangiectasia"):
        inside, rest = _colour_inside(key, seed)
        assert inside[0] - inside[2] > rest[0] - rest[2] + 0.05, key
    # Nests and globules are bluer (blue-grey).
    for key in ("ovoid_nests", "multiple_globules"):
        inside, rest = _colour_inside(key, seed)
        assert inside[2] - inside[0] > rest[2] - rest[0] + 0.03, key
    # Pigment network and spoke wheels are darker.
    for key in ("pigment_network", "spoke_wheel"):
        inside, rest = _colour_inside(key, seed)
        assert inside.mean() < rest.mean() - 0.02, key


def test_pigment_network_is_a_textured_grid_and_maple_leaf_sits_on_the_rim():
    r = render(_case(pigment_network=1), [5, 0], [5, 1], 256)
    grey = r.image.astype(float).mean(axis=-1)
    net = r.patterns["pigment_network"]
    plain = render(_case(), [5, 0], [5, 1], 256)
    plain_grey = plain.image.astype(float).mean(axis=-1)
    # The reticular grid makes strong local contrast where plain lesion skin has little.
    assert (
        np.abs(np.diff(grey, axis=1))[net[:, 1:]].mean()
        > 2 * np.abs(np.diff(plain_grey, axis=1))[net[:, 1:]].mean()
    )

    r = render(_case(maple_leaf=1), [6, 0], [6, 1], 256)
    from model.synthetic import dilate

    rim = r.lesion & ~dilate(r.lesion, -12)
    leaf = r.patterns["maple_leaf"]
    assert (leaf & rim).sum() / leaf.sum() > 0.7


def test_diagnosis_follows_the_criterion_up_to_the_noise_rate():
    exact = sample_cases(SynthConfig(n=400, label_noise=0.0, seed=0))
    assert all(c.bcc == int(bcc_consistent(c.patterns)) for c, _ in exact)
    noisy = sample_cases(SynthConfig(n=3000, label_noise=0.1, seed=0))
    flipped = np.mean([c.bcc != int(bcc_consistent(c.patterns)) for c, _ in noisy])
    assert 0.08 < flipped < 0.12


def test_metadata_depends_on_diagnosis_as_in_the_literature():
    cases = pd.DataFrame([c.__dict__ for c, _ in sample_cases(SynthConfig(n=3000, seed=0))])
    bcc, other = cases[cases.bcc == 1], cases[cases.bcc == 0]
    assert bcc.age.mean() > other.age.mean() + 12
    head = ["face", "scalp", "ear", "neck"]
    assert bcc.site.isin(head).mean() > 2 * other.site.isin(head).mean()
    assert (bcc.sex == "male").mean() > (other.sex == "male").mean()
    assert set(cases.age.dropna() % 5) == {0.0}


def test_some_lesions_have_two_images_with_the_same_lesion_rotated(tmp_path):
    cases = sample_cases(SynthConfig(n=200, seed=0))
    lesions = pd.Series([c.lesion_id for c, _ in cases])
    assert 0.1 < (lesions.value_counts() == 2).mean() < 0.35
    generate(SynthConfig(n=30, size=96, raters=0, seed=0), tmp_path)
    labels = pd.read_csv(tmp_path / "labels.csv")
    pair = labels[labels.lesion_id.duplicated(keep=False)].groupby("lesion_id").image_id.apply(list).iloc[0]
    a, b = (_mask(tmp_path / "masks" / f"{i}_segmentation.png") for i in pair)
    assert a.sum() == b.sum()


def test_simulated_raters_have_their_configured_error_rates():
    rng = np.random.default_rng(0)
    truth = pd.DataFrame({"image_id": [f"i{i}" for i in range(20000)]})
    for t in TARGETS:
        truth[t] = (rng.random(len(truth)) < 0.4).astype(int)
    profile = RaterProfile(sensitivity=(0.6, 0.95), specificity=(0.7, 0.99), missing=0.2)
    quality = draw_rater_quality(5, profile, seed=0)
    ratings = simulate_ratings(truth, quality, profile.missing, seed=0)
    merged = ratings.merge(
        truth.melt("image_id", var_name="label", value_name="truth"), on=["image_id", "label"]
    )
    for row in quality.itertuples():
        answers = merged[(merged.rater == row.rater) & (merged.label == row.label)]
        sens = answers[answers.truth == 1].value.mean()
        spec = 1 - answers[answers.truth == 0].value.mean()
        assert abs(sens - row.sensitivity) < 0.03
        assert abs(spec - row.specificity) < 0.03
    per_image = ratings.groupby("image_id").rater.nunique()
    assert len(per_image) == len(truth)  # every image keeps at least one rater
    assert 0.17 < 1 - per_image.mean() / 5 < 0.23
    # A rater answers every target of an image or none.
    assert (ratings.groupby(["image_id", "rater"]).size() == len(TARGETS)).all()


def test_rater_regions_overlap_the_truth(small_study):
    ratings = pd.read_csv(small_study / "ratings.csv")
    labels = pd.read_csv(small_study / "labels.csv").set_index("image_id")
    hits = ratings[(ratings.value == 1) & ratings.label.isin(PATTERN_KEYS)]
    ious = []
    for r in hits.itertuples():
        if labels.loc[r.image_id, r.label] == 1:
            truth = _mask(small_study / "masks" / f"{r.image_id}_{r.label}.png")
            region = _mask(small_study / "regions" / r.rater / f"{r.image_id}_{r.label}.png")
            ious.append((truth & region).sum() / (truth | region).sum())
    assert len(ious) > 20
    assert 0.35 < np.median(ious) < 0.98  # jittered, not copied


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be at least 1"),
        ({"size": 16}, "size must be between 64 and 4096"),
        ({"raters": -1}, "raters must be >= 0"),
        ({"prevalence": 1.5}, "prevalence must be in"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sensitivity": (0.9, 0.8)}, "sensitivity range"),
        ({"specificity": (0.5, 1.2)}, "specificity range"),
        ({"missing": 1.0}, "missing must be in"),
    ],
)
def test_bad_rater_profile_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RaterProfile(**kwargs)


def test_regenerating_replaces_a_larger_study_and_refuses_foreign_folders(tmp_path):
    generate(SynthConfig(n=8, size=96, raters=2, seed=0), tmp_path / "s")
    generate(SynthConfig(n=3, size=96, raters=2, seed=0), tmp_path / "s")
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no synthetic study"):
        generate(SynthConfig(n=2, size=96), foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
