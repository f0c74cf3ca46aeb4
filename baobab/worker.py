"""One torchrun worker of ``baobab train --nproc-per-node N``: ``baobab <args>`` in this process.

The launcher (``baobab/launch.py``) runs this file with torchrun's ``--run-path
--start-method forkserver``: each worker is forked from a forkserver that imported torch
and baobab once, so starting (and restarting) workers skips those imports. torchrun set
``sys.argv`` to ``[this file, *args]`` and the rank environment before running it.
"""

import sys

from baobab.cli import main

if __name__ == "__main__":  # torchrun's run_path runs it as __main__; importing it does nothing
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        # torchrun reports the exit code; a clean return lets it collect the worker's result.
        sys.exit(code)
