"""A run's flags: ``RunConfig`` from recipes and dotted command-line overrides.

jsonargparse turns the config dataclasses into flags, help and the recipe schema;
``--recipe NAME --optim.lr 3e-4`` loads ``baobab/recipes/NAME.yaml`` and overrides any key.
Shared by the ``baobab`` command (``baobab.cli``), the commands that build runs themselves
(``baobab quickstart``) and scripts; it imports nothing of the serving stack.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace  # noqa: E402

from baobab.recipes import recipe_path  # noqa: E402
from baobab.train.config import RunConfig  # noqa: E402


class RecipeAction(ActionConfigFile):
    """``--recipe NAME`` loads ``baobab/recipes/NAME.yaml`` (or a YAML path) as a config file."""

    def __call__(self, parser, cfg, values, option_string=None):
        super().__call__(parser, cfg, str(recipe_path(values)), option_string)


def run_config_parser(prog: str = "baobab train") -> ArgumentParser:
    """The parser of ``baobab train``'s flags (``--recipe``, ``--deterministic``, RunConfig)."""
    parser = ArgumentParser(
        prog=prog, description="Train a model from a recipe and dotted overrides."
    )
    parser.add_argument(
        "--recipe", action=RecipeAction, help="a shipped recipe name or a YAML file"
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="shorthand for --train.deterministic true: repeatable bit for bit",
    )
    parser.add_class_arguments(RunConfig, None)
    return parser


def parse_run_config(args: Sequence[str]) -> RunConfig:
    """A validated RunConfig from command-line style arguments (used by the CLI and tests)."""
    parser = run_config_parser()
    return to_run_config(parser, parser.parse_args(list(args)))


def to_run_config(parser: ArgumentParser, ns: Namespace) -> RunConfig:
    """The RunConfig of flags parsed by ``run_config_parser``."""
    ns = ns.clone()
    if ns.pop("deterministic", False):
        ns["train.deterministic"] = True
    return instantiate(parser, ns, RunConfig)


def instantiate(parser: ArgumentParser, ns: Namespace, kind: type):
    """Build ``kind`` from parsed flags; its own validation (``__post_init__``) runs here."""
    ns = ns.clone()
    for key in ("recipe", "__path__"):
        ns.pop(key, None)
    return kind(**vars(parser.instantiate(ns)))
