"""baobab: grow large models from raw data to a served API, on PyTorch.

The packages follow the data flow: ``data`` (token shards, loaders) -> ``models`` ->
``optim`` -> ``train`` -> ``checkpoint``. The few names below are enough to train from
Python; see the README for the command line.
"""

__version__ = "0.1.0"
