"""The truth of a synthetic study: which patterns each lesion shows, its diagnosis and metadata.

Generation, per lesion: a latent class (BCC with probability ``prevalence``) draws the patterns
(BCC lesions rarely show pigment network and show at least one BCC pattern; other lesions mostly show
pigment network and rarely a BCC pattern); the diagnosis label is the clinical criterion
(:func:`labeling_config.bcc_consistent`) flipped with probability ``label_noise``; age, sex and site
depend on the diagnosis as in the BCC literature (older patients, more men, head and neck).
Some lesions get a second image (another orientation and other hairs), so splits must be grouped
by ``lesion_id``, as with HAM10000.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from labeling_config import BCC_PATTERNS, PATTERN_KEYS, bcc_consistent

# P(pattern present | latent class). BCC lesions need at least one BCC pattern (enforced below).
_P_PATTERN_BCC = {
    "pigment_network": 0.04,
    "ulceration": 0.45,
    "ovoid_nests": 0.45,
    "multiple_globules": 0.35,
    "maple_leaf": 0.30,
    "spoke_wheel": 0.22,
    "arborizing_telangiectasia": 0.60,
}
_P_PATTERN_OTHER = {key: (0.75 if key == "pigment_network" else 0.06) for key in PATTERN_KEYS}

# Anatomical sites (HAM10000 vocabulary) and their frequency by diagnosis.
_SITES_BCC = {
    "face": 0.34, "back": 0.12, "trunk": 0.09, "neck": 0.08, "chest": 0.08,
    "upper extremity": 0.08, "scalp": 0.06, "ear": 0.05, "lower extremity": 0.05, "abdomen": 0.05,
}  # fmt: skip
_SITES_OTHER = {
    "back": 0.28, "lower extremity": 0.20, "trunk": 0.14, "upper extremity": 0.10, "abdomen": 0.10,
    "chest": 0.05, "face": 0.05, "foot": 0.03, "neck": 0.02, "hand": 0.01, "scalp": 0.01, "ear": 0.01,
}  # fmt: skip


@dataclass(frozen=True)
class RaterProfile:
    """How the simulated dermatologists err.

    Attributes:
        sensitivity: range from which each (rater, target) sensitivity is drawn uniformly.
        specificity: range from which each (rater, target) specificity is drawn uniformly.
        missing: probability that a rater skips an image.
        region_jitter: standard deviation of the shift of a rater's region, as a fraction of the size.
    """

    sensitivity: tuple[float, float] = (0.75, 0.95)
    specificity: tuple[float, float] = (0.85, 0.98)
    missing: float = 0.1
    region_jitter: float = 0.02

    def __post_init__(self) -> None:
        for name in ("sensitivity", "specificity"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} range must satisfy 0 <= low <= high <= 1, got {low}, {high}")
        if not 0.0 <= self.missing < 1.0:
            raise ValueError(f"missing must be in [0, 1), got {self.missing}")
        if not 0.0 <= self.region_jitter <= 0.5:
            raise ValueError(f"region_jitter must be in [0, 0.5], got {self.region_jitter}")


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`generate` draws.

    Attributes:
        n: number of images.
        size: width and height in pixels.
        raters: number of simulated dermatologists (0 for none).
        seed: the seed; the same seed gives byte-identical files.
        prevalence: share of lesions whose latent class is BCC.
        label_noise: probability that the diagnosis label contradicts the clinical criterion.
        second_image: probability that a lesion gets a second image.
        rater: the raters' error profile.
    """

    n: int = 500
    size: int = 256
    raters: int = 4
    seed: int = 0
    prevalence: float = 0.4
    label_noise: float = 0.02
    second_image: float = 0.2
    rater: RaterProfile = field(default_factory=RaterProfile)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 64 <= self.size <= 4096:
            raise ValueError(f"size must be between 64 and 4096 pixels, got {self.size}")
        if self.raters < 0:
            raise ValueError(f"raters must be >= 0, got {self.raters}")
        for name in ("prevalence", "label_noise", "second_image"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class Case:
    """The truth of one image: what is drawn, the diagnosis and the metadata."""

    image_id: str
    lesion_id: str
    latent_bcc: bool
    patterns: dict[str, int]
    bcc: int
    age: float | None
    sex: str
    site: str


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_patterns(rng: np.random.Generator, latent_bcc: bool) -> dict[str, int]:
    """Draw which of the seven patterns a lesion shows, given its latent class."""
    probs = _P_PATTERN_BCC if latent_bcc else _P_PATTERN_OTHER
    present = {key: int(rng.random() < probs[key]) for key in PATTERN_KEYS}
    if latent_bcc and not any(present[k] for k in BCC_PATTERNS):
        present[_choice(rng, {k: _P_PATTERN_BCC[k] for k in BCC_PATTERNS})] = 1
    return present


def sample_metadata(rng: np.random.Generator, bcc: int) -> tuple[float | None, str, str]:
    """Age (5-year bins, as HAM10000; missing in 1%), sex and site, given the diagnosis."""
    mean, sd = (68.0, 11.0) if bcc else (47.0, 16.0)
    age: float | None = float(5 * round(float(np.clip(rng.normal(mean, sd), 5, 90)) / 5))
    if rng.random() < 0.01:
        age = None
    sex = "male" if rng.random() < (0.58 if bcc else 0.5) else "female"
    site = _choice(rng, _SITES_BCC if bcc else _SITES_OTHER)
    return age, sex, site


def sample_cases(config: SynthConfig) -> list[tuple[Case, int]]:
    """The truth of every image, with the index of the lesion it shows (lesions share geometry)."""
    cases: list[tuple[Case, int]] = []
    lesion = 0
    while len(cases) < config.n:
        rng = np.random.default_rng([config.seed, 0, lesion])
        latent = bool(rng.random() < config.prevalence)
        patterns = sample_patterns(rng, latent)
        consistent = bcc_consistent(patterns)
        bcc = int(consistent != (rng.random() < config.label_noise))
        age, sex, site = sample_metadata(rng, bcc)
        views = 2 if rng.random() < config.second_image else 1
        for _ in range(min(views, config.n - len(cases))):
            case = Case(
                image_id=f"SYN_{len(cases):06d}",
                lesion_id=f"SYNL_{lesion:06d}",
                latent_bcc=latent,
                patterns=patterns,
                bcc=bcc,
                age=age,
                sex=sex,
                site=site,
            )
            cases.append((case, lesion))
        lesion += 1
    return cases
