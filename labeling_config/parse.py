"""Map a Label Studio labeling config onto the model's outputs.

A project's config is read as ``label_studio_sdk.label_interface.LabelInterface`` reads it and each
control is recognised by its *values*, not its name: a ``<Choices>`` whose choices are BCC /
non-BCC is the diagnosis, whatever it is called; one whose choices are dermoscopic patterns is
the pattern control; a ``<BrushLabels>`` with pattern labels holds the regions. So a team can rename
controls, rename a choice through ``alias``, or drop what it does not use. Matching ignores case,
spacing and punctuation, and accepts either the display name or the key
(``"Blue-grey ovoid nests"``, ``"blue gray ovoid nests"``, ``"ovoid_nests"``).

What cannot be mapped unambiguously raises :class:`ConfigError` with a message that says how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from xml.etree import ElementTree

from labeling_config.schema import (
    ACQUISITION_STRATEGIES,
    BCC,
    DIAGNOSIS_KEY,
    HAM_DIAGNOSES,
    LESION_LABEL,
    METADATA_FIELDS,
    NON_BCC,
    PATTERNS,
)

NON_BCC_KEY = "non_bcc"
LESION_KEY = "lesion"

_CHOICE_TAGS = frozenset({"Choices"})
_BRUSH_TAGS = frozenset({"BrushLabels"})
_MULTIPLE = "multiple"
_SINGLE = frozenset({"single", "single-radio"})

# Names a config may use for the metadata fields (after normalisation).
_METADATA_ALIASES: dict[str, frozenset[str]] = {
    "age": frozenset({"age", "ageapprox", "patientage"}),
    "sex": frozenset({"sex", "gender", "patientsex"}),
    "site": frozenset(
        {"site", "localization", "localisation", "location", "anatomsite", "anatomsitegeneral"}
    ),
}


class ConfigError(ValueError):
    """The labeling config cannot be mapped onto the model's outputs."""


class Role(StrEnum):
    """What a control of the project's config is used for."""

    DIAGNOSIS = "diagnosis"  # BCC / non-BCC, single choice
    PATTERNS = "patterns"  # the seven dermoscopic patterns, multiple choice
    REGIONS = "regions"  # brush masks of the patterns
    HAM_DIAGNOSIS = "ham_diagnosis"  # HAM10000 seven-class diagnosis, single choice
    LESION = "lesion"  # brush mask of the whole lesion


def normalize(text: str) -> str:
    """Case-, space- and punctuation-free form of a label, with 'gray' spelled 'grey'."""
    return re.sub(r"[^a-z0-9]", "", text.lower()).replace("gray", "grey")


def _vocabulary() -> dict[Role, dict[str, str]]:
    """Normalised spelling -> target key, per role."""
    patterns: dict[str, str] = {}
    for p in PATTERNS:
        patterns[normalize(p.key)] = p.key
        patterns[normalize(p.display)] = p.key
    diagnosis = {normalize(BCC): DIAGNOSIS_KEY, normalize(NON_BCC): NON_BCC_KEY}
    for synonym in ("not BCC", "no BCC", "non_bcc"):
        diagnosis[normalize(synonym)] = NON_BCC_KEY
    ham: dict[str, str] = {}
    for key, full in HAM_DIAGNOSES.items():
        ham[normalize(key)] = key
        ham[normalize(full)] = key
    lesion = {normalize(LESION_LABEL): LESION_KEY}
    # A BCC label in the regions control: where the model (or the dermatologist) sees the BCC.
    regions = {**patterns, normalize(BCC): DIAGNOSIS_KEY, normalize("BCC region"): DIAGNOSIS_KEY}
    return {
        Role.DIAGNOSIS: diagnosis,
        Role.PATTERNS: patterns,
        Role.REGIONS: regions,
        Role.HAM_DIAGNOSIS: ham,
        Role.LESION: lesion,
    }


_VOCABULARY = _vocabulary()


@dataclass(frozen=True)
class Control:
    """One control of the project's config as the model uses it.

    Attributes:
        role: what the model fills in with it.
        name: the control's ``name`` (the ``from_name`` of results).
        to_name: the object tag it labels (the ``to_name`` of results).
        values: target key -> the value to write in results (the choice's ``alias`` when it has one).
        multiple: whether several values may be chosen at once.
        threshold: the control's ``model_score_threshold`` attribute, if set.
        unmapped: values of the control that the model does not predict.
    """

    role: Role
    name: str
    to_name: str
    values: Mapping[str, str]
    multiple: bool = False
    threshold: float | None = None
    unmapped: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProjectConfig:
    """The typed mapping of a project's labeling config onto the model's outputs.

    Attributes:
        image: name of the ``<Image>`` tag the controls label.
        image_key: the task-data key that holds the image URL (``$image`` -> ``"image"``).
        controls: role -> control, only for the roles the config has.
        metadata: metadata field (age, sex, site) -> task-data key, where the config shows it.
        skipped: names of controls marked ``model_skip="true"``.
        ignored: names of controls that map onto nothing the model predicts.
        acquisition: the ``<Image>``'s ``acquisition`` attribute (one of
            :data:`~labeling_config.schema.ACQUISITION_STRATEGIES`): what the task score means in this
            project; None: the deployment's ``ACQUISITION``.
    """

    image: str
    image_key: str
    controls: Mapping[Role, Control]
    metadata: Mapping[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    acquisition: str | None = None

    def get(self, role: Role) -> Control | None:
        """The control with this role, or None when the config has none."""
        return self.controls.get(role)

    @property
    def diagnosis(self) -> Control | None:
        return self.controls.get(Role.DIAGNOSIS)

    @property
    def patterns(self) -> Control | None:
        return self.controls.get(Role.PATTERNS)

    @property
    def regions(self) -> Control | None:
        return self.controls.get(Role.REGIONS)

    @property
    def ham_diagnosis(self) -> Control | None:
        return self.controls.get(Role.HAM_DIAGNOSIS)

    @property
    def lesion(self) -> Control | None:
        return self.controls.get(Role.LESION)


_EXPECTED = """\
dermassist recognises these controls by their values (names are free):
  - a <Choices choice="single"> with the values BCC and non-BCC (the diagnosis);
  - a <Choices choice="multiple"> with some of the seven patterns: {patterns};
  - a <BrushLabels> with some of those patterns as labels (Grad-CAM regions);
  - a <Choices choice="single"> with the HAM10000 classes akiec, bcc, bkl, df, mel, nv, vasc;
  - a <BrushLabels> with the label Lesion.
Each must point (toName) at an <Image value="$..."> tag. See labeling_config/bcc.xml and lesion.xml."""


def _expected() -> str:
    return _EXPECTED.format(patterns=", ".join(p.display for p in PATTERNS))


@dataclass
class _Tag:
    """A tag of the config as :func:`_read_tags` reads it (the fields of label-studio-sdk's tags that
    the mapping uses)."""

    tag: str
    name: str
    attr: dict[str, str]
    to_name: list[str] = field(default_factory=list)  # a control's toName, split on commas
    value: str | None = None  # an object's value (``$key``)
    labels_attrs: dict[str, _Tag] = field(default_factory=dict)  # a control's labels by value


@dataclass
class _Tags:
    controls: list[_Tag]
    objects: list[_Tag]


#: Tags label-studio-sdk reads as a control's labels; ``Filter`` has a toName but is no control.
_LABEL_TAGS = frozenset({"Label", "Choice", "Relation"})
_NOT_CONTROLS = frozenset({"Filter"})


def _read_tags(config: str) -> _Tags:
    """The config's controls, objects and labels, read as ``label_studio_sdk.label_interface``
    (1.x) reads them, with the standard library's XML parser: a control is a tag with ``name`` and
    ``toName``; an object, one with ``name`` and ``value`` (or ``valueList``); a ``Label`` / ``Choice``
    belongs to its nearest enclosing control, under its ``alias`` or else its ``value``. (The SDK's
    parser drags faker, jsf and pydantic into every serving process: 45 MB each.)

    Raises:
        ConfigError: empty, or not well-formed XML.
    """
    if not config or not config.strip():
        raise ConfigError("the labeling config is empty")
    try:
        root = ElementTree.fromstring(config)
    except (ElementTree.ParseError, ValueError) as exc:
        raise ConfigError(f"the labeling config is not valid Label Studio XML: {exc}") from None
    parents = {child: parent for parent in root.iter() for child in parent}
    controls: dict[str, _Tag] = {}
    objects: dict[str, _Tag] = {}
    labels: dict[str, dict[str, _Tag]] = {}  # by the control's name, as the SDK keeps them
    for node in root.iter():
        if not isinstance(node.tag, str):
            continue  # a comment or a processing instruction
        attr = dict(node.attrib)
        name = attr.get("name")
        if name and attr.get("toName") and node.tag not in _NOT_CONTROLS:
            controls[name] = _Tag(node.tag, name, attr, to_name=attr["toName"].split(","))
        elif name and (attr.get("value") or attr.get("valueList")):
            objects[name] = _Tag(node.tag, name, attr, value=attr.get("valueList", attr.get("value")))
        elif node.tag in _LABEL_TAGS:
            value = attr.get("alias") or attr.get("value")
            parent = parents.get(node)
            while parent is not None and parent.attrib.get("name") not in controls:
                parent = parents.get(parent)
            if parent is not None and value is not None:
                labels.setdefault(parent.attrib["name"], {})[value] = _Tag(node.tag, "", attr)
    for name, control in controls.items():
        control.labels_attrs = labels.get(name, {})
    return _Tags(list(controls.values()), list(objects.values()))


def _threshold(control: Any) -> float | None:
    raw = control.attr.get("model_score_threshold")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(
            f'control "{control.name}" has model_score_threshold="{raw}"; use a number between 0 and 1'
        )
    return value


def _children(control: Any) -> Iterable[tuple[str, list[str]]]:
    """(value to emit in results, spellings to match) for each choice or label of a control."""
    for emitted, label in control.labels_attrs.items():
        spellings = [label.attr.get("value", ""), label.attr.get("alias", ""), emitted]
        yield emitted, [s for s in spellings if s]


def _match(control: Any, role: Role) -> tuple[dict[str, str], list[str]]:
    """Target key -> emitted value for the children that match ``role``'s vocabulary, and the rest."""
    vocabulary = _VOCABULARY[role]
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for emitted, spellings in _children(control):
        keys = {vocabulary[n] for n in map(normalize, spellings) if n in vocabulary}
        if len(keys) == 1:
            key = keys.pop()
            if key in matched:
                raise ConfigError(
                    f'control "{control.name}" has two values for the same output "{key}": '
                    f'"{matched[key]}" and "{emitted}"; keep one'
                )
            matched[key] = emitted
        else:
            unmatched.append(emitted)
    return matched, unmatched


def _classify_choices(control: Any) -> tuple[Role, dict[str, str], list[str]] | None:
    """Decide whether a <Choices> is the diagnosis, the HAM diagnosis or the patterns."""
    candidates = {role: _match(control, role) for role in (Role.DIAGNOSIS, Role.PATTERNS, Role.HAM_DIAGNOSIS)}
    ham, _ = candidates[Role.HAM_DIAGNOSIS]
    diagnosis, _ = candidates[Role.DIAGNOSIS]
    patterns, _ = candidates[Role.PATTERNS]
    # "bcc" is a HAM10000 class too: a control is the HAM diagnosis when it has other HAM classes.
    if len(set(ham) - {"bcc"}) >= 1 and not patterns and NON_BCC_KEY not in diagnosis:
        return Role.HAM_DIAGNOSIS, *candidates[Role.HAM_DIAGNOSIS]
    if diagnosis and patterns:
        raise ConfigError(
            f'control "{control.name}" mixes diagnosis values ({", ".join(diagnosis.values())}) '
            f"and pattern values ({', '.join(patterns.values())}); "
            "split them into two <Choices>: one single-choice for the diagnosis, "
            "one multiple-choice for the patterns"
        )
    if diagnosis:
        if set(diagnosis) != {DIAGNOSIS_KEY, NON_BCC_KEY}:
            have = ", ".join(diagnosis.values())
            raise ConfigError(
                f'control "{control.name}" looks like the diagnosis (it has {have}) but needs both '
                f'values: add <Choice value="{BCC}"/> and <Choice value="{NON_BCC}"/>'
            )
        return Role.DIAGNOSIS, *candidates[Role.DIAGNOSIS]
    if patterns:
        return Role.PATTERNS, *candidates[Role.PATTERNS]
    return None


def _check_choice_mode(control: Any, role: Role, values: Mapping[str, str]) -> bool:
    mode = control.attr.get("choice", "single")
    multiple: bool = mode == _MULTIPLE
    if role in (Role.DIAGNOSIS, Role.HAM_DIAGNOSIS) and multiple:
        raise ConfigError(
            f'the diagnosis control "{control.name}" allows several choices; '
            f'set choice="single" or choice="single-radio"'
        )
    if role is Role.PATTERNS and not multiple and len(values) > 1:
        raise ConfigError(
            f'the pattern control "{control.name}" allows one choice only, but a lesion can show '
            f'several patterns; set choice="multiple"'
        )
    if mode not in _SINGLE and not multiple:
        raise ConfigError(
            f'control "{control.name}" has choice="{mode}"; use "single", "single-radio" or "multiple"'
        )
    return multiple


def _metadata(objects: Iterable[Any]) -> dict[str, str]:
    """Metadata field -> task-data key, for the object tags that show age, sex or site."""
    found: dict[str, str] = {}
    for obj in objects:
        value = str(getattr(obj, "value", "") or "")
        if not value.startswith("$"):
            continue
        data_key = value[1:]
        names = {normalize(obj.name), normalize(data_key)}
        for fieldname in METADATA_FIELDS:
            if names & _METADATA_ALIASES[fieldname]:
                found.setdefault(fieldname, data_key)
    return found


def parse_config(config: str) -> ProjectConfig:
    """Parse a Label Studio labeling config and map its controls onto the model's outputs.

    Args:
        config: the labeling config XML (as Label Studio sends it to ``/setup``).

    Returns:
        The typed mapping: which control receives the diagnosis, the patterns, the regions, the
        HAM10000 diagnosis and the lesion mask, with the exact values to write in results.

    Raises:
        ConfigError: the XML is invalid, no control maps onto a model output, two controls claim
            the same output, or a control is set up in a way the model's output cannot fill.
            The message says what to change.
    """
    li = _read_tags(config)
    images = {obj.name: obj for obj in li.objects if obj.tag == "Image"}
    controls: dict[Role, Control] = {}
    skipped: list[str] = []
    ignored: list[str] = []

    for control in li.controls:
        if str(control.attr.get("model_skip", "false")).lower() == "true":
            skipped.append(control.name)
            continue
        found: list[tuple[Role, dict[str, str], list[str]]] = []
        if control.tag in _CHOICE_TAGS:
            classified = _classify_choices(control)
            if classified is not None:
                found.append(classified)
        elif control.tag in _BRUSH_TAGS:
            by_role = {role: _match(control, role)[0] for role in (Role.REGIONS, Role.LESION)}
            used = {v for values in by_role.values() for v in values.values()}
            rest = [label for label in control.labels_attrs if label not in used]
            found.extend((role, values, rest) for role, values in by_role.items() if values)
        if not found:
            ignored.append(control.name)
            continue

        targets = [t for t in control.to_name if t in images]
        if not targets:
            raise ConfigError(
                f'control "{control.name}" points to toName="{",".join(control.to_name)}", '
                f"which is not an <Image> tag of this config; point it at the image "
                f"(images here: {', '.join(images) or 'none'})"
            )
        for role, values, rest in found:
            if role in controls:
                raise ConfigError(
                    f'two controls provide the {role.value}: "{controls[role].name}" and '
                    f'"{control.name}"; remove one or mark it model_skip="true"'
                )
            brush = role in (Role.REGIONS, Role.LESION)
            multiple = True if brush else _check_choice_mode(control, role, values)
            controls[role] = Control(
                role=role,
                name=control.name,
                to_name=targets[0],
                values=values,
                multiple=multiple,
                threshold=_threshold(control),
                unmapped=tuple(rest),
            )

    if not controls:
        names = ", ".join(f"{c.tag} {c.name!r}" for c in li.controls) or "none"
        raise ConfigError(
            "no control of this labeling config maps onto the model's outputs "
            f"(controls found: {names}).\n{_expected()}"
        )
    used_images = {c.to_name for c in controls.values()}
    if len(used_images) > 1:
        raise ConfigError(
            f"the model's controls point at different images ({', '.join(sorted(used_images))}); "
            "point them all at one <Image>"
        )
    image = used_images.pop()
    value = str(images[image].value or "")
    if not value.startswith("$"):
        raise ConfigError(
            f'<Image name="{image}"> has value="{value}"; it must read the image from task data, '
            'e.g. value="$image"'
        )
    return ProjectConfig(
        image=image,
        image_key=value[1:],
        controls=controls,
        metadata=_metadata(li.objects),
        skipped=tuple(skipped),
        ignored=tuple(ignored),
        acquisition=_acquisition(images[image], controls),
    )


#: The strategies that sample the BCC model (Monte Carlo dropout, test-time views).
SAMPLED_STRATEGIES = ("bald", "tta")


def _acquisition(image: Any, controls: Mapping[Role, Control]) -> str | None:
    raw = image.attr.get("acquisition")
    if raw is None:
        return None
    if raw not in ACQUISITION_STRATEGIES:
        raise ConfigError(
            f'<Image name="{image.name}"> has acquisition="{raw}"; use one of '
            f"{', '.join(ACQUISITION_STRATEGIES)} (or leave it out for the deployment's ACQUISITION)"
        )
    if raw in SAMPLED_STRATEGIES and not {Role.DIAGNOSIS, Role.PATTERNS, Role.REGIONS} & set(controls):
        raise ConfigError(
            f'acquisition="{raw}" samples the BCC model, and this config has no control it fills '
            "(the BCC diagnosis, patterns or regions); use entropy or least_confidence"
        )
    return str(raw)
