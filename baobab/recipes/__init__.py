"""Ready-made run configurations, one YAML file per recipe."""

from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """A shipped recipe by name, or a YAML file by path."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file '{name}' does not exist")
        return path
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown recipe '{name}'; known recipes: {', '.join(recipe_names())}")
    return path
