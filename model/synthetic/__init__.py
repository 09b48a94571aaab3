"""Synthetic dermoscopy and simulated dermatologists with known truth.

For tests and for what real data cannot give (known truth for every rater, pattern and region). No
served model imports this package. Its parts: :mod:`~model.synthetic.cases` (the truth of each
lesion: patterns, diagnosis, metadata), :mod:`~model.synthetic.painter` (the images and masks),
:mod:`~model.synthetic.raters` (simulated dermatologists) and :mod:`~model.synthetic.study` (a study
folder in the derm-dev layout, and a contact sheet of it).
"""

from model.synthetic.cases import (
    Case,
    RaterProfile,
    SynthConfig,
    sample_cases,
    sample_metadata,
    sample_patterns,
)
from model.synthetic.painter import Rendered, dilate, render
from model.synthetic.raters import draw_rater_quality, rater_ids, rater_region, simulate_ratings
from model.synthetic.study import StudySummary, contact_sheet, generate

__all__ = [
    "Case",
    "RaterProfile",
    "Rendered",
    "StudySummary",
    "SynthConfig",
    "contact_sheet",
    "dilate",
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
