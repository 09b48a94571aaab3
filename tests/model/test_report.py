"""The one report writer: system templates on the common page, autoescaped, figures inlined."""

import base64

import numpy as np

from model.common.report import confusion_png, figure_png, pyplot, render, write_report


def test_figures_are_inlined_as_png():
    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [0, 1])
    assert base64.b64decode(figure_png(fig)).startswith(b"\x89PNG")
    assert base64.b64decode(confusion_png(np.array([[3, 1], [0, 4]]), ["a", "b"], "t")).startswith(b"\x89PNG")


def test_the_dual_encoder_report_extends_the_common_page_and_escapes_what_it_shows(tmp_path):
    interval = {"value": 0.8, "low": 0.7, "high": 0.9}
    result = {
        "checkpoint": "<script>alert(1)</script>.pt", "n": 12, "split": "val", "lesion_masks": "reference",
        "balanced_accuracy": interval, "auroc_macro": interval, "auroc_bcc": None,
        "auroc_per_class": {"bcc": 0.91}, "model": {"backbone": "mobilenet_v2"},
        "bootstrap": {"text": "bootstrap over 9 lesions (12 images)", "replicates": 1000},
    }  # fmt: skip
    write_report(
        tmp_path / "report.html", "model.lesion", "dual_evaluation.html", result=result, model="{}",
        cam={"n": 0}, confusion="AAAA", gallery=None,
    )  # fmt: skip
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "0.800 <small>[0.700, 0.900]</small>" in page and "n/a" in page and "0.910" in page
    assert "font-family:system-ui" in page  # the common page's style
    assert "95% bootstrap over 9 lesions (12 images), 1000 replicates" in page
    assert 'src="data:image/png;base64,AAAA"' in page
    multitask = render("model.multitask", "evaluation.html", meta={}, cls={}, criteria={}, figures=["BBBB"])
    assert "font-family:system-ui" in multitask and "data:image/png;base64,BBBB" in multitask
