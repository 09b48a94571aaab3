"""The task score Label Studio sorts by is the project's acquisition strategy: ``1 - uncertainty`` over the
outputs the config shows, from the served model's own outputs; the config's attribute overrides
``ACQUISITION``; a strategy that cannot apply is refused with a message."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backend.api.app import create_app
from backend.serving.multitask import load_served, run_batch
from backend.settings import Settings, SettingsError
from labeling_config import load_config
from labeling_config.parse import ConfigError, parse_config
from model.common.acquisition import SAMPLING, Outputs, task_score, uncertainty
from tests.backend.conftest import png_bytes, with_settings
from tests.backend.test_app import serve_upload

BCC_XML = load_config("bcc")
TAG = '<Image name="image" value="$image"'


def with_strategy(xml: str, strategy: str) -> str:
    assert TAG in xml
    return xml.replace(TAG, f'{TAG} acquisition="{strategy}"', 1)


def scores(app: Any, files: Any, xml: str, n: int = 3) -> tuple[list[float], list[bytes]]:
    bodies = [png_bytes(64 + 16 * i, 48 + 8 * i, seed=i) for i in range(n)]
    tasks = [
        {"id": i + 1, "data": {"image": serve_upload(files, f"a{i}.png", b)}} for i, b in enumerate(bodies)
    ]
    response = app.test_client().post("/predict", json={"tasks": tasks, "label_config": xml})
    assert response.status_code == 200, response.get_json()
    return [p["score"] for p in response.get_json()["results"]], bodies


def expected(strategy: str, checkpoint: Any, bodies: list[bytes]) -> list[float]:
    """What the strategy gives, recomputed from the model (PyTorch) on the same images."""
    served = load_served(checkpoint, engine="torch")
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in bodies]
    sampling = SAMPLING.get(strategy)
    outputs = run_batch(served, images, maps=False, sampling=sampling)
    targets = list(served.meta.targets)  # bcc.xml shows the diagnosis and every pattern
    binary = np.array([[o.probs[k] for k in targets] for o in outputs])
    samples = Outputs(binary=np.stack([o.samples for o in outputs])) if sampling else None
    return [task_score(u) for u in uncertainty(strategy, Outputs(binary=binary), samples)]


@pytest.mark.parametrize("strategy", ["entropy", "bald", "tta"])
def test_the_task_score_is_the_strategys_value(
    settings, sessions, promoted, image_server, tiny_checkpoint, strategy
):
    app = create_app(with_settings(settings, acquisition=strategy), sessions=sessions)
    found, bodies = scores(app, image_server[1], BCC_XML)
    want = expected(strategy, tiny_checkpoint, bodies)
    assert found == pytest.approx(want, abs=1e-4)  # ONNX Runtime serves, PyTorch recomputes
    assert all(0.0 <= s <= 1.0 for s in found)


def test_the_configs_strategy_overrides_the_deployments(
    settings, sessions, promoted, image_server, tiny_checkpoint
):
    app = create_app(with_settings(settings, acquisition="least_confidence"), sessions=sessions)
    found, bodies = scores(app, image_server[1], with_strategy(BCC_XML, "entropy"))
    assert found == pytest.approx(expected("entropy", tiny_checkpoint, bodies), abs=1e-4)
    # least confidence: the confidence of the diagnosis, as the score always was
    plain, _ = scores(app, image_server[1], BCC_XML)
    assert all(0.5 <= s <= 1.0 for s in plain) and plain != found


def test_an_unknown_strategy_is_a_422_that_names_the_known_ones(client, image_server):
    response = client.post(
        "/predict",
        json={
            "tasks": [{"id": 1, "data": {"image": "/x.png"}}],
            "label_config": with_strategy(BCC_XML, "margin"),
        },
    )
    assert response.status_code == 422
    message = response.get_json()["message"] if "message" in response.get_json() else str(response.get_json())
    assert "margin" in message and "least_confidence, entropy, bald, tta" in message


def test_sampling_strategies_need_the_bcc_model():
    lesion = load_config("lesion")
    with pytest.raises(ConfigError, match="samples the BCC model"):
        parse_config(with_strategy(lesion, "bald"))
    assert parse_config(with_strategy(lesion, "entropy")).acquisition == "entropy"
    assert parse_config(lesion).acquisition is None


def test_the_setting_is_checked():
    with pytest.raises(SettingsError, match="ACQUISITION must be one of"):
        Settings.from_env({"ACQUISITION": "margin"})
    assert Settings.from_env({"ACQUISITION": "BALD"}).acquisition == "bald"
    assert Settings.from_env({"ACQUISITION": "tta"}).to_env()["ACQUISITION"] == "tta"
