"""The config reader reads what label-studio-sdk's LabelInterface reads (controls, their toName and
labels, objects), without importing the SDK in a serving process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from label_studio_sdk.label_interface.interface import LabelInterface

from labeling_config import load_config
from labeling_config.parse import ConfigError, _read_tags

ROOT = Path(__file__).resolve().parents[2]

TRICKY = [
    # nested views, an alias, a Filter with a toName, a comment, a label outside any control
    """<View><Filter name="f" toName="c"/><!-- a comment -->
      <View><Choices name="c" toName="img,other" choice="multiple"><View><Choice value="BCC" alias="bcc"/>
      <Choice value="non-BCC"/></View><Choice/></Choices></View>
      <Image name="img" value="$image"/><Text name="other" valueList="$texts"/><Label value="stray"/>
      <Header value="Age"/></View>""",
    # two controls of one name (the later one wins, with the labels of both), a brush
    """<View><Image name="i" value="$image"/>
      <BrushLabels name="b" toName="i"><Label value="Lesion"/></BrushLabels>
      <Choices name="b" toName="i"><Choice value="x"/></Choices></View>""",
]


def read_with_sdk(
    config: str,
) -> tuple[list[tuple[str, str, list[str], dict[str, dict[str, str]]]], list[tuple[str, str, str]]]:
    li = LabelInterface(config)
    controls = [
        (c.tag, c.name, list(c.to_name), {k: dict(v.attr) for k, v in (c.labels_attrs or {}).items()})
        for c in li.controls
    ]
    return controls, [(o.tag, o.name, o.value) for o in li.objects]


@pytest.mark.parametrize("config", [load_config(name) for name in ("bcc", "lesion", "bcc_lesion")] + TRICKY)
def test_the_reader_reads_what_label_studio_sdk_reads(config):
    tags = _read_tags(config)
    controls = [
        (c.tag, c.name, c.to_name, {k: v.attr for k, v in c.labels_attrs.items()}) for c in tags.controls
    ]
    assert (controls, [(o.tag, o.name, o.value) for o in tags.objects]) == read_with_sdk(config)


@pytest.mark.parametrize(
    "config", ["", "   ", "<View>", "<View><Image name='i' value='$x'></View>", "not xml"]
)
def test_what_is_not_a_config_is_a_config_error(config):
    with pytest.raises(ConfigError):
        _read_tags(config)


def test_an_encoding_declaration_is_read():
    config = '<?xml version="1.0" encoding="UTF-8"?>' + load_config("bcc")
    assert [c.name for c in _read_tags(config).controls] == [
        c.name for c in _read_tags(load_config("bcc")).controls
    ]


def test_parsing_a_config_imports_no_label_studio_sdk():
    probe = (
        "import sys; from labeling_config import load_config; from labeling_config.parse import parse_config; "
        "[parse_config(load_config(n)) for n in ('bcc', 'lesion', 'bcc_lesion')]; "
        "print(sorted(m for m in sys.modules if m.startswith('label_studio_sdk')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
