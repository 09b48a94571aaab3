"""The released models as shipped in models/: their SHA-256, their limits, their cards, and the outputs they
gave at release time on the shipped real sample, recomputed through the serving code within 1e-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from backend.serving.release import read_release

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MANIFEST = MODELS / "release.json"

pytestmark = pytest.mark.skipif(not MANIFEST.is_file(), reason="no models/release.json in this checkout")


def _manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def test_the_shipped_files_match_their_sha256_and_the_size_limits():
    release = read_release(MODELS)  # raises on any mismatch
    assert release is not None and set(release.models) == {"dermnet", "segnet", "dual"}
    files = [m.path for m in release.models.values()] + [
        m.graph for m in release.models.values() if m.graph is not None
    ]
    assert release.models["dermnet"].graph is not None  # ONNX Runtime serves it without exporting
    sizes = [path.stat().st_size for path in files]
    assert max(sizes) <= 15 * 1024 * 1024 and sum(sizes) <= 40 * 1024 * 1024
    assert "non-commercial" in release.licence
    weights = {p.name for p in MODELS.iterdir() if p.suffix in (".pt", ".pth", ".onnx")}
    assert weights == {path.name for path in files}  # nothing unlisted ships


def test_each_card_states_data_licence_command_figures_use_and_provenance():
    for model in read_release(MODELS).models.values():  # type: ignore[union-attr]
        card = model.card.read_text()
        for needed in ("CC BY-NC 4.0", "non-commercial", model.sha256, "```"):
            assert needed in card, (model.name, needed)
        assert "not a diagnostic device" in card.lower(), model.name
        assert "provenance" in card.lower() and "validated" in card
        for output, entry in model.outputs.items():
            assert entry["status"] in ("validated", "unvalidated", "untrained"), (model.name, output)
            if entry["status"] == "validated":
                assert entry["n_images"] >= 100 and len(entry["interval"]) == 2, (model.name, output)


def test_outputs_without_real_validation_are_not_marked_validated():
    """The six BCC patterns never saw a real labelled image: the release must not claim them."""
    dermnet = read_release(MODELS).models["dermnet"]  # type: ignore[union-attr]
    raw = torch.load(dermnet.path, map_location="cpu", weights_only=False)
    assert raw["meta"]["provenance"] == dermnet.outputs  # the file and the manifest say the same
    for key in ("ulceration", "ovoid_nests", "multiple_globules", "maple_leaf", "spoke_wheel"):
        assert dermnet.outputs[key]["status"] == "untrained", key
    assert dermnet.outputs["bcc"]["status"] == "validated"


def test_real_sample_images_get_the_recorded_outputs():
    from backend.serving.lesion import load_pair, run_lesion
    from backend.serving.multitask import load_served, run_batch

    torch.set_num_threads(1)
    release = read_release(MODELS)
    assert release is not None
    checks = _manifest()["checks"]
    assert len(checks) >= 4 and any(c["dermnet"]["bcc"] > 0.5 for c in checks)
    served = load_served(release.models["dermnet"].path)
    system = load_pair(release.models["segnet"].path, release.models["dual"].path)
    assert system.version.startswith("lesion-")
    for check in checks:
        with Image.open(ROOT / check["image"]) as im:
            image = im.convert("RGB")
        (output,) = run_batch(served, [image])
        for key, expected in check["dermnet"].items():
            assert output.probs[key] == pytest.approx(expected, abs=1e-3), (check["image"], key)
        (lesion,) = run_lesion(system, [image], [{}])
        assert float(lesion.mask.mean()) == pytest.approx(check["lesion_share"], abs=1e-3)
        for key, expected in check["diagnosis"].items():
            assert lesion.probs[key] == pytest.approx(expected, abs=1e-3), (check["image"], key)


OFFLINE_CHECK = r"""
import http.server, json, os, shutil, subprocess, sys, threading, urllib.request
from functools import partial
from pathlib import Path

if os.environ.get("UNSHARED") == "1":  # a network namespace of our own: loopback only
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
from backend.demo.processes import free_port, start_serve, stop
from labeling_config import load_config

tmp, sample = Path(sys.argv[1]), Path(sys.argv[2])
upload = tmp / "files" / "data" / "upload" / "1"
upload.mkdir(parents=True)
names = sorted(p.name for p in (sample / "images").iterdir())[:4]
for name in names:
    shutil.copy(sample / "images" / name, upload / name)
handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp / "files"))
files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
threading.Thread(target=files.serve_forever, daemon=True).start()
port = free_port()
env = {**os.environ, "MODEL_DIR": str(tmp / "empty-model-dir"), "DATABASE_URL": f"sqlite:///{tmp / 's.sqlite'}",
       "LABEL_STUDIO_URL": f"http://127.0.0.1:{files.server_address[1]}", "LABEL_STUDIO_API_KEY": "x" * 40}
env.pop("RELEASE_DIR", None)
serve = start_serve(env, port, tmp / "serve.log", timeout=120)
try:
    base = f"http://127.0.0.1:{port}"
    health = json.loads(urllib.request.urlopen(base + "/health", timeout=30).read())
    body = {"tasks": [{"id": i, "data": {"image": f"/data/upload/1/{n}"}} for i, n in enumerate(names)],
            "label_config": load_config("bcc_lesion")}
    request = urllib.request.Request(base + "/predict", json.dumps(body).encode(), {"Content-Type": "application/json"})
    predictions = json.loads(urllib.request.urlopen(request, timeout=120).read())
    print(json.dumps({"health": health, "predictions": predictions}))
finally:
    stop(serve)
"""


def test_a_fresh_serve_with_an_empty_model_dir_serves_the_release_offline(tmp_path):
    """As a new user would: a fresh store and MODEL_DIR, no promote step, and (where this machine allows a
    network namespace) no network but loopback; /health names the release, /predict gives diagnoses."""
    import os
    import shutil
    import subprocess
    import sys

    command = [sys.executable, "-c", OFFLINE_CHECK, str(tmp_path), str(ROOT / "sample" / "ham10000")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    unshared = shutil.which("unshare") is not None and shutil.which("ip") is not None and os.geteuid() == 0
    if unshared:
        command = ["unshare", "--net", *command]
        env["UNSHARED"] = "1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = tmp_path / "serve.log"
    assert done.returncode == 0, done.stderr[-3000:] + (log.read_text()[-3000:] if log.is_file() else "")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    release = read_release(MODELS)
    assert release is not None
    assert found["health"]["model_version"].startswith(release.models["dermnet"].version)
    assert found["health"]["release"] == release.label("dermnet")
    for prediction in found["predictions"]["results"]:
        kinds = {
            (item["from_name"], tuple(item["value"].get("brushlabels", []))) for item in prediction["result"]
        }
        assert any(name == "diagnosis" for name, _ in kinds), prediction
        assert ("regions", ("Lesion",)) in kinds, prediction  # the U-Net's outline
        assert prediction["model_version"] == found["predictions"]["model_version"]
    if not unshared:
        pytest.skip("checked, but not offline: no network namespace here (unshare, ip and root needed)")
