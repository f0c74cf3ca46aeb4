"""The ``baobab`` command: a table of subcommand -> typed function (DESIGN principle 5).

jsonargparse turns each function signature and config dataclass into flags, help and the
recipe schema; ``baobab train --recipe NAME --optim.lr 3e-4`` loads a recipe and overrides
any key with a dotted flag. A user error ends the command with one sentence and exit 2; a
run that cannot go on (bad numbers, a full disk) with one sentence and exit 1.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import docstring_parser  # noqa: E402
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace  # noqa: E402

from baobab import commands, launch, models  # noqa: E402
from baobab.data import PrepareConfig  # noqa: E402
from baobab.diskspace import DiskFullError  # noqa: E402
from baobab.recipes import recipe_path  # noqa: E402
from baobab.serve.bench import bench_serve  # noqa: E402
from baobab.serve.http_command import serve  # noqa: E402
from baobab.train.config import RunConfig  # noqa: E402
from baobab.train.trainer import TrainingError  # noqa: E402

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, TrainingError, DiskFullError)
# Not bad input but a run that cannot go on: exit 1 (bad input exits 2).
RUN_ERRORS = (TrainingError, DiskFullError)


class RecipeAction(ActionConfigFile):
    """``--recipe NAME`` loads ``baobab/recipes/NAME.yaml`` (or a YAML path) as a config file."""

    def __call__(self, parser, cfg, values, option_string=None):
        super().__call__(parser, cfg, str(recipe_path(values)), option_string)


def run_config_parser(prog: str = "baobab train") -> ArgumentParser:
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
    return _to_run_config(parser, parser.parse_args(list(args)))


def _to_run_config(parser: ArgumentParser, ns: Namespace) -> RunConfig:
    ns = ns.clone()
    if ns.pop("deterministic", False):
        ns["train.deterministic"] = True
    return _instantiate(parser, ns, RunConfig)


def _instantiate(parser: ArgumentParser, ns: Namespace, kind: type):
    """Build ``kind`` from parsed flags; its own validation (``__post_init__``) runs here."""
    ns = ns.clone()
    for key in ("recipe", "__path__"):
        ns.pop(key, None)
    return kind(**vars(parser.instantiate(ns)))


def prepare_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="baobab prepare", description=commands.prepare.__doc__)
    parser.add_argument(
        "inputs", nargs="+", help="text, .jsonl or .parquet files, or directories of them"
    )
    parser.add_class_arguments(PrepareConfig, None, skip={"inputs"})
    return parser


# ``baobab plan``'s own flags beyond ``baobab train``'s: name -> (type, default, help).
PLAN_FLAGS: dict[str, tuple[type, Any, str]] = {
    "nproc_per_node": (int, 1, "ranks per node, as for baobab train"),
    "nnodes": (int, 1, "number of nodes, as for baobab train"),
    "device_memory": (str, None, "memory per device, e.g. 80GiB (default: this machine's)"),
    "device_peak_tflops": (float, None, "peak TFLOP/s per device (default: known or measured)"),
    "intra_node_gbps": (float, 200.0, "GB/s a rank moves in collectives within a node"),
    "inter_node_gbps": (float, 25.0, "GB/s a rank moves in collectives across nodes"),
}


def plan_parser() -> ArgumentParser:
    parser = run_config_parser("baobab plan")
    parser.description = commands.plan.__doc__.split("``search``")[0].strip()
    for name, (kind, default, help_text) in PLAN_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind | None if default is None else kind,
                            default=default, help=help_text)  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--search", action="store_true", help="rank every layout of the world size that fits"
    )
    return parser


# subcommand -> typed function; its signature is the subcommand's flags. A nested dict is a
# group of subcommands (``baobab hf export``).
COMMANDS: dict[str, Callable[..., Any] | dict[str, Callable[..., Any]]] = {
    "eval": commands.evaluate,
    "export": commands.export,
    "quantize": commands.quantize,
    "generate": commands.generate,
    "models": commands.list_models,
    "recipes": commands.list_recipes,
    "quickstart": commands.quickstart,
    "plot": commands.plot,
    "hf": {"export": commands.hf_export, "import": commands.hf_import},
    "bench": {"serve": bench_serve},
    "serve": serve,
}


def _function_parser(function: Callable[..., Any]) -> ArgumentParser:
    sub = ArgumentParser()
    # A leading list parameter (``plot RUN_DIR [RUN_DIR ...]``) and positional-only string
    # parameters (before ``/``: ``hf export DIR``) are positional; the rest are flags.
    params = list(inspect.signature(function).parameters.values())
    first = params[0] if params else None
    skip = set()
    if first is not None and str(first.annotation).startswith("list"):
        sub.add_argument(first.name, nargs="+")
        skip.add(first.name)
    docs = {
        d.arg_name: d.description for d in docstring_parser.parse(function.__doc__ or "").params
    }
    for param in params:
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            sub.add_argument(param.name, help=docs.get(param.name))
            skip.add(param.name)
    sub.add_function_arguments(function, None, skip=skip)
    return sub


def _summary(function: Callable[..., Any]) -> str:
    return (function.__doc__ or "").strip().splitlines()[0]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="baobab", description="Grow large models: prepare, train, evaluate, generate."
    )
    subcommands = parser.add_subcommands()
    subcommands.add_subcommand("train", run_config_parser(), help="train a model from a recipe")
    subcommands.add_subcommand(
        "finetune",
        run_config_parser("baobab finetune"),
        help="fine-tune the model in --model.init DIR (LoRA adapters with --lora.rank R)",
    )
    subcommands.add_subcommand(
        "prepare", prepare_parser(), help=commands.prepare.__doc__.splitlines()[0]
    )
    subcommands.add_subcommand("plan", plan_parser(), help="memory and time a run needs per device")
    for name, target in COMMANDS.items():
        if isinstance(target, dict):
            group = ArgumentParser()
            # jsonargparse wants the group attached before its own subcommands are added.
            subcommands.add_subcommand(name, group, help=f"{name}: {', '.join(target)}")
            inner = group.add_subcommands(dest="action")
            for action, function in target.items():
                inner.add_subcommand(action, _function_parser(function), help=_summary(function))
        else:
            subcommands.add_subcommand(name, _function_parser(target), help=_summary(target))
    return parser


def _call(target: Callable[..., Any] | dict[str, Callable[..., Any]], ns: Namespace) -> None:
    ns = ns.clone()
    ns.pop("__path__", None)
    if isinstance(target, dict):
        action = ns.pop("action")
        return _call(target[action], ns[action])
    params = inspect.signature(target).parameters.values()
    args = [ns.pop(p.name) for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    target(*args, **vars(ns))


def _underscored(arg: str) -> str:
    """``--max-queue=4`` -> ``--max_queue=4``: flags may be spelled with - or _."""
    if not arg.startswith("--"):
        return arg
    flag, sep, value = arg.partition("=")
    return "--" + flag[2:].replace("-", "_") + sep + value


def main(argv: Sequence[str] | None = None) -> int:
    argv = [_underscored(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    try:
        if argv[:1] in (["train"], ["finetune"]) and not launch.in_worker():
            launch_args, argv = launch.split_launch_args(argv)
            if launch_args:
                # Refuse bad flags, values and layouts before starting any worker (a
                # model.init directory is read by the workers themselves).
                cfg = _to_run_config(run_config_parser(), parser.parse_args(argv)[argv[0]])
                world = launch.world_size(launch_args)
                if world is not None and cfg.model.init is None:
                    model_cfg = models.get_config(cfg.model.name, **cfg.model.overrides)
                    cfg.parallel.validate(world, model_cfg)
                return launch.launch(launch_args, argv)
        ns = parser.parse_args(argv)
        name = ns.subcommand
        if name in ("train", "finetune"):
            command = commands.train if name == "train" else commands.finetune
            command(_to_run_config(run_config_parser(), ns[name]))
        elif name == "plan":
            ns = ns[name].clone()
            extra = {key: ns.pop(key) for key in (*PLAN_FLAGS, "json", "search")}
            extra["as_json"] = extra.pop("json")
            return 0 if commands.plan(_to_run_config(run_config_parser(), ns), **extra) else 1
        elif name == "prepare":
            commands.prepare(_instantiate(prepare_parser(), ns[name], PrepareConfig))
        else:
            _call(COMMANDS[name], ns[name])
    except USER_ERRORS as err:
        if os.environ.get("BAOBAB_DEBUG"):
            raise
        rank = f"rank {os.environ['RANK']}: " if launch.in_worker() else ""
        print(f"{rank}error: {err}", file=sys.stderr)
        return 1 if isinstance(err, RUN_ERRORS) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
