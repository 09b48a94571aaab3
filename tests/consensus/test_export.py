"""Study export: per image consensus + every rater, reliability, agreement; traceable to the run."""

import json

import pandas as pd
import pytest

from consensus.db import init_db
from consensus.export import build_study, calibration, to_json, write_csv, write_report
from consensus.repository import import_ratings
from consensus.service import run_consensus
from labeling_config import TARGETS


@pytest.fixture
def study_db(tmp_path, small_study):
    engine, sessions = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    with sessions.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
    with sessions.begin() as session:
        run_consensus(session)
    yield sessions
    engine.dispose()


def test_the_study_table_holds_consensus_raters_and_the_criterion(study_db, small_study):
    with study_db() as session:
        study = build_study(session)
    c = study.consensus
    assert len(c) == 40 and c.index.name == "image_id"
    for key in TARGETS:
        assert set(c[key].dropna().unique()) <= {0, 1}
        assert c[f"{key}_posterior"].between(0, 1).all()
        # The posterior is that of the positive class: consensus 1 <=> posterior >= 0.5.
        assert ((c[f"{key}_posterior"] >= 0.5) == (c[key] == 1)).all()
    assert "criterion_bcc" in c and c["criterion_agrees"].mean() > 0.8
    assert {"derm1:bcc", "derm4:ulceration"} <= set(study.ratings.columns)
    assert list(study.agreement.label_key) == list(TARGETS)
    assert study.agreement[["percent_agreement", "fleiss_kappa", "krippendorff_alpha"]].notna().all().all()
    assert len(study.reliability) == 4 * len(TARGETS)
    assert set(study.vs_consensus.worker) == {"derm1", "derm2", "derm3", "derm4"}
    assert study.run["params"]["candidates"]["full"]["smoothing"] == 0.1
    assert not study.answers_changed and not study.notes


def test_files_and_documents(study_db, small_study, tmp_path):
    with study_db() as session:
        study = build_study(session)
    written = write_csv(study, tmp_path / "csv")
    # No regions and no gold in this run: their files are left out; the rater model chosen per label is in.
    assert {p.name for p in written} == {"consensus.csv", "rater_reliability.csv", "agreement.csv",
                                         "pairwise_kappa.csv", "rater_vs_consensus.csv", "exposure.csv",
                                         "paired_reads.csv", "paired_summary.csv", "rater_models.csv",
                                         "run.json"}  # fmt: skip
    table = pd.read_csv(tmp_path / "csv" / "consensus.csv")
    assert len(table) == 40 and "bcc_posterior" in table and "derm2:spoke_wheel" in table
    doc = json.loads(json.dumps(to_json(study)))  # plain JSON, no NaN objects left
    assert doc["run"]["id"] == 1 and len(doc["images"]) == 40 and len(doc["rater_reliability"]) == 32
    truth = pd.read_csv(small_study / "labels.csv").set_index("image_id")
    assert calibration(study, truth)["n"].sum() == 40 * len(TARGETS)
    html = write_report(study, tmp_path / "report.html", truth).read_text()
    assert html.count("data:image/png;base64,") == 4  # reliability, kappa matrix, prevalence, calibration
    assert "Criterion consistency" in html and "run 1" in html


def test_a_store_changed_after_the_run_is_flagged_and_a_missing_run_is_an_error(
    study_db, small_study, tmp_path
):
    ratings = pd.read_csv(small_study / "ratings.csv")
    ratings.loc[0, "value"] = 1 - ratings.loc[0, "value"]
    with study_db.begin() as session:
        import_ratings(session, ratings)
    with study_db() as session:
        study = build_study(session)
        assert study.answers_changed and "changed after run 1" in study.notes[0]
        with pytest.raises(ValueError, match="no consensus run with id 7"):
            build_study(session, 7)
    engine, empty = init_db(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with empty() as session, pytest.raises(ValueError, match="no consensus run in the store"):
        build_study(session)
    engine.dispose()


def test_the_report_says_where_each_models_output_comes_from(study_db, tmp_path):
    from consensus.models import ModelOutput, ModelStatus, ModelVersion

    with study_db.begin() as session:
        session.add(
            ModelVersion(
                version="dermnet-0123456789ab",
                path="x.pt",
                status=ModelStatus.PROMOTED,
                release="2026.12/dermnet-bcc",
                outputs=[
                    ModelOutput(output="bcc", status="validated", metric="auroc", value=0.97, n_positive=42,
                                n_images=808, data="derm-dev validation split"),
                    ModelOutput(output="ulceration", status="untrained"),
                ],
            )
        )  # fmt: skip
    with study_db() as session:
        study = build_study(session)
    assert study.models[["output", "provenance"]].values.tolist() == [
        ["bcc", "validated"],
        ["ulceration", "untrained"],
    ]
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "where each output comes from" in html and "auroc 0.970" in html and "2026.12/dermnet-bcc" in html


def test_the_report_escapes_what_it_is_given(study_db, tmp_path):
    with study_db() as session:
        study = build_study(session)
    study.notes.append('<script>alert("x")</script>')
    page = write_report(study, tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<table" in page  # the tables themselves are markup, not text


def test_a_study_without_predictions_says_so_plainly(study_db, tmp_path):
    with study_db() as session:
        study = build_study(session)
    summary = study.exposure_summary
    reads = summary["reads"]  # one per rater and image rated
    assert reads > 100 and (summary["assisted"], summary["blind"], summary["pairs"]) == (0, reads, 0)
    unassisted = study.exposure[study.exposure["arm"] == "unassisted"]
    assert unassisted["n_with_prediction"].eq(0).all() and unassisted["agree_consensus"].between(0.5, 1).all()
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "<h2>AI exposure</h2>" in html and f"No read started from a prediction</b> ({reads} reads" in html
    assert to_json(study)["exposure"]["assisted"] == 0


def test_the_rater_model_per_label_is_reported_with_every_candidate(study_db, tmp_path):
    with study_db() as session:
        study = build_study(session)
    models = study.rater_models
    assert len(models) == 4 * len(TARGETS) and models.groupby("label_key")["chosen"].sum().eq(1).all()
    for key in TARGETS:
        selection = study.run["convergence"][key]["selection"]
        rows = models[models["label_key"] == key].set_index("candidate")
        assert rows.index[rows["chosen"]].tolist() == [selection["choice"]]
        assert rows["heldout_loglik_per_answer"].to_dict() == selection["scores"]
        assert rows.loc[selection["choice"], "se_of_difference_to_choice"] == 0
        # The choice has the highest held-out likelihood.
        assert rows["heldout_loglik_per_answer"].idxmax() == selection["choice"]
    html = write_report(study, tmp_path / "report.html").read_text()
    section = html[html.index('<h2 id="rater-model">') : html.index('<h2 id="gold">')]
    assert "mean held-out answer log-likelihood, 5-fold" in section and "(chosen)" in section
    assert section.count("(SE ") == 3 * len(TARGETS) and "fixed estimator" not in section


def test_a_run_with_a_fixed_estimator_names_it(tmp_path, small_study):
    from consensus.dawid_skene import OneCoinDawidSkene

    engine, sessions = init_db(f"sqlite:///{tmp_path / 'fixed.sqlite'}")
    with sessions.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
    with sessions.begin() as session:
        run_consensus(session, estimator=OneCoinDawidSkene())
    with sessions() as session:
        study = build_study(session)
    engine.dispose()
    assert study.rater_models.empty
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "Every label\n(bcc, pigment_network, " in html
    assert "fitted by one fixed estimator, <b>OneCoinDawidSkene</b>" in html
    assert "rater_models.csv" not in {p.name for p in write_csv(study, tmp_path / "csv")}


def _gold_store(tmp_path, small_study):
    """The small study with histopathology for its first 12 images and one adjudication that disagrees."""
    from consensus.models import Item
    from consensus.repository.gold import import_gold, upsert_gold

    truth = pd.read_csv(small_study / "labels.csv")
    first = truth.head(12)
    table = pd.DataFrame({
        "image_id": first["image_id"],
        "diagnosis": ["basal cell carcinoma" if b else "nevus" for b in first["bcc"]],
    })  # fmt: skip
    engine, sessions = init_db(f"sqlite:///{tmp_path / 'gold.sqlite'}")
    with sessions.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
        import_gold(session, table, reference="pathology.csv")
        item = session.query(Item).filter_by(external_id=str(first["image_id"].iloc[0])).one()
        upsert_gold(session, item, "bcc", str(1 - int(first["bcc"].iloc[0])), "adjudication")
    with sessions.begin() as session:
        run_consensus(session)
    return engine, sessions, first


def test_readers_are_scored_against_gold_on_the_gold_items_only(tmp_path, small_study):
    engine, sessions, first = _gold_store(tmp_path, small_study)
    with sessions() as session:
        study = build_study(session)
    engine.dispose()
    held = study.gold_summary["run"]
    assert held["n"] == 12 and held["by_label"] == {"bcc": {"histopathology": 12}} and held["conflicts"] == 1
    versus = study.rater_vs_gold
    assert set(versus["label_key"]) == {"bcc"} and len(versus) == 4
    assert (versus["reference"] == "gold (12 items)").all()
    # Each reader by hand, on the gold items only.
    ratings = pd.read_csv(small_study / "ratings.csv")
    for rater in ("derm1", "derm2", "derm3", "derm4"):
        said = ratings[(ratings["rater"] == rater) & (ratings["label"] == "bcc")].set_index("image_id")[
            "value"
        ]
        gold = first.set_index("image_id")["bcc"]
        said = said.reindex(gold.index).dropna().astype(int)
        gold = gold.reindex(said.index)
        row = versus[versus["rater"] == rater].iloc[0]
        assert row["n_items"] == len(said) and row["n_positive"] == int(gold.sum())
        assert row["sensitivity"] == pytest.approx(((said == 1) & (gold == 1)).sum() / (gold == 1).sum())
        assert row["specificity"] == pytest.approx(((said == 0) & (gold == 0)).sum() / (gold == 0).sum())
        assert row["agreement"] == pytest.approx((said == gold).mean())
        assert row["agreement_low"] <= row["agreement"] <= row["agreement_high"]
        assert row["agreement_high"] - row["agreement_low"] > 0.2  # 12 items: a wide Wilson interval
    written = {p.name: p for p in write_csv(study, tmp_path / "csv")}
    assert len(pd.read_csv(written["rater_vs_gold.csv"])) == 4
    assert len(pd.read_csv(written["gold_labels.csv"])) == 12
    assert json.loads(written["run.json"].read_text())["gold"]["run"]["n"] == 12
    doc = to_json(study)
    assert doc["gold"]["run"]["n"] == 12 and len(doc["rater_vs_gold"]) == 4
    html = write_report(study, tmp_path / "report.html").read_text()
    section = html[html.index('<h2 id="gold">') : html.index('<h2 id="regions">')]
    assert "held <b>12</b> gold label(s)" in section and "<b>1</b> item label(s) had sources that" in section
    assert "on the gold items only" in section and "gold (12 items)" in section
    assert "with the gold items held at their gold class" in html  # the consensus reference says so
    page = (tmp_path / "raters").glob("derm1-*.html").__next__().read_text()
    assert "gold (12 items)" in page and "<td>consensus</td>" in page


def test_a_run_without_gold_says_so(study_db, tmp_path):
    with study_db() as session:
        study = build_study(session)
    assert study.rater_vs_gold.empty and study.gold_summary["run"]["n"] == 0
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "The run held <b>no gold labels</b>" in html and "This run has no region consensus" in html


def test_the_report_shows_the_adaptive_reads_queue(study_db, tmp_path):
    from consensus.adaptive import StoppingRule
    from consensus.export import adaptive_section

    with study_db() as session:
        study = build_study(session)
    diagnoses = study.ratings[["derm1:bcc", "derm2:bcc", "derm3:bcc", "derm4:bcc"]]
    # Ask five reads of every image: each image a reader has not read goes to one such reader.
    section = adaptive_section(study, StoppingRule(0.95, 5))
    assert section is not None and section["read"] == 40
    queue = section["table"]
    assert set(queue["task"]) == set(diagnoses.index[diagnoses.isna().any(axis=1)])
    for task, reader in zip(queue["task"], queue["reader"], strict=True):
        assert pd.isna(diagnoses.loc[task, f"{reader}:bcc"]), (task, reader)  # never a second read
    # Drop derm3's and derm4's diagnoses of the first ten images: with three reads asked, those ten
    # are open, each for a reader who has not read it.
    first = list(diagnoses.index[:10])
    study.ratings.loc[first, ["derm3:bcc", "derm4:bcc"]] = None
    section = adaptive_section(study, StoppingRule(0.95, 3))
    assert section is not None
    queue = section["table"].set_index("task")
    assert set(first) <= set(queue.index)
    for task in first:
        assert pd.isna(study.ratings.loc[task, f"{queue.loc[task, 'reader']}:bcc"])
    page = write_report(study, tmp_path / "report.html", reads_rule=StoppingRule(0.95, 3)).read_text()
    assert 'id="adaptive-reads"' in page and f"<b>{section['open']}</b> of\nthe 40 images" in page
