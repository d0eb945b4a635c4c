"""``python -m mukv``: the same as the ``mukv`` command."""

from .cli import main

raise SystemExit(main())
