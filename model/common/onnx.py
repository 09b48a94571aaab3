"""One writer of ONNX graphs for every served network (:mod:`model.multitask.export`,
:mod:`model.lesion.export`): ``torch.onnx``'s dynamo exporter, the batch axis dynamic, the weights inside
the one file, the checkpoint's metadata in ``metadata_props`` (:data:`model.common.meta.ONNX_META_KEY`),
written atomically. And :func:`read_metadata`, which reads that metadata back with neither PyTorch nor
the ``onnx`` package (a serving process has neither)."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from model.common.files import atomic_copy
from model.common.meta import ONNX_META_KEY, ModelMeta

if TYPE_CHECKING:
    import torch
    from torch import nn

OPSET = 18
MAX_BATCH = 1024


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("a truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """The top-level fields of a protobuf message: (number, wire type, bytes or integer)."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            yield number, wire, value
        elif wire == 2:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise ValueError("a truncated field")
            yield number, wire, data[at : at + size]
            at += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, wire, data[at : at + width]
            at += width
        else:
            raise ValueError(f"wire type {wire} is not in an ONNX file")


METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1, value = 2}


def read_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read straight from its protobuf (the weights are skipped).

    Raises:
        ValueError: the file is not a protobuf message.
    """
    found: dict[str, str] = {}
    for number, wire, value in _fields(Path(path).read_bytes()):
        if number == METADATA_PROPS and wire == 2 and isinstance(value, bytes):
            entry = {n: v for n, w, v in _fields(value) if w == 2 and isinstance(v, bytes)}
            found[entry.get(1, b"").decode("utf-8")] = entry.get(2, b"").decode("utf-8")
    return found


def write_onnx(
    wrapped: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    meta: ModelMeta,
    path: str | Path,
) -> Path:
    """Export ``wrapped`` (its ``forward(first, *rest)`` taking ``example``) to ``path``; the path.

    Every input's first axis is the one dynamic ``batch``; ``inputs`` / ``outputs`` name the graph's.
    """
    import onnx
    import torch

    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # forward(images) or forward(images, *rest): the structure of its arguments
    rest = (tuple({0: batch} for _ in example[1:]),) if len(example) > 1 else ()
    shapes = ({0: batch}, *rest)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        exported = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # inputs sharing the one ``batch`` axis: the exporter says so, harmlessly
            warnings.filterwarnings(
                "ignore", message=r".*shares the same shape constraints with another axis"
            )
            torch.onnx.export(
                wrapped.eval(),
                example,
                str(exported),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_shapes=shapes,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,  # the weights inside the one file
                optimize=True,
                verbose=False,
            )
        graph = onnx.load(str(exported))
        entry = graph.metadata_props.add()
        entry.key, entry.value = ONNX_META_KEY, json.dumps(meta.to_dict())
        onnx.save(graph, str(exported))
        atomic_copy(exported, path)
    return path
