import xml.etree.ElementTree as ET

import pytest

from labeling_config import (
    BCC_PATTERNS,
    DIAGNOSES,
    EXCLUSION_PATTERN,
    HAM_CLASSES,
    LESION_LABEL,
    PATTERN_KEYS,
    PATTERNS,
    TARGETS,
    bcc_consistent,
    load_config,
)


def _control(xml: str, tag: str, name: str) -> ET.Element:
    for node in ET.fromstring(xml).iter(tag):
        if node.get("name") == name:
            return node
    raise AssertionError(f"<{tag} name={name!r}> not found")


def test_bcc_xml_diagnosis_values_equal_schema():
    node = _control(load_config("bcc"), "Choices", "diagnosis")
    assert tuple(c.get("value") for c in node.iter("Choice")) == DIAGNOSES
    assert node.get("choice") in ("single", "single-radio")


def test_bcc_xml_pattern_choices_and_brush_labels_equal_schema_in_head_order():
    xml = load_config("bcc")
    choices = _control(xml, "Choices", "patterns")
    assert choices.get("choice") == "multiple"
    assert [c.get("value") for c in choices.iter("Choice")] == [p.display for p in PATTERNS]
    brush = _control(xml, "BrushLabels", "regions")
    assert [label.get("value") for label in brush.iter("Label")] == ["BCC"] + [p.display for p in PATTERNS]
    assert [label.get("background") for label in brush.iter("Label")][1:] == [p.colour for p in PATTERNS]


def test_lesion_xml_has_ham_classes_lesion_brush_and_metadata_fields():
    xml = load_config("lesion")
    choices = _control(xml, "Choices", "diagnosis")
    assert tuple(c.get("value") for c in choices.iter("Choice")) == HAM_CLASSES
    brush = _control(xml, "BrushLabels", "lesion")
    assert [label.get("value") for label in brush.iter("Label")] == [LESION_LABEL]
    fields = {n.get("name"): n.get("value") for n in ET.fromstring(xml).iter("Text")}
    assert fields == {"age": "$age", "sex": "$sex", "site": "$site"}


def test_schema_order_and_roles():
    assert ("bcc", *PATTERN_KEYS) == TARGETS
    assert len(PATTERN_KEYS) == 7
    assert len(set(PATTERN_KEYS)) == 7
    assert EXCLUSION_PATTERN == "pigment_network"
    assert set(BCC_PATTERNS) == set(PATTERN_KEYS) - {EXCLUSION_PATTERN}


def test_unknown_config_name_is_rejected():
    with pytest.raises(ValueError, match="unknown labeling config 'nope'"):
        load_config("nope")


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({}, False),
        ({"ulceration": 1}, True),
        ({"arborizing_telangiectasia": True, "spoke_wheel": True}, True),
        ({"pigment_network": 1}, False),
        ({"pigment_network": 1, "ulceration": 1}, False),  # the exclusion criterion wins
        ({"pigment_network": 0, "maple_leaf": 1}, True),
        (dict.fromkeys(PATTERN_KEYS, 0), False),
    ],
)
def test_clinical_criterion(present, expected):
    assert bcc_consistent(present) is expected


def test_criterion_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown pattern keys \\['ulcer'\\]"):
        bcc_consistent({"ulcer": 1})
