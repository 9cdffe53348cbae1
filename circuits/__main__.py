"""``python -m circuits ARGS``: the ``circuits`` command (for a venv whose scripts are not on PATH)."""

import sys

from circuits.cli import main

sys.exit(main())
