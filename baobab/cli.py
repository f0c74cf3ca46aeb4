"""The ``baobab`` command: a table of subcommand -> typed function (DESIGN principle 5).

jsonargparse turns each function signature and config dataclass into flags, help and the
recipe schema; ``baobab train --recipe NAME --optim.lr 3e-4`` loads a recipe and overrides
any key with a dotted flag. A user error ends the command with one sentence and exit 2; a
run that cannot go on (bad numbers, a full disk) with one sentence and exit 1.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import docstring_parser
from jsonargparse import ArgumentParser, Namespace

from baobab import commands, launch, models
from baobab.data import PrepareConfig
from baobab.diskspace import DiskFullError
from baobab.train.flags import instantiate as _instantiate
from baobab.train.flags import parse_run_config, run_config_parser
from baobab.train.flags import to_run_config as _to_run_config
from baobab.train.trainer import TrainingError

__all__ = ["build_parser", "main", "parse_run_config", "run_config_parser"]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, TrainingError, DiskFullError)
# Not bad input but a run that cannot go on: exit 1 (bad input exits 2).
RUN_ERRORS = (TrainingError, DiskFullError)


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
# group of subcommands (``baobab hf export``). A "module:function" string is imported only
# when its command runs (or --help lists it): the serving stack (FastAPI, uvicorn, Jinja)
# stays out of training workers and every other command.
Command = Callable[..., Any] | str
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "eval": commands.evaluate,
    "export": commands.export,
    "quantize": commands.quantize,
    "generate": commands.generate,
    "models": commands.list_models,
    "recipes": commands.list_recipes,
    "quickstart": commands.quickstart,
    "plot": commands.plot,
    "hf": {"export": commands.hf_export, "import": commands.hf_import},
    "bench": {"serve": "baobab.serve.bench:bench_serve"},
    "serve": "baobab.serve.http_command:serve",
    "explain": "baobab.explain.command:explain_command",
    "registry": {  # the versioned model registry (baobab/registry)
        "push": "baobab.registry.command:push",
        "pull": "baobab.registry.command:pull",
        "list": "baobab.registry.command:list_models",
        "show": "baobab.registry.command:show",
        "alias": "baobab.registry.command:alias",
        "verify": "baobab.registry.command:verify",
        "rm": "baobab.registry.command:rm",
    },
}
BUILT_IN = ("train", "finetune", "prepare", "plan")  # parsers of their own, below


def _resolve(command: Command) -> Callable[..., Any]:
    if isinstance(command, str):
        module, _, name = command.partition(":")
        return getattr(importlib.import_module(module), name)
    return command


def _function_parser(command: Command) -> ArgumentParser:
    function = _resolve(command)
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


def _summary(command: Command) -> str:
    return (_resolve(command).__doc__ or "").strip().splitlines()[0]


def build_parser(only: str | None = None) -> ArgumentParser:
    """The ``baobab`` parser; with ``only``, just that subcommand's (what ``main`` parses,
    so a command imports what it runs and no other command's modules)."""
    parser = ArgumentParser(
        prog="baobab", description="Grow large models: prepare, train, evaluate, generate."
    )
    subcommands = parser.add_subcommands()

    def wanted(name: str) -> bool:
        return only is None or name == only

    if wanted("train"):
        subcommands.add_subcommand("train", run_config_parser(), help="train a model from a recipe")
    if wanted("finetune"):
        subcommands.add_subcommand(
            "finetune",
            run_config_parser("baobab finetune"),
            help="fine-tune the model in --model.init DIR (LoRA adapters with --lora.rank R)",
        )
    if wanted("prepare"):
        subcommands.add_subcommand(
            "prepare", prepare_parser(), help=commands.prepare.__doc__.splitlines()[0]
        )
    if wanted("plan"):
        subcommands.add_subcommand(
            "plan", plan_parser(), help="memory and time a run needs per device"
        )
    for name, target in COMMANDS.items():
        if not wanted(name):
            continue
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


def _call(target: Command | dict[str, Command], ns: Namespace) -> None:
    ns = ns.clone()
    ns.pop("__path__", None)
    if isinstance(target, dict):
        action = ns.pop("action")
        return _call(target[action], ns[action])
    target = _resolve(target)
    params = inspect.signature(target).parameters.values()
    args = [ns.pop(p.name) for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    target(*args, **vars(ns))


def _underscored(arg: str) -> str:
    """``--max-queue=4`` -> ``--max_queue=4``: flags may be spelled with - or _."""
    if not arg.startswith("--"):
        return arg
    flag, sep, value = arg.partition("=")
    return "--" + flag[2:].replace("-", "_") + sep + value


def _registry_names_pulled(argv: list[str]) -> list[str]:
    """Training's model directories (``--model.init``, ``--distill.teacher``) may be registry
    names (``models:/NAME@ALIAS``, ``models:/NAME/3``): each is pulled into the cache and
    verified here, once, before any worker starts, and handed on as its directory."""
    if not any("models:/" in arg for arg in argv):
        return argv
    from baobab.registry import resolve_model_dir

    pulled = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and value.startswith("models:/"):
            arg = f"{flag}={resolve_model_dir(value)}"
        elif arg.startswith("models:/"):
            arg = str(resolve_model_dir(arg))
        pulled.append(arg)
    return pulled


def main(argv: Sequence[str] | None = None) -> int:
    argv = [_underscored(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    named = argv[0] if argv and argv[0] in (*BUILT_IN, *COMMANDS) else None
    parser = build_parser(only=named)
    try:
        if named in ("train", "finetune", "plan") and not launch.in_worker():
            argv = _registry_names_pulled(argv)
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
