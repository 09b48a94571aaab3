"""Mapping any project's labeling config onto the model's outputs, or saying what to fix."""

import pytest

from labeling_config import PATTERN_KEYS, PATTERNS, ConfigError, Role, load_config, parse_config

PATTERN_CHOICES = "".join(f'<Choice value="{p.display}"/>' for p in PATTERNS)
PATTERN_LABELS = "".join(f'<Label value="{p.display}"/>' for p in PATTERNS)


def view(*body: str, image: str = '<Image name="image" value="$image"/>') -> str:
    return f"<View>{image}{''.join(body)}</View>"


DIAGNOSIS = '<Choices name="diagnosis" toName="image" choice="single"><Choice value="BCC"/><Choice value="non-BCC"/></Choices>'


def test_shipped_bcc_config_maps_every_output():
    cfg = parse_config(load_config("bcc"))
    assert cfg.image == "image"
    assert cfg.image_key == "image"
    assert cfg.diagnosis is not None
    assert cfg.diagnosis.values == {"bcc": "BCC", "non_bcc": "non-BCC"}
    assert cfg.patterns is not None
    assert tuple(cfg.patterns.values) == PATTERN_KEYS
    assert cfg.patterns.multiple
    assert cfg.regions is not None
    assert tuple(cfg.regions.values) == ("bcc", *PATTERN_KEYS)  # where the BCC is, then each pattern
    assert (cfg.diagnosis.name, cfg.patterns.name, cfg.regions.name) == ("diagnosis", "patterns", "regions")
    assert cfg.ham_diagnosis is None
    assert cfg.lesion is None


def test_shipped_lesion_config_maps_ham_classes_lesion_and_metadata():
    cfg = parse_config(load_config("lesion"))
    assert cfg.ham_diagnosis is not None
    assert list(cfg.ham_diagnosis.values) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert cfg.lesion is not None
    assert cfg.lesion.values == {"lesion": "Lesion"}
    assert cfg.metadata == {"age": "age", "sex": "sex", "site": "site"}
    assert cfg.diagnosis is None
    assert cfg.patterns is None


def test_renamed_controls_and_image_are_mapped_by_their_values():
    xml = view(
        '<Choices name="dx" toName="derm" choice="single-radio"><Choice value="BCC"/><Choice value="non-BCC"/></Choices>',
        f'<Choices name="structures" toName="derm" choice="multiple">{PATTERN_CHOICES}</Choices>',
        f'<BrushLabels name="paint" toName="derm">{PATTERN_LABELS}</BrushLabels>',
        image='<Image name="derm" value="$photo_url"/>',
    )
    cfg = parse_config(xml)
    assert cfg.image == "derm"
    assert cfg.image_key == "photo_url"
    assert cfg.diagnosis.name == "dx"
    assert cfg.diagnosis.to_name == "derm"
    assert cfg.patterns.name == "structures"
    assert cfg.regions.name == "paint"


@pytest.mark.parametrize(
    ("spelling", "key"),
    [
        ("blue gray ovoid nests", "ovoid_nests"),
        ("OVOID_NESTS", "ovoid_nests"),
        ("Arborizing Telangiectasia", "arborizing_telangiectasia"),
        ("multiple-blue-grey-globules", "multiple_globules"),
        ("Maple leaf like areas", "maple_leaf"),
    ],
)
def test_pattern_spellings_are_recognised_and_emitted_verbatim(spelling, key):
    xml = view(f'<Choices name="p" toName="image" choice="multiple"><Choice value="{spelling}"/></Choices>')
    assert parse_config(xml).patterns.values == {key: spelling}


def test_alias_is_matched_and_emitted_as_label_studio_stores_it():
    xml = view(
        '<Choices name="d" toName="image" choice="single">'
        '<Choice value="Basal cell carcinoma" alias="BCC"/><Choice value="Other" alias="non-BCC"/></Choices>'
    )
    assert parse_config(xml).diagnosis.values == {"bcc": "BCC", "non_bcc": "non-BCC"}


def test_dropped_controls_leave_only_what_the_config_has():
    cfg = parse_config(view(DIAGNOSIS))
    assert set(cfg.controls) == {Role.DIAGNOSIS}
    assert cfg.patterns is None
    assert cfg.regions is None


def test_subset_of_patterns_and_extra_values_are_reported():
    xml = view(
        DIAGNOSIS,
        '<Choices name="p" toName="image" choice="multiple">'
        '<Choice value="Ulceration"/><Choice value="Pigment network"/><Choice value="Shiny white lines"/></Choices>',
        '<TextArea name="notes" toName="image"/>',
    )
    cfg = parse_config(xml)
    assert cfg.patterns.values == {"ulceration": "Ulceration", "pigment_network": "Pigment network"}
    assert cfg.patterns.unmapped == ("Shiny white lines",)
    assert cfg.ignored == ("notes",)


def test_model_skip_and_model_score_threshold_are_read():
    xml = view(
        '<Choices name="d" toName="image" choice="single" model_score_threshold="0.35">'
        '<Choice value="BCC"/><Choice value="non-BCC"/></Choices>',
        f'<Choices name="p" toName="image" choice="multiple" model_skip="true">{PATTERN_CHOICES}</Choices>',
    )
    cfg = parse_config(xml)
    assert cfg.diagnosis.threshold == pytest.approx(0.35)
    assert cfg.patterns is None
    assert cfg.skipped == ("p",)


def test_one_brush_control_can_hold_lesion_and_pattern_labels():
    xml = view(
        f'<BrushLabels name="b" toName="image"><Label value="Lesion"/>{PATTERN_LABELS}<Label value="Hair"/></BrushLabels>'
    )
    cfg = parse_config(xml)
    assert cfg.lesion.values == {"lesion": "Lesion"}
    assert len(cfg.regions.values) == 7
    assert cfg.regions.unmapped == ("Hair",)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "the labeling config is empty"),
        ("<View><Choices", "not valid Label Studio XML"),
        (
            view('<Choices name="q" toName="image"><Choice value="Yes"/><Choice value="No"/></Choices>'),
            r"(?s)no control of this labeling config maps.*Choices 'q'.*BCC and non-BCC",
        ),
        (
            view(
                '<Choices name="d" toName="image" choice="multiple"><Choice value="BCC"/><Choice value="non-BCC"/></Choices>'
            ),
            'diagnosis control "d" allows several choices; set choice="single"',
        ),
        (
            view(f'<Choices name="p" toName="image" choice="single">{PATTERN_CHOICES}</Choices>'),
            'pattern control "p" allows one choice only.*set choice="multiple"',
        ),
        (
            view(DIAGNOSIS, DIAGNOSIS.replace('name="diagnosis"', 'name="dx2"')),
            'two controls provide the diagnosis: "diagnosis" and "dx2"; remove one or mark it model_skip',
        ),
        (
            view(
                f'<Choices name="all" toName="image" choice="multiple"><Choice value="BCC"/>{PATTERN_CHOICES}</Choices>'
            ),
            'control "all" mixes diagnosis values.*split them into two <Choices>',
        ),
        (
            view(
                '<Text name="t" value="$text"/>'
                '<Choices name="d" toName="t" choice="single"><Choice value="BCC"/><Choice value="non-BCC"/></Choices>'
            ),
            'control "d" points to toName="t", which is not an <Image>',
        ),
        (
            view(
                '<Choices name="d" toName="image" choice="single"><Choice value="BCC"/><Choice value="Unsure"/></Choices>'
            ),
            'looks like the diagnosis.*add <Choice value="BCC"/> and <Choice value="non-BCC"/>',
        ),
        (
            view(
                '<Choices name="d" toName="image" choice="single" model_score_threshold="high">'
                '<Choice value="BCC"/><Choice value="non-BCC"/></Choices>'
            ),
            'model_score_threshold="high"; use a number between 0 and 1',
        ),
        (
            view(DIAGNOSIS, image='<Image name="image" value="https://example.org/a.png"/>'),
            'it must read the image from task data, e.g. value="\\$image"',
        ),
        (
            '<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
            '<Choices name="d" toName="a" choice="single"><Choice value="BCC"/><Choice value="non-BCC"/></Choices>'
            f'<Choices name="p" toName="b" choice="multiple">{PATTERN_CHOICES}</Choices></View>',
            "point at different images",
        ),
    ],
    ids=[
        "empty",
        "bad-xml",
        "nothing-maps",
        "multi-diagnosis",
        "single-patterns",
        "duplicate",
        "mixed",
        "not-an-image",
        "half-diagnosis",
        "bad-threshold",
        "static-image",
        "two-images",
    ],
)
def test_configs_that_cannot_be_mapped_say_what_to_fix(xml, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(xml)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_a_subset_of_ham_classes_is_the_seven_class_diagnosis_not_the_bcc_one():
    xml = view(
        '<Choices name="d" toName="image" choice="single"><Choice value="BCC"/><Choice value="Melanoma"/></Choices>'
    )
    cfg = parse_config(xml)
    assert cfg.diagnosis is None
    assert cfg.ham_diagnosis.values == {"bcc": "BCC", "mel": "Melanoma"}


def test_bcc_lesion_config_adds_the_outline_to_the_regions_control():
    cfg = parse_config(load_config("bcc_lesion"))
    assert cfg.lesion is not None and cfg.regions is not None
    assert cfg.lesion.name == cfg.regions.name == "regions"  # one brush control, two roles
    assert dict(cfg.lesion.values) == {"lesion": "Lesion"}
    assert tuple(cfg.regions.values) == ("bcc", *PATTERN_KEYS)
    assert cfg.diagnosis is not None and cfg.ham_diagnosis is None
