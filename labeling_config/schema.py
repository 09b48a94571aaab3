"""The one vocabulary of dermassist: label keys, display names, head order, the clinical criterion.

Everything else (model heads, SQL rows, predictions, exports) is derived from the constants here.
Keys are stable identifiers (snake_case, used in code, SQL and files); display names are what a
dermatologist sees in Label Studio. A project may rename its controls or drop some of them: the
backend then maps model outputs onto the project's own config with :func:`labeling_config.parse_config`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


class Role(enum.StrEnum):
    """What a dermoscopic pattern says about BCC in the dermatologists' criterion."""

    EXCLUSION = "exclusion"  # its presence argues against BCC
    BCC = "bcc"  # one of the six patterns that argue for BCC


@dataclass(frozen=True)
class Pattern:
    """One dermoscopic pattern: stable key, name shown in Label Studio, role in the criterion.

    ``colour`` is the brush colour of its region in the shipped configs and in plots.
    """

    key: str
    display: str
    role: Role
    description: str
    colour: str


#: The seven dermoscopic patterns of Matas et al. (arXiv:2407.00104), in model head order.
PATTERNS: Final[tuple[Pattern, ...]] = (
    Pattern(
        "pigment_network",
        "Pigment network",
        Role.EXCLUSION,
        "reticular brown grid of lines over a lighter background",
        "#8B5A2B",
    ),
    Pattern(
        "ulceration",
        "Ulceration",
        Role.BCC,
        "red-orange structureless area, often with a dark red-brown crust",
        "#E4572E",
    ),
    Pattern(
        "ovoid_nests",
        "Blue-grey ovoid nests",
        Role.BCC,
        "large, well-defined blue-grey ovoid structures",
        "#4C6A92",
    ),
    Pattern(
        "multiple_globules",
        "Multiple blue-grey globules",
        Role.BCC,
        "many small round blue-grey dots",
        "#7A8FB8",
    ),
    Pattern(
        "maple_leaf",
        "Maple leaf-like areas",
        Role.BCC,
        "brown to blue-grey bulbous, leaf-like projections at the lesion rim",
        "#A0522D",
    ),
    Pattern(
        "spoke_wheel",
        "Spoke wheel areas",
        Role.BCC,
        "radial projections meeting at a darker central hub",
        "#6B4C9A",
    ),
    Pattern(
        "arborizing_telangiectasia",
        "Arborizing telangiectasia",
        Role.BCC,
        "sharply focused, branching red vessels",
        "#D7263D",
    ),
)

PATTERN_KEYS: Final[tuple[str, ...]] = tuple(p.key for p in PATTERNS)
PATTERN_NAMES: Final[dict[str, str]] = {p.key: p.display for p in PATTERNS}
EXCLUSION_PATTERN: Final[str] = next(p.key for p in PATTERNS if p.role is Role.EXCLUSION)
BCC_PATTERNS: Final[tuple[str, ...]] = tuple(p.key for p in PATTERNS if p.role is Role.BCC)

#: Diagnosis choice values, positive class first.
BCC: Final[str] = "BCC"
NON_BCC: Final[str] = "non-BCC"
DIAGNOSES: Final[tuple[str, str]] = (BCC, NON_BCC)

#: Key of the diagnosis target (binary: 1 = BCC).
DIAGNOSIS_KEY: Final[str] = "bcc"

#: Every binary target, in the model's output order: diagnosis first, then the seven patterns.
TARGETS: Final[tuple[str, ...]] = (DIAGNOSIS_KEY, *PATTERN_KEYS)
TARGET_NAMES: Final[dict[str, str]] = {DIAGNOSIS_KEY: BCC, **PATTERN_NAMES}

#: HAM10000's seven diagnoses (lesion.xml), in head order, with their full names.
HAM_DIAGNOSES: Final[dict[str, str]] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
HAM_CLASSES: Final[tuple[str, ...]] = tuple(HAM_DIAGNOSES)

#: Label of the lesion region in lesion.xml.
LESION_LABEL: Final[str] = "Lesion"

#: Patient metadata read from task data (lesion.xml), and HAM10000's vocabulary for each.
METADATA_FIELDS: Final[tuple[str, ...]] = ("age", "sex", "site")
SEXES: Final[tuple[str, ...]] = ("male", "female", "unknown")
SITES: Final[tuple[str, ...]] = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
    "unknown",
)


def bcc_consistent(present: Mapping[str, bool | int | float]) -> bool:
    """The dermatologists' criterion: pigment network absent and at least one BCC pattern present.

    Args:
        present: pattern key -> presence (truthy = present). Keys not given count as absent.

    Returns:
        True when the pattern set is consistent with BCC.

    Raises:
        ValueError: for a key that is not one of the seven patterns.
    """
    unknown = set(present) - set(PATTERN_KEYS)
    if unknown:
        raise ValueError(f"unknown pattern keys {sorted(unknown)}; expected some of {list(PATTERN_KEYS)}")
    if present.get(EXCLUSION_PATTERN, False):
        return False
    return any(bool(present.get(key, False)) for key in BCC_PATTERNS)


# Acquisition strategies (which image to label next; model.common.acquisition computes them): chosen
# per deployment (``ACQUISITION``) or per project (``<Image acquisition="...">`` in the labeling config).
ACQUISITION_STRATEGIES: Final[tuple[str, ...]] = ("least_confidence", "entropy", "bald", "tta")
