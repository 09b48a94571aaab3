"""One writer of ONNX graphs for every served network (:mod:`model.multitask.export`,
:mod:`model.lesion.export`): ``torch.onnx``'s dynamo exporter, the batch axis dynamic, the weights inside
the one file, the checkpoint's metadata in ``metadata_props`` (:data:`model.common.meta.ONNX_META_KEY`),
written atomically."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from model.common.files import atomic_copy
from model.common.meta import ONNX_META_KEY, ModelMeta

if TYPE_CHECKING:
    import torch
    from torch import nn

OPSET = 18
MAX_BATCH = 1024


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
