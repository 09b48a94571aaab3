"""``study freeze`` / ``study verify``: a study's numbers locked into one bundle, and checked later."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.cli.common import _database_url


def _config(args: argparse.Namespace) -> str | None:
    return Path(args.config).read_text(encoding="utf-8") if args.config else None


def cmd_study_freeze(args: argparse.Namespace) -> int:
    """Lock a consensus run (default: the latest) into a bundle: the study CSVs, the region masks, the HTML
    report, the Label Studio import file, the gold labels, a methods paragraph and a manifest with the
    run, the served model version, the answers' hash, the settings and every file's SHA-256. The same
    store gives the same bytes."""
    from backend.bundle import freeze
    from consensus.db import init_db

    out = Path(args.out)
    engine, sessions = init_db(_database_url(args))
    try:
        with sessions() as session:
            manifest = freeze(session, out, args.run, _config(args), args.n_boot)
    finally:
        engine.dispose()
    run = manifest["run"]
    print(
        f"consensus run {run['id']} ({run['method']}) frozen into {out}: {len(manifest['files'])} files, "
        f"answers {manifest['answers_hash'][:12]}, {manifest['gold']['n']} gold labels"
    )
    return 0


def cmd_study_verify(args: argparse.Namespace) -> int:
    """Check a frozen bundle: every file against the manifest, and the store against the bundle (answers,
    gold labels and every file are frozen again and compared). Exit status 1 names what differs."""
    from backend.bundle import verify
    from consensus.db import init_db

    engine, sessions = init_db(_database_url(args))
    try:
        with sessions() as session:
            problems = verify(session, Path(args.bundle), _config(args))
    finally:
        engine.dispose()
    if problems:
        for line in problems:
            print(f"differs: {line}", file=sys.stderr)
        print(f"{args.bundle}: {len(problems)} difference(s)")
        return 1
    print(f"{args.bundle}: verified, the bundle and the store agree")
    return 0
