"""``python -m baobab`` (and ``torchrun -m baobab``) runs the CLI."""

import os
import sys

from baobab.cli import main
from baobab.launch import in_worker

code = main()
if in_worker():
    # A torchrun worker has finished its work (checkpoints written, process group
    # destroyed). Interpreter teardown can still abort in a C++ destructor of a collective
    # backend thread ("terminate called without an active exception"), turning a finished
    # run into a failed one; leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
