"""HTML pieces shared by the study report and the readers' pages: tables, templates, intervals."""

from __future__ import annotations

from typing import Any

import pandas as pd


def table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    """A table as HTML (numbers at ``digits`` decimals, gaps as ``-``), or "none" for an empty one."""
    if frame.empty:
        return "<p>none</p>"
    # Nullable integer columns (counts with gaps) print <NA> whatever na_rep says.
    nullable = [c for c in frame.columns if isinstance(frame[c].dtype, pd.Int64Dtype)]
    frame = frame.astype(dict.fromkeys(nullable, object))
    frame[nullable] = frame[nullable].where(frame[nullable].notna(), "-")
    return frame.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="-", border=0)


def render(template: str, **values: Any) -> str:
    """A page from ``consensus/templates`` (Jinja2, autoescaped: values are text unless ``Markup``)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    environment = Environment(loader=PackageLoader("consensus"), autoescape=select_autoescape(["html"]))
    return environment.get_template(template).render(**values)


def with_interval(value: Any, low: Any, high: Any, digits: int = 2) -> str:
    """``0.91 [0.80, 0.96]``; the value alone without an interval; ``-`` without a value."""
    if value is None or pd.isna(value):
        return "-"
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
