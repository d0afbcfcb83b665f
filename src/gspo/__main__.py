"""``python -m gspo`` (what torchrun launches): the same as the ``gspo`` command."""

from gspo.cli import main

raise SystemExit(main())
