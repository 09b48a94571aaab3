"""The ``dermassist`` command line: one command, subcommands by job (:mod:`backend.cli.parser`).

Heavy libraries (torch, the Label Studio SDK) are imported inside the subcommands that need them,
so ``dermassist --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from backend.cli.common import _given
from backend.cli.parser import build_parser

__all__ = ["_given", "build_parser", "main"]

#: What the ``train`` extra adds (pyproject.toml): a command needing one of them says so.
TRAIN_EXTRA = frozenset(
    {"torch", "torchvision", "pytorch_grad_cam", "sklearn", "matplotlib", "onnx", "onnxscript"}
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dermassist`` console script."""
    from backend.settings import Settings, SettingsError

    try:
        env = Settings.from_env()  # the environment, read once; its values are the options' defaults
    except SettingsError as exc:
        print(f"dermassist: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(env)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    func: Callable[[argparse.Namespace], int] = args.func
    from backend.label_studio.client import LabelStudioError

    try:
        return func(args)
    except (ValueError, FileExistsError, FileNotFoundError, LabelStudioError) as exc:
        # Bad input gets one clear line, not a traceback.
        print(f"dermassist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in TRAIN_EXTRA:
            raise
        # A serving install (the serve Docker image) has no PyTorch: say where it is.
        print(
            f"dermassist {args.command}: error: this needs {exc.name.split('.')[0]}, which a serving install "
            "leaves out: install dermassist[train] (in Docker: run it in the worker image)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"dermassist {args.command}: interrupted", file=sys.stderr)
        return 130
