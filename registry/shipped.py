"""Models that ship inside the repository, and their registration into any registry.

A fresh clone must explain something before anyone trains anything, so the trained models a default
installation needs live in ``models/<name>/<release>/``: ``bundle/`` (an ordinary bundle, as the
registry stores it), ``card.json`` (what a registry version records about it: recipe, commit, data,
training run, held-out figures, the tags to register it with) and ``MODEL_CARD.md`` (the same for people).
``models/SHA256SUMS`` pins every byte (``sha256sum -c`` reads it too): a shipped file that was changed,
added or removed is refused at registration with the file named, before anything is parsed.

A bundle records the FR model it belongs to by name, version and bundle digest. Version numbers belong
to a registry, the digest to the weights, so registration finds the version that holds that digest in
the target registry and records its number in the registered copy (the shipped bytes stay as pinned).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facexplain.artifacts.bundle import (
    BUNDLE_JSON,
    BundleError,
    bundle_digest,
    file_sha256,
    read_metadata,
    verify_files,
)
from registry.client import Registry, VersionInfo
from registry.errors import RegistryError
from registry.promotion import initial_alias

SUMS = "SHA256SUMS"
CARD_JSON = "card.json"
CARD_MD = "MODEL_CARD.md"
BUNDLE_DIR = "bundle"
# Files of models/ that describe the folder rather than a model: not pinned.
UNPINNED = {SUMS, "README.md"}


class ShippedModelError(BundleError):
    """A shipped model whose files are not what ``models/SHA256SUMS`` pins, or that cannot be registered."""


@dataclass(frozen=True)
class ShippedModel:
    name: str
    release: str
    root: Path  # models/<name>/<release>
    card: dict[str, Any]

    @property
    def bundle(self) -> Path:
        return self.root / BUNDLE_DIR

    @property
    def label(self) -> str:
        return f"models/{self.name}/{self.release}"

    @property
    def fr_model(self) -> dict[str, str] | None:
        """The FR model this bundle belongs to (decoders), or None (embedders, probes)."""
        fr = read_metadata(self.bundle).get("fr_model")
        return {k: str(v) for k, v in fr.items()} if isinstance(fr, dict) else None

    def tags(self) -> dict[str, str]:
        """What the registered version carries beyond the bundle's metadata: the training run's tags
        (quality figures, gates), the held-out figures, and where the bytes came from."""
        tags = {str(k): str(v) for k, v in (self.card.get("tags") or {}).items()}
        tags["shipped_from"] = self.label
        tags["shipped_release"] = self.release
        if self.card.get("mlflow_run_id"):
            tags["shipped_training_run"] = str(self.card["mlflow_run_id"])
        return tags


@dataclass(frozen=True)
class Registered:
    model: ShippedModel
    info: VersionInfo
    alias: str  # the alias set now ("" = none; an existing champion is never demoted)
    new: bool  # False: the registry already held these bytes


def read_sums(models_dir: Path) -> dict[str, str]:
    """``models/SHA256SUMS`` as {path relative to models/: sha256}."""
    path = models_dir / SUMS
    if not path.is_file():
        raise ShippedModelError(f"{path} is missing: the shipped models are not pinned")
    sums: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            raise ShippedModelError(f"{path}:{n}: expected '<sha256>  <path>', got {line[:80]!r}")
        sums[rel.strip()] = digest
    return sums


def pinned_files(models_dir: Path) -> list[str]:
    """Every file under ``models_dir`` that the pins must cover, relative and sorted."""
    return sorted(
        p.relative_to(models_dir).as_posix()
        for p in models_dir.rglob("*")
        if p.is_file() and p.relative_to(models_dir).as_posix() not in UNPINNED
    )


def write_sums(models_dir: Path) -> Path:
    """Pin every file under ``models_dir`` (what ``scripts/ship_model.py`` calls after adding a model)."""
    lines = [f"{file_sha256(models_dir / rel)}  {rel}" for rel in pinned_files(models_dir)]
    path = models_dir / SUMS
    path.write_text("\n".join(lines) + "\n")
    return path


def verify_pins(models_dir: Path) -> None:
    """Every shipped file is pinned and unchanged, every pinned file is there; the first problem is raised,
    naming the file and what to do."""
    sums = read_sums(models_dir)
    present = pinned_files(models_dir)
    for rel in present:
        if rel not in sums:
            raise ShippedModelError(
                f"shipped model file models/{rel} is not pinned in models/{SUMS}: remove it, or re-pin with "
                "scripts/ship_model.py if it belongs there"
            )
        actual = file_sha256(models_dir / rel)
        if actual != sums[rel]:
            raise ShippedModelError(
                f"shipped model file models/{rel} was changed: its sha256 is {actual[:16]}..., models/{SUMS} "
                f"pins {sums[rel][:16]}...; restore it (git checkout -- models/) or re-create the model "
                "from its card's recipe"
            )
    missing = sorted(set(sums) - set(present))
    if missing:
        raise ShippedModelError(f"shipped model file models/{missing[0]} is pinned in models/{SUMS} but missing")


def list_shipped(models_dir: Path, *, verify: bool = True) -> list[ShippedModel]:
    """The shipped models in registration order: models that others belong to (FR models) first."""
    if verify:
        verify_pins(models_dir)
    found = []
    for card_path in sorted(models_dir.glob(f"*/*/{CARD_JSON}")):
        root = card_path.parent
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError as exc:
            raise ShippedModelError(f"models/{root.parent.name}/{root.name}/{CARD_JSON}: not JSON ({exc})") from None
        if card.get("name") != root.parent.name:
            raise ShippedModelError(
                f"models/{root.parent.name}/{root.name}/{CARD_JSON} names {card.get('name')!r}, not its folder"
            )
        found.append(ShippedModel(root.parent.name, root.name, root, card))
    return sorted(found, key=lambda m: (m.fr_model is not None, m.name, m.release))


def _bound_to_registry(model: ShippedModel, registry: Registry, tmp: Path) -> Path:
    """The bundle as this registry must hold it: its FR model's version number is the one that holds the
    FR bundle's digest here (the shipped bytes are untouched; a copy is changed when the numbers differ)."""
    fr = model.fr_model
    if fr is None:
        return model.bundle
    digest = fr.get("bundle_sha256", "")
    if not digest:
        raise ShippedModelError(f"{model.label}: its bundle names FR model {fr.get('name')} without a digest")
    here = registry.find_by_digest(fr["name"], digest)
    if here is None:
        raise ShippedModelError(
            f"{model.label} belongs to FR model {fr['name']} with bundle digest {digest[:16]}..., which this "
            f"registry does not hold: register that model first (`facexplain registry register-defaults` "
            "registers the default FR model and then every shipped model, in order)"
        )
    if here.version == fr.get("version"):
        return model.bundle
    copy = tmp / model.name
    shutil.copytree(model.bundle, copy)
    meta = json.loads((copy / BUNDLE_JSON).read_text())
    meta["fr_model"]["version"] = here.version
    (copy / BUNDLE_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return copy


def register_shipped(registry: Registry, model: ShippedModel) -> Registered:
    """Register one shipped model (or find the version that already holds it) and alias it by the policy:
    ``champion`` when the name has none yet, ``candidate`` when its recorded gates failed, else none."""
    with tempfile.TemporaryDirectory(prefix="fx-shipped-") as tmp:
        bundle = _bound_to_registry(model, registry, Path(tmp))
        meta = read_metadata(bundle)
        try:
            verify_files(bundle, meta)
        except BundleError as exc:
            raise ShippedModelError(f"{model.label}: {exc}") from None
        tags = model.tags()
        existing = registry.find_by_digest(model.name, bundle_digest(meta))
        if existing is not None:
            return Registered(model, existing, "", new=False)
        alias = initial_alias(registry, model.name, tags)
        info = registry.register_bundle(
            bundle,
            model.name,
            alias=alias or None,
            extra_tags=tags,
            description=str(model.card.get("summary", "")),
        )
        return Registered(model, info, alias, new=True)


def register_all(registry: Registry, models_dir: Path) -> list[Registered]:
    """Every shipped model, pins checked first (nothing is registered when one file is off)."""
    models = list_shipped(models_dir)
    if not models:
        raise RegistryError(f"no shipped models under {models_dir}")
    return [register_shipped(registry, m) for m in models]
