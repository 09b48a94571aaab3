"""Label Studio labeling configs and the one vocabulary of dermassist.

``bcc.xml`` and ``lesion.xml`` are the shipped configs; :mod:`labeling_config.schema` holds the
label keys, display names, head order and the clinical criterion; :func:`parse_config` maps any
project's config onto the model's outputs.
"""

from importlib import resources

from labeling_config.parse import ConfigError, Control, ProjectConfig, Role, normalize, parse_config
from labeling_config.schema import (
    BCC,
    BCC_PATTERNS,
    DIAGNOSES,
    DIAGNOSIS_KEY,
    EXCLUSION_PATTERN,
    HAM_CLASSES,
    HAM_DIAGNOSES,
    LESION_LABEL,
    METADATA_FIELDS,
    NON_BCC,
    PATTERN_KEYS,
    PATTERN_NAMES,
    PATTERNS,
    SEXES,
    SITES,
    TARGET_NAMES,
    TARGETS,
    Pattern,
    bcc_consistent,
)

CONFIG_NAMES = ("bcc", "lesion", "bcc_lesion")


def load_config(name: str) -> str:
    """The XML text of a shipped labeling config (``"bcc"``, ``"lesion"`` or ``"bcc_lesion"``: bcc.xml with
    the lesion outline).

    Raises:
        ValueError: for a name that is not a shipped config.
    """
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown labeling config {name!r}; choose one of {list(CONFIG_NAMES)}")
    return resources.files(__name__).joinpath(f"{name}.xml").read_text(encoding="utf-8")


__all__ = [
    "BCC",
    "BCC_PATTERNS",
    "CONFIG_NAMES",
    "DIAGNOSES",
    "DIAGNOSIS_KEY",
    "EXCLUSION_PATTERN",
    "HAM_CLASSES",
    "HAM_DIAGNOSES",
    "LESION_LABEL",
    "METADATA_FIELDS",
    "NON_BCC",
    "PATTERNS",
    "PATTERN_KEYS",
    "PATTERN_NAMES",
    "SEXES",
    "SITES",
    "TARGETS",
    "TARGET_NAMES",
    "ConfigError",
    "Control",
    "Pattern",
    "ProjectConfig",
    "Role",
    "bcc_consistent",
    "load_config",
    "normalize",
    "parse_config",
]
