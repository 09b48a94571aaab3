"""Released models: SHA-256 checked, served with no promote step, replaced by a promotion and returned to,
and only outputs validated on real images pre-annotated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from backend.settings import Settings, SettingsError
from labeling_config import PATTERN_KEYS, load_config
from tests.backend.conftest import png_bytes

BCC_XML = load_config("bcc")


def _eval_dirs(root: Path) -> dict[str, Path]:
    """Evaluation outputs as the evaluate commands write them (only the fields the release reads)."""
    iv = {"value": 0.97, "low": 0.95, "high": 0.99}
    found = {
        "dermdev": {"classification": {"n_images": 808, "n_bcc": 42, "bcc": {"auroc": iv}, "patterns": {}}},
        "isic": {
            "classification": {
                "n_images": 520,
                "n_bcc": 0,
                "bcc": {},
                "patterns": {
                    "pigment_network": {"auroc": {"value": 0.86, "low": 0.8, "high": 0.9}, "prevalence": 0.5}
                },
            }
        },
    }
    dirs = {}
    for name, metrics in found.items():
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps(metrics))
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def built_release(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A release built by tools/release.py from the tiny checkpoint and made-up evaluation figures."""
    from tools.release import main

    tmp_path = tmp_path_factory.mktemp("release")
    dirs = _eval_dirs(tmp_path / "evals")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps({"dermnet": {"what": "A test model.", "command": "dermassist train ...", "data": "none"}})
    )
    out = tmp_path / "models"
    args = ["--name", "test.1", "--out", str(out), "--dermnet", str(tiny_checkpoint), "--recipe", str(recipe)]
    main([*args, "--dermnet-eval", str(dirs["dermdev"]), "--pn-eval", str(dirs["isic"])])
    return out


@pytest.fixture
def release_dir(built_release: Path, tmp_path: Path) -> Path:
    """This test's own copy of the built release (a test may damage it)."""
    import shutil

    return Path(shutil.copytree(built_release, tmp_path / "models"))


@pytest.fixture
def release_settings(settings: Settings, release_dir: Path) -> Settings:
    return dataclasses.replace(settings, release_dir=release_dir, show_outputs="validated")


def _client(settings: Settings) -> Any:
    from backend.api.app import create_app

    return create_app(settings).test_client()


def test_the_release_tool_writes_fp16_weights_a_card_and_their_sha256(release_dir, tiny_checkpoint):
    import hashlib

    import torch

    manifest = json.loads((release_dir / "release.json").read_text())
    (entry,) = manifest["models"]
    path = release_dir / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    raw = torch.load(path, weights_only=False)
    floats = [v for v in raw["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats) and "optimizer" not in raw
    assert (
        raw["meta"]["version"]
        == entry["version"]
        != torch.load(tiny_checkpoint, weights_only=False)["meta"]["version"]
    )
    assert raw["meta"]["provenance"]["bcc"]["status"] == "validated"
    assert raw["meta"]["provenance"]["pigment_network"]["status"] == "validated"
    assert {raw["meta"]["provenance"][k]["status"] for k in PATTERN_KEYS[1:]} == {"untrained"}
    card = (release_dir / entry["card"]).read_text()
    assert entry["sha256"] in card and "not a diagnostic device" in card.lower() and "CC BY-NC 4.0" in card
    assert "non-commercial" in manifest["licence"]


def test_a_fresh_backend_serves_the_release_with_no_promote_step(release_settings, release_dir):
    from backend.serving.release import read_release

    client = _client(release_settings)
    version = read_release(release_dir).models["dermnet"].version  # type: ignore[union-attr]
    health = client.get("/health").get_json()
    assert health["model_version"] == version and health["release"] == "test.1/dermnet-bcc"
    listed = client.get("/versions").get_json()
    (model,) = listed["models"]
    assert model["status"] == "promoted" and model["release"] == "test.1/dermnet-bcc"
    assert model["outputs"]["bcc"] == {
        "status": "validated",
        "metric": "auroc",
        "value": 0.97,
        "n_images": 808,
        "n_positive": 42,
        "data": model["outputs"]["bcc"]["data"],
    }
    assert "validation split" in model["outputs"]["bcc"]["data"]
    assert model["outputs"]["ulceration"]["status"] == "untrained"
    _client(release_settings)  # a second worker (or a restart) registers nothing twice
    assert len(client.get("/versions").get_json()["models"]) == 1
    # The released ONNX graph is copied beside the registered weights (not exported again) and served.
    (entry,) = json.loads((release_dir / "release.json").read_text())["models"]
    served = client.application.extensions["dermassist"].serving.bcc_model()
    assert served.engine.name == "onnxruntime"
    assert (
        served.path.with_suffix(".onnx").read_bytes() == (release_dir / entry["graph"]["file"]).read_bytes()
    )


def test_only_validated_outputs_are_pre_annotated(release_settings, image_server):
    _, files = image_server
    files.routes["/data/upload/1/a.png"] = (200, {"Content-Type": "image/png"}, png_bytes())
    client = _client(release_settings)
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}], "label_config": BCC_XML}
    (prediction,) = client.post("/predict", json=body).get_json()["results"]
    names = {item["from_name"] for item in prediction["result"]}
    assert "diagnosis" in names and prediction["score"] is not None
    # The tiny model's thresholds put every pattern above its threshold: only pigment network (validated)
    # may appear, the six untrained BCC patterns must not, as choices or as regions.
    shown = [v for item in prediction["result"] for v in item["value"].get("choices", [])]
    shown += [v for item in prediction["result"] for v in item["value"].get("brushlabels", [])]
    assert "Pigment network" in shown
    assert not set(shown) & {"Ulceration", "Blue-grey ovoid nests", "Arborizing telangiectasia"}
    every = dataclasses.replace(release_settings, show_outputs="all")
    (everything,) = _client(every).post("/predict", json=body).get_json()["results"]
    assert "Ulceration" in [v for i in everything["result"] for v in i["value"].get("choices", [])]


def test_a_promoted_model_replaces_the_release_and_promote_release_returns(
    release_settings, tmp_path, monkeypatch
):
    from backend.cli import main

    client = _client(release_settings)
    released = client.get("/health").get_json()["model_version"]
    other = tmp_path / "other.pt"
    _retrained(other)
    monkeypatch.setenv("DATABASE_URL", release_settings.database_url)
    monkeypatch.setenv("MODEL_DIR", str(release_settings.model_dir))
    monkeypatch.setenv("RELEASE_DIR", str(release_settings.release_dir))
    assert main(["models", "promote", str(other)]) == 0
    import time

    time.sleep(1.1)  # the backend looks at the promoted version at most once a second
    now = client.get("/health").get_json()
    assert now["model_version"] != released and now["release"] is None
    _client(release_settings)  # a restart does not put the release back over a promoted model
    assert client.get("/health").get_json()["model_version"] == now["model_version"]
    assert main(["models", "promote", "release"]) == 0
    time.sleep(1.1)
    assert client.get("/health").get_json()["model_version"] == released


def _retrained(path: Path) -> None:
    import torch

    from model.common.checkpoint import save_checkpoint
    from model.multitask.network import CheckpointMeta, DermNet

    torch.manual_seed(5)
    save_checkpoint(path, DermNet(width_mult=0.35), CheckpointMeta(input_size=64, width_mult=0.35))


@pytest.mark.parametrize("damage", ["altered", "missing", "manifest", "graph"])
def test_a_damaged_release_stops_the_backend_with_the_reason(release_settings, release_dir, damage):
    manifest = json.loads((release_dir / "release.json").read_text())
    path = release_dir / manifest["models"][0]["file"]
    if damage == "graph":  # the ONNX graph is checked like the weights
        path = release_dir / manifest["models"][0]["graph"]["file"]
    if damage in ("altered", "graph"):
        data = bytearray(path.read_bytes())
        data[-100] ^= 1
        path.write_bytes(bytes(data))
        message = "has SHA-256 .* the manifest says"
    elif damage == "missing":
        path.unlink()
        message = "is missing"
    else:
        (release_dir / "release.json").write_text('{"format": 1, "models": [{}]}')
        message = "is not a release manifest"
    with pytest.raises(SettingsError, match=message):
        _client(release_settings)
    assert _client(dataclasses.replace(release_settings, release_dir=None)).get("/health").status_code == 200


def test_release_dir_none_turns_the_release_off():
    assert Settings.from_env({"RELEASE_DIR": "none"}).release_dir is None
    assert Settings.from_env({}).release_dir == Path(__file__).resolve().parents[2] / "models"


def test_an_upgraded_release_replaces_an_earlier_one_but_never_a_promoted_model(
    release_settings, release_dir, tmp_path, tiny_checkpoint
):
    from tools.release import main

    client = _client(release_settings)
    first = client.get("/health").get_json()["model_version"]
    # the next release: other weights, another name, in another folder
    other = tmp_path / "other.pt"
    _retrained(other)
    dirs = _eval_dirs(tmp_path / "evals2")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"dermnet": {"what": "next", "command": "-", "data": "-"}}))
    args = [
        "--name",
        "test.2",
        "--out",
        str(tmp_path / "models2"),
        "--dermnet",
        str(other),
        "--recipe",
        str(recipe),
    ]
    main([*args, "--dermnet-eval", str(dirs["dermdev"]), "--pn-eval", str(dirs["isic"])])
    upgraded = dataclasses.replace(release_settings, release_dir=tmp_path / "models2")
    second = _client(upgraded).get("/health").get_json()
    assert second["release"] == "test.2/dermnet-bcc" and second["model_version"] != first
    # a model someone promoted stays, whatever release the checkout brings
    from backend.serving import registry

    with _client(upgraded).application.extensions["dermassist"].sessions() as session:
        mine = registry.register(session, tiny_checkpoint, release_settings.model_dir)
        registry.promote(session, mine)
        session.commit()
        mine_version = mine.version
    assert _client(release_settings).get("/health").get_json()["model_version"] == mine_version


def test_a_restart_reads_no_released_checkpoint_again(release_settings, monkeypatch):
    """Every worker's start installs the release: a version already registered costs a lookup only."""
    from backend.serving import registry

    _client(release_settings)

    def refuse(*args: Any) -> Any:
        raise AssertionError("a registered release was read again")

    monkeypatch.setattr(registry, "checkpoint_candidate", refuse)
    assert _client(release_settings).get("/health").get_json()["release"] == "test.1/dermnet-bcc"
