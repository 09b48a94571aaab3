"""The dermassist command line, as a user runs it."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "synth" in result.stdout
    assert "demo" in result.stdout


def test_synth_twice_gives_byte_identical_files(tmp_path):
    args = ["synth", "--n", "64", "--size", "256", "--raters", "4", "--seed", "1"]
    for name in ("a", "b"):
        result = run_cli("-q", *args, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("synthetic study: 64 images")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b
    assert "contact_sheet.png" in a
    assert "ratings.csv" in a
    assert "study.json" in a


def test_demo_runs_study_store_consensus_and_export_and_says_where(tmp_path, capsys):
    assert main(["-q", "demo", "--no-label-studio", "--n", "24", "--size", "96", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo: consensus of 4 dermatologists on 24 images" in out
    assert str((tmp_path / "consensus" / "report.html").resolve()) in out
    for path in (
        "study/labels.csv",
        "study/contact_sheet.png",
        "dermassist.sqlite",
        "consensus/consensus.csv",
    ):
        assert (tmp_path / path).is_file(), path
    # A second run starts from a fresh store: one consensus run, not two.
    assert (
        main(
            [
                "-q",
                "demo",
                "--no-label-studio",
                "--n",
                "24",
                "--size",
                "96",
                "--out",
                str(tmp_path),
                "--no-sheet",
            ]
        )
        == 0
    )
    assert '"id": 1' in (tmp_path / "consensus" / "run.json").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["synth", "--n", "2", "--sensitivity", "0.9:0.2"], "expected 0 <= LOW <= HIGH <= 1"),
        (["synth", "--n", "2", "--missing", "lots"], "expected a probability"),
        (["synth", "--n", "0"], "n must be at least 1"),
    ],
)
def test_bad_arguments_get_one_clear_line(tmp_path, args, message):
    result = run_cli(*args, "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    result = run_cli("synth", "--n", "2", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "holds no synthetic study" in result.stderr
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_train_then_evaluate_from_the_command_line(small_study, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["-q", "train", str(small_study), "--out", str(run), "--epochs", "1", "--image-size", "64",
                 "--batch-size", "16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("trained dermnet-") and str(run / "best.pt") in out
    assert main(["-q", "evaluate", str(run / "best.pt"), str(small_study), "--out", str(tmp_path / "ev"),
                 "--bootstrap", "10"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(val): BCC AUROC" in out and (tmp_path / "ev" / "report.html").is_file()


def test_evaluate_a_missing_checkpoint_is_one_clear_line(tmp_path):
    result = run_cli("evaluate", str(tmp_path / "nope.pt"), str(tmp_path), "--out", str(tmp_path / "ev"))
    assert result.returncode == 2
    assert "nope.pt not found" in result.stderr and "Traceback" not in result.stderr


def test_import_ratings_then_run_the_consensus(small_study, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'store.sqlite'}"
    assert main(["consensus", "import-ratings", str(small_study / "ratings.csv"), "--db", db]) == 0
    assert "annotations new" in capsys.readouterr().out
    assert main(["consensus", "import-ratings", str(small_study / "ratings.csv"), "--db", db]) == 0
    assert " 0 annotations new, 0 changed" in capsys.readouterr().out
    assert main(["consensus", "run", "--db", db]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("consensus run 1 (SelectedDawidSkene): 40 items, 4 raters") and "positives: bcc" in out
    )
    assert main(["consensus", "run", "--db", db, "--rater-model", "one-coin"]) == 0
    assert capsys.readouterr().out.startswith("consensus run 2 (OneCoinDawidSkene)")
    assert main(["consensus", "run", "--db", db, "--one-coin", "--rater-model", "full"]) == 2
    assert "contradicts" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('image_id,rater,label,value\n"a,r,bcc,1\n', "not a readable CSV"),
        ("image_id,rater,label,value\na,r,melanoma,1\n", "unknown label keys ['melanoma']"),
        ("", "not a readable CSV"),
    ],
)
def test_bad_ratings_files_get_one_clear_line_and_write_nothing(tmp_path, content, message):
    path = tmp_path / "ratings.csv"
    path.write_text(content)
    db = tmp_path / "store.sqlite"
    result = run_cli("consensus", "import-ratings", str(path), "--db", f"sqlite:///{db}")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_export_every_format(small_study, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'store.sqlite'}"
    main(["consensus", "import-ratings", str(small_study / "ratings.csv"), "--db", db])
    main(["consensus", "run", "--db", db])
    for fmt, out in [("csv", "csv"), ("json", "s.json"), ("ls-import", "ls.json"), ("report", "r.html")]:
        args = ["export", "--format", fmt, "--out", str(tmp_path / out), "--db", db]
        if fmt == "report":
            args += ["--truth", str(small_study / "labels.csv")]
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "40 Label Studio tasks" in out and "report ->" in out
    assert (tmp_path / "csv" / "consensus.csv").is_file() and (tmp_path / "r.html").is_file()


def test_export_without_a_run_is_one_clear_line(tmp_path):
    result = run_cli(
        "export",
        "--format",
        "json",
        "--out",
        str(tmp_path / "x.json"),
        "--db",
        f"sqlite:///{tmp_path}/e.sqlite",
    )
    assert result.returncode == 2 and "no consensus run in the store" in result.stderr


def test_train_dual_from_the_command_line(small_study, tmp_path, capsys):
    code = main(
        ["-q", "train-dual", str(small_study), "--out", str(tmp_path / "dual"), "--image-size", "64",
         "--lesion-size", "48", "--epochs", "1", "--batch-size", "16"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "BCC AUROC" in out and (tmp_path / "dual" / "best.pt").is_file()
    code = main(["-q", "evaluate-dual", str(tmp_path / "dual" / "best.pt"), str(small_study), "--out",
                 str(tmp_path / "dual-eval")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "Grad-CAM energy inside the lesion" in out and (tmp_path / "dual-eval" / "report.html").is_file()


def test_train_seg_then_evaluate_seg_from_the_command_line(small_study, tmp_path, capsys):
    run = tmp_path / "seg"
    args = ["-q", "train-seg", str(small_study), "--out", str(run), "--image-size", "64", "--epochs", "1",
            "--stratify", "dx"]  # fmt: skip
    assert main(args) == 0
    assert "validation Dice" in capsys.readouterr().out
    assert (
        main(["-q", "evaluate-seg", str(run / "best.pt"), str(small_study), "--out", str(tmp_path / "ev")])
        == 0
    )
    out = capsys.readouterr().out
    assert "dice" in out and (tmp_path / "ev" / "metrics.json").is_file()
    from model.lesion.segmentation import load_segnet

    assert load_segnet(run / "best.pt")[1].extra["train_config"]["stratify"] == "dx"


def test_a_retraining_job_gets_the_same_defaults_from_the_cli_as_from_the_train_button():
    """`train --from-db` passes only what the user typed; the job fills the rest (TRAIN_EPOCHS, ...),
    as it does for a webhook's START_TRAINING, which carries no parameters at all."""
    from backend.cli import _given, build_parser

    names = ("epochs", "batch_size", "image_size", "patience")
    plain = build_parser().parse_args(["train", "--from-db"])
    assert _given(plain, *names) == {}
    typed = build_parser().parse_args(["train", "--from-db", "--epochs", "2"])
    assert _given(typed, *names) == {"epochs": 2}


def test_cli_defaults_come_from_the_settings(monkeypatch, capsys):
    from backend.cli import build_parser, main
    from backend.settings import Settings

    parser = build_parser(Settings(threads=3, log_level="DEBUG"))
    args = parser.parse_args(["train", "data"])
    assert args.threads == 3 and args.log_level == "DEBUG"
    monkeypatch.setenv("WORKERS", "many")
    assert main(["models"]) == 2
    assert "WORKERS must be an integer" in capsys.readouterr().err


def test_a_command_needing_pytorch_says_so_in_a_serving_install(tmp_path):
    """Without the train extra (the serve Docker image), a training command names what is missing and
    where it is, in one line, instead of a traceback."""
    probe = (
        "import sys; sys.modules['torch'] = None; from backend.cli import main; "
        f"sys.exit(main(['train', {str(tmp_path / 'data')!r}, '--out', {str(tmp_path / 'out')!r}]))"
    )
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs torch" in done.stderr and "dermassist[train]" in done.stderr
    assert "Traceback" not in done.stderr
