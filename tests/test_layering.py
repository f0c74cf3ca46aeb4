"""The data flow is the layout (DESIGN.md): imports point backward along it, never forward.

``FLOW`` below is the flow of DESIGN.md as data, earliest first; packages in one layer may
not import each other (apart from the few edges in ``SIBLING``, none today). The walk reads
every ``import`` in the package, at module level and inside functions alike: an import
deferred into a function still runs, so it still points somewhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import baobab

PACKAGE = Path(baobab.__file__).parent

# DESIGN.md's flow, earliest first. ``export`` (the formats of model directories, read and
# written) comes before ``train``, which reads them for --model.init and teachers and never
# needs the loop's output format to be written by itself.
FLOW: list[set[str]] = [
    {"diskspace", "recipes", "storage"},  # leaf utilities: nothing of baobab
    {"data"},
    {"models"},
    {"optim", "parallel", "checkpoint", "horovod"},
    {"export"},
    {"registry"},  # versioned exports by name: train, serve and explain read models:/ names
    {"train", "explain"},  # explain: Captum and hooks around a finished model
    {"serve"},
    {"launch"},  # the torchrun launcher: nothing of baobab
    {"commands"},  # typed functions; never the CLI that parses for them
    {"cli"},
    {"worker", "__main__"},
]
SIBLING: set[tuple[str, str]] = set()  # allowed imports within a layer
SERVING = ("fastapi", "uvicorn", "jinja2", "starlette", "prometheus_client")


def _layer(part: str) -> int:
    for index, layer in enumerate(FLOW):
        if part in layer:
            return index
    raise AssertionError(f"baobab.{part} is not in the test's FLOW: place it in DESIGN.md's flow")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every baobab import in ``path``; ``from baobab import x``
    names the submodule x."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "baobab":  # from baobab import models, train
                found += [(node.lineno, f"baobab.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == "baobab"]


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the root package itself


def test_every_import_points_backward_along_the_flow() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _top(_module_name(path))
        for line, target in _imports(path):
            dest = _top(target)
            if source is None or dest is None or dest == source:
                continue
            backward = _layer(dest) < _layer(source)
            if not backward and (source, dest) not in SIBLING:
                where = path.relative_to(PACKAGE.parent)
                wrong.append(f"{where}:{line} imports {target} (baobab.{dest} is not before baobab.{source})")  # fmt: skip
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_the_walk_sees_deferred_and_package_imports() -> None:
    """The walk finds imports deferred into functions (commands.plan imports the planner
    when it runs) and ``from baobab import x`` as baobab.x."""
    names = {name for _, name in _imports(PACKAGE / "commands.py")}
    assert {"baobab.train.plan_report", "baobab.models"} <= names
    assert _layer("serve") > _layer("train") > _layer("export") > _layer("checkpoint")


def test_training_imports_no_serving_stack(tiny_corpus, tmp_path) -> None:
    """A training run through the CLI (what a torchrun worker executes) loads neither
    FastAPI, uvicorn, Starlette, Jinja nor the Prometheus client; commands.py not the CLI."""
    code = (
        "import sys\n"
        "from baobab.cli import main\n"
        f"assert main(['train', '--model.name', 'gpt-nano', '--data.path', {str(tiny_corpus)!r},"
        " '--data.seq_len', '32', '--data.batch_size', '2', '--train.max_steps', '1',"
        " '--train.progress', 'false', '--train.eval_every', '0',"
        f" '--train.run_dir', {str(tmp_path / 'run')!r}]) == 0\n"
        f"print(sorted(set({SERVING!r}) & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
    commands = subprocess.run(
        [sys.executable, "-c", "import sys, baobab.commands; print('baobab.cli' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert commands.stdout.strip() == "False", commands.stderr[-2000:]
