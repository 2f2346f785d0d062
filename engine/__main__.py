"""`python -m engine ...` is the `sixfold` command (see engine/cli.py)."""

import sys

from engine.cli import main

sys.exit(main())
