"""The second system against a real Label Studio 1.23.2: a lesion.xml project, age / sex / site in the
task data, the backend's predictions read back from Label Studio: a lesion mask that decodes to each
image's size and one of the seven diagnoses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.demo import study as ls_study
from backend.demo.label_studio import LabelStudioServer, free_port
from backend.demo.study import wait_for
from backend.label_studio.sdk import LabelStudioApi
from backend.serving.lesion import load_version, run_lesion
from labeling_config import HAM_CLASSES, load_config
from tests.backend.conftest import png_bytes, tiny_lesion_pair
from tests.e2e.conftest import DERMASSIST, start_backend

LESION_XML = load_config("lesion")
# (width, height) and task data beside the image: full, an unknown site, nothing known. Label Studio
# wants every key the config shows ($age, $sex, $site) in every task, as text or a number (not null):
# unknown is empty.
CASES = [
    ((200, 150), {"age": 63, "sex": "male", "site": "back"}),
    ((150, 200), {"age": 41, "sex": "female", "site": "elbow"}),
    ((180, 120), {"age": "", "sex": "", "site": ""}),
]


def lesion_pair_with_partial_masks(root: Path, images: list[Image.Image]) -> tuple[Path, Path]:
    """The tiny pair, its U-Net's output shifted so that about half of these images' pixels are lesion:
    masks that are neither empty nor full, so a transposed or flipped mask cannot pass."""
    import torch

    from backend.serving.multitask import to_array
    from model.lesion.segmentation import load_segnet, save_segnet

    seg, dual = tiny_lesion_pair(root)
    segnet, meta = load_segnet(seg)
    with torch.no_grad():
        logits = segnet(torch.from_numpy(np.stack([to_array(im, meta.input_size) for im in images])))
        segnet.head.bias -= logits.median()
    save_segnet(seg, segnet, meta)
    return seg, dual


def test_lesion_xml_predictions_in_label_studio(
    label_studio: LabelStudioServer, ls: LabelStudioApi, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}",
        "MODEL_DIR": str(tmp_path / "models"),
        "RELEASE_DIR": "none",  # these tests serve their own tiny model
        "SHOW_OUTPUTS": "all",  # which validated nothing: show every output
    }
    files_root: Path = label_studio.extra["files_root"]
    folder = files_root / "lesions"
    folder.mkdir()
    images = []
    for i, ((w, h), _) in enumerate(CASES):
        (folder / f"lesion{i}.png").write_bytes(png_bytes(w, h, seed=i))
        with Image.open(folder / f"lesion{i}.png") as im:
            images.append(im.convert("RGB"))
    pair = lesion_pair_with_partial_masks(tmp_path, images)
    done = subprocess.run([str(DERMASSIST), "models", "promote-lesion", *map(str, pair)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    version = done.stdout.split()[-1]
    assert version.startswith("lesion-")
    server = start_backend(free_port(), env, tmp_path / "serve.log")
    try:
        project = ls.projects.create(title="Lesions (e2e)", label_config=LESION_XML).id
        assert project is not None
        # Label Studio refuses direct file uploads for a config with more than one data key (image,
        # age, sex, site): the tasks are imported as JSON, the images served from a local-files storage.
        ls.import_storage.local.create(project=project, path=str(folder), title="lesions", use_blob_urls=True)
        rows = [
            {"data": {"image": f"/data/local-files/?d=lesions/lesion{i}.png", **extra}}
            for i, (_, extra) in enumerate(CASES)
        ]
        ls.projects.import_tasks(id=project, request=rows)
        tasks = sorted(ls_study.tasks(ls, project), key=lambda t: t["id"])
        assert len(tasks) == len(CASES)
        index = {task["id"]: i for i, task in enumerate(tasks)}
        ls.ml.create(project=project, url=server.url, title="dermassist")
        ls_study.retrieve_predictions(ls, project)
        predictions = wait_for(
            lambda: found if len(found := ls_study.predictions(ls, project)) >= len(CASES) else None,
            120,
            "a prediction for every lesion task",
        )
        # What the same pair gives for these images here, with the same metadata: the registered
        # version, as the server loads it (its ONNX graphs, written at registration).
        system = load_version(tmp_path / "models" / "versions" / version, version)
        assert system.engine.name == "onnxruntime"
        expected = run_lesion(system, images, [extra for _, extra in CASES])
        for prediction in predictions:
            i = index[prediction["task"]]
            (w, h), want = CASES[i][0], expected[i]
            assert prediction["model_version"] == version
            choice = next(r for r in prediction["result"] if r["type"] == "choices")
            assert choice["from_name"] == "diagnosis" and choice["value"]["choices"][0] in HAM_CLASSES
            assert 0 < prediction["score"] == choice["score"] <= 1
            brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
            assert brush["value"]["brushlabels"] == ["Lesion"]
            assert (brush["original_width"], brush["original_height"]) == (w, h)
            decoded = np.asarray(decode_rle(brush["value"]["rle"]))
            assert decoded.size == w * h * 4
            mask = decoded.reshape(h, w, 4)[..., 3] > 127
            assert (
                0 < mask.sum() < mask.size and (mask == want.mask).all()
            )  # a partial mask, the right way up
            assert choice["value"]["choices"][0] == max(want.probs, key=want.probs.__getitem__)
    finally:
        server.stop()
