"""Synthetic dermoscopy and simulated dermatologists with known truth (see :mod:`model.synthetic.study`).

For tests and for what real data cannot give (known truth for every rater, pattern and region). No
served model imports this package.
"""

from model.synthetic.study import (
    Case,
    RaterProfile,
    Rendered,
    StudySummary,
    SynthConfig,
    _dilate,
    contact_sheet,
    draw_rater_quality,
    generate,
    rater_ids,
    rater_region,
    render,
    sample_cases,
    sample_metadata,
    sample_patterns,
    simulate_ratings,
)

__all__ = [
    "Case",
    "RaterProfile",
    "Rendered",
    "StudySummary",
    "SynthConfig",
    "_dilate",
    "contact_sheet",
    "draw_rater_quality",
    "generate",
    "rater_ids",
    "rater_region",
    "render",
    "sample_cases",
    "sample_metadata",
    "sample_patterns",
    "simulate_ratings",
]
