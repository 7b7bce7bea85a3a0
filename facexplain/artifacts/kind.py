"""What an artifact kind is: the one object a kind module exports, and the table of known kinds.

Every registered model version is a bundle of one kind (an FR model, a decoder, a direction set, a
probe set, ...). The generic format (:mod:`facexplain.artifacts.bundle`) checks a bundle's metadata
against its kind's required fields; the registry derives the tags a version must carry and the default
registered name from it; services load and validate any kind through it. Adding a kind is adding one
module that builds an :class:`ArtifactKind` and passes it to :func:`register` (and one import line in
``facexplain/artifacts/__init__.py`` so it is always registered).

Kind modules are imported by the registry CLI, which must stay light: they import torch and the
networks inside their functions, never at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Loader(Protocol):
    """``load(path, device, name=..., version=...)``: the model of a bundle, checksums verified.

    ``name`` / ``version`` are the registered labels (a kind whose models carry no label ignores them).
    """

    def __call__(self, path: Path, device: str, *, name: str | None = None, version: str | None = None) -> Any: ...


# (loaded model, bundle dir, bundle metadata) -> figures for ModelStatus; raises BundleError when invalid.
Validator = Callable[[Any, Path, dict[str, Any]], dict[str, str]]


@dataclass(frozen=True)
class ArtifactKind:
    """One bundle kind: what its metadata and registry tags must hold, and how to save, load and check it."""

    name: str
    required_metadata: tuple[str, ...]  # fields bundle.json must carry
    required_tags: tuple[str, ...]  # registry tags a version must carry, beyond the ones every kind carries
    default_model: str  # the registered name served when none is configured; "" = none
    save: Callable[..., dict[str, Any]]  # (out_dir, what, **options) -> the metadata written
    load: Loader
    validate: Validator
    # Kind-specific string fields for registry tags and ModelStatus (beyond the generic ones).
    describe: Callable[[dict[str, Any]], dict[str, str]] | None = None


class UnknownKindError(KeyError):
    """No artifact kind of that name (a typo in a setting, or a bundle written by newer code)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


# name -> kind; filled by the kind modules (facexplain/artifacts/__init__.py imports all of them).
KINDS: dict[str, ArtifactKind] = {}


def register(kind: ArtifactKind) -> ArtifactKind:
    """Add ``kind`` to :data:`KINDS` (a name registered twice is a programming error)."""
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"artifact kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_named(name: str) -> ArtifactKind:
    """The kind called ``name``; :class:`UnknownKindError` names the known ones otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKindError(f"unknown artifact kind {name!r}; known: {', '.join(sorted(KINDS))}") from None
