"""``python -m baobab`` (and ``torchrun -m baobab``) runs the CLI."""

import sys

from baobab.cli import main

sys.exit(main())
