"""Model names in the registry: ``NAME[:TAG]`` to push, ``NAME[@ALIAS|/VERSION]`` to read.

``NAME`` is ``name`` or ``org/name`` (letters, digits, ``.``, ``_``, ``-``; no ``--``, which
the Hugging Face cache uses as its separator, and no all-digit last part, which would read
as a version). Versions are ``1, 2, ...`` (ref ``v1``, ``v2``); ``main`` is the latest
version (what ``from_pretrained`` reads by default); aliases are lower-case words that move.
``models:/NAME@ALIAS`` and ``models:/NAME/3`` are the same references in MLflow's spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

URI_PREFIX = "models:/"
LATEST = "main"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"^{_PART}(/{_PART})?$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_VERSION_REF = re.compile(r"^v([1-9][0-9]*)$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: the repository and at most one of version or alias."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def check_name(name: str) -> str:
    """``name`` if it is a valid model name, else ValueError (one sentence)."""
    last = name.rsplit("/", 1)[-1]
    if not _NAME.match(name) or "--" in name or last.isdigit() or name.endswith("."):
        raise ValueError(
            f"model name {name!r} is not valid: use NAME or ORG/NAME of letters, digits, "
            "'.', '_' and '-' (no '--', not all digits)."
        )
    return name


def check_alias(alias: str) -> str:
    """``alias`` if it can name a moving alias, else ValueError (one sentence)."""
    if not _ALIAS.match(alias) or _VERSION_REF.match(alias) or alias in (LATEST, "latest"):
        raise ValueError(
            f"alias {alias!r} is not valid: use a lower-case word such as 'champion' or "
            "'staging' (not 'main', 'latest' or v<N>)."
        )
    return alias


def version_ref(version: int) -> str:
    return f"v{version}"


def ref_version(ref: str) -> int | None:
    """The version number a ref such as ``v3`` names, else None."""
    match = _VERSION_REF.match(ref)
    return int(match.group(1)) if match else None


def parse_push(spec: str) -> tuple[str, str | None]:
    """``NAME[:TAG]`` -> (name, tag or None); the tag is an alias set on the new version."""
    name, sep, tag = spec.partition(":")
    return check_name(name), (check_alias(tag) if sep else None)


def parse_ref(spec: str) -> ModelRef:
    """``[models:/]NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` -> :class:`ModelRef`."""
    spec = spec.removeprefix(URI_PREFIX)
    if "@" in spec:
        name, _, alias = spec.partition("@")
        if alias == "latest":
            return ModelRef(check_name(name))
        return ModelRef(check_name(name), alias=check_alias(alias))
    head, sep, tail = spec.rpartition("/")
    if sep and tail.isdigit():
        if int(tail) < 1:
            raise ValueError(f"version {tail} in {spec!r} is not valid: versions start at 1.")
        return ModelRef(check_name(head), version=int(tail))
    return ModelRef(check_name(spec))
