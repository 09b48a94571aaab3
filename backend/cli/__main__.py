"""``python -m backend.cli``: the ``dermassist`` command."""

from backend.cli import main

raise SystemExit(main())
