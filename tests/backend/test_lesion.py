"""The second system through /setup and /predict with lesion.xml: lesion mask, seven-class diagnosis, metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from backend.api.app import create_app
from labeling_config import HAM_CLASSES, load_config
from tests.backend.conftest import png_bytes, promote_lesion, tiny_lesion_pair

LESION_XML = load_config("lesion")


@pytest.fixture(scope="module")
def lesion_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_lesion_pair(tmp_path_factory.mktemp("lesion"))


def tasks(files, sizes):
    out = []
    for i, (w, h) in enumerate(sizes):
        path = f"/data/upload/1/l{i}.png"
        files.routes[path] = (200, {"Content-Type": "image/png"}, png_bytes(w, h, seed=i))
        data = {"image": path, "age": 61, "sex": "female", "site": "back"} if i == 0 else {"image": path}
        out.append({"id": i + 1, "data": data})
    return out


def test_lesion_xml_without_the_second_system_is_a_clear_422(client):
    response = client.post("/setup", json={"schema": LESION_XML})
    assert response.status_code == 422 and "promote-lesion" in response.get_json()["message"]


def test_lesion_xml_gets_a_mask_of_the_image_size_and_one_of_seven_diagnoses(
    settings, sessions, promoted, lesion_pair, image_server
):
    version = promote_lesion(sessions, settings.model_dir, *lesion_pair)
    client = create_app(settings, sessions=sessions).test_client()
    setup = client.post("/setup", json={"schema": LESION_XML}).get_json()
    assert setup["model_version"] == version
    _, files = image_server
    sizes = [(96, 72), (60, 80)]  # the second task has no age / sex / site: handled as unknown
    body = client.post("/predict", json={"tasks": tasks(files, sizes), "label_config": LESION_XML}).get_json()
    interface = LabelInterface(LESION_XML)
    for (w, h), prediction in zip(sizes, body["results"], strict=True):
        assert prediction["model_version"] == version
        assert interface.validate_prediction(prediction)
        choice = next(i for i in prediction["result"] if i["type"] == "choices")
        assert choice["value"]["choices"][0] in HAM_CLASSES and 0 < choice["score"] <= 1
        assert prediction["score"] == choice["score"]
        brushes = [i for i in prediction["result"] if i["type"] == "brushlabels"]
        for brush in brushes:
            assert (brush["original_width"], brush["original_height"]) == (w, h)
            assert np.asarray(decode_rle(brush["value"]["rle"])).reshape(h, w, 4)[..., 3].any()


def test_the_pairs_provenance_comes_from_the_release_or_from_its_own_validation():
    from backend.serving.lesion import pair_provenance
    from model.lesion.meta import DualMeta, SegMeta

    assert pair_provenance(SegMeta(), DualMeta()) == {"lesion": {}, "diagnosis": {}}  # untrained
    seg = SegMeta(metrics={"val_dice": 0.93}, extra={"n_val": 807, "synthetic": False})
    dual = DualMeta(metrics={"auroc_macro": 0.95}, extra={"n_val": 807, "synthetic": True})
    found = pair_provenance(seg, dual)
    assert found["lesion"]["status"] == "validated" and found["lesion"]["value"] == 0.93
    assert found["diagnosis"]["status"] == "synthetic"
    small = SegMeta(metrics={"val_dice": 0.93}, extra={"n_val": 40})
    assert pair_provenance(small, DualMeta())["lesion"]["status"] == "unvalidated"  # too few images to say
    released = SegMeta(provenance={"lesion": {"status": "validated", "metric": "dice", "value": 0.94}})
    assert pair_provenance(released, DualMeta())["lesion"]["value"] == 0.94  # the release's own record wins
