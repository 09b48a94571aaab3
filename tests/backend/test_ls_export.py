"""The consensus as a Label Studio import file, in the project's own control names."""

import pandas as pd
from label_studio_sdk.label_interface.interface import LabelInterface

from backend.label_studio.export import ls_import_tasks
from labeling_config import PATTERN_KEYS, load_config, parse_config

CONSENSUS = pd.DataFrame(
    {"bcc": [1, 0], "bcc_posterior": [0.97, 0.1], **{k: [0, 0] for k in PATTERN_KEYS}},
    index=pd.Index(["img1", "img2"], name="image_id"),
)
CONSENSUS.loc["img1", "ulceration"] = 1
CONSENSUS.loc["img2", "pigment_network"] = 1


def test_tasks_carry_the_consensus_as_a_valid_ground_truth_annotation():
    xml = load_config("bcc")
    tasks = ls_import_tasks(
        CONSENSUS, parse_config(xml), {"img1": "/data/upload/1/a.png"}, "/x/{id}.jpg", run_id=3
    )
    assert [t["data"]["image"] for t in tasks] == ["/data/upload/1/a.png", "/x/img2.jpg"]
    first = tasks[0]["annotations"][0]
    assert first["ground_truth"] is True
    assert [r["value"]["choices"] for r in first["result"]] == [["BCC"], ["Ulceration"]]
    assert tasks[1]["annotations"][0]["result"][1]["value"]["choices"] == ["Pigment network"]
    assert tasks[0]["meta"] == {"dermassist_consensus_run": 3, "posteriors": {"bcc": 0.97}}
    li = LabelInterface(xml)
    for task in tasks:
        assert li.validate_annotation(task["annotations"][0])


def test_a_renamed_project_gets_its_own_names():
    xml = (
        '<View><Image name="derm" value="$photo"/>'
        '<Choices name="dx" toName="derm" choice="single"><Choice value="Basal cell carcinoma" alias="BCC"/>'
        '<Choice value="Other" alias="non-BCC"/></Choices></View>'
    )
    tasks = ls_import_tasks(CONSENSUS, parse_config(xml))
    assert tasks[1]["data"]["photo"] == "img2"
    (result,) = tasks[1]["annotations"][0]["result"]
    assert (result["from_name"], result["to_name"], result["value"]["choices"]) == ("dx", "derm", ["non-BCC"])
