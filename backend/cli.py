"""The ``dermassist`` command line.

Heavy libraries (torch, the Label Studio SDK) are imported inside the subcommands that need them,
so ``dermassist --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.synthetic import SynthConfig

logger = logging.getLogger("dermassist")

DEFAULT_DEMO_DIR = Path("runs/demo")


def _version() -> str:
    try:
        return version("dermassist")
    except PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


def _range(text: str) -> tuple[float, float]:
    """Parse ``LOW:HIGH`` (or one number for both) into a probability range."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH probabilities, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH <= 1, got {text!r}")
    return values[0], values[1]


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _add_synth_options(p: argparse.ArgumentParser, n: int) -> None:
    g = p.add_argument_group("synthetic study")
    g.add_argument("--n", type=int, default=n, help="number of images (default: %(default)s)")
    g.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    g.add_argument("--raters", type=int, default=4, help="simulated dermatologists (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument(
        "--prevalence", type=_probability, default=0.4, help="share of BCC lesions (default: %(default)s)"
    )
    g.add_argument(
        "--label-noise",
        type=_probability,
        default=0.02,
        help="probability that the diagnosis contradicts the criterion (default: %(default)s)",
    )
    g.add_argument(
        "--sensitivity",
        type=_range,
        default=(0.75, 0.95),
        metavar="LOW:HIGH",
        help="range of each rater's per-label sensitivity (default: 0.75:0.95)",
    )
    g.add_argument(
        "--specificity",
        type=_range,
        default=(0.85, 0.98),
        metavar="LOW:HIGH",
        help="range of each rater's per-label specificity (default: 0.85:0.98)",
    )
    g.add_argument(
        "--missing",
        type=_probability,
        default=0.1,
        help="probability that a rater skips an image (default: %(default)s)",
    )
    g.add_argument("--no-sheet", action="store_true", help="do not write contact_sheet.png")


def _synth_config(args: argparse.Namespace) -> SynthConfig:
    from model.synthetic import RaterProfile, SynthConfig

    return SynthConfig(
        n=args.n,
        size=args.size,
        raters=args.raters,
        seed=args.seed,
        prevalence=args.prevalence,
        label_noise=args.label_noise,
        rater=RaterProfile(sensitivity=args.sensitivity, specificity=args.specificity, missing=args.missing),
    )


def _write_study(args: argparse.Namespace, out: Path) -> int:
    from model.synthetic import contact_sheet, generate

    summary = generate(_synth_config(args), out, progress=not args.quiet)
    if not args.no_sheet:
        contact_sheet(out).save(out / "contact_sheet.png")
    print(summary.line())
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Draw a synthetic dermoscopy study with simulated dermatologists."""
    return _write_study(args, Path(args.out))


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults (for now: a synthetic study)."""
    out = Path(args.out) / "study"
    code = _write_study(args, out)
    sheet = "" if args.no_sheet else f"; look at {out / 'contact_sheet.png'}"
    print(f"demo: study written to {out.resolve()}{sheet}")
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dermassist",
        description="Label Studio ML backend for dermoscopy studies: pre-annotation, "
        "dermatologist consensus, retraining and study export.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s; env LOG_LEVEL)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    synth = sub.add_parser("synth", help=cmd_synth.__doc__, description=cmd_synth.__doc__)
    synth.add_argument("--out", required=True, help="output folder (created)")
    _add_synth_options(synth, n=500)
    synth.set_defaults(func=cmd_synth)

    demo = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    demo.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help="output folder (default: %(default)s)")
    _add_synth_options(demo, n=200)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dermassist`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        # Bad input gets one clear line, not a traceback.
        print(f"dermassist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dermassist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
