"""Model Registry conventions, the same for the UI, the CLI, the services and training.

* Registered model names are ``facexplain-<role>-<architecture>``: ``facexplain-fr-dlib128`` for the
  default FR model, ``facexplain-dfd-<fr model>`` for decoders, ``facexplain-sadfad-...`` for
  interpretable FR nets. One registered model holds versions of one kind only. The direction-set
  defaults name a role only (:data:`~facexplain.artifacts.direction_set.ROLE_ONLY_NAMES`).
* Aliases, not stages: services serve ``champion``; ``challenger`` marks a candidate that passed its
  quality gates; ``candidate`` marks the latest version whose recorded gates failed (``gates_passed``
  tag "false"), which is never made champion implicitly (``registry.promotion``). Promotion is moving
  an alias (UI: Models -> model -> version -> Aliases; CLI: ``facexplain registry promote``).
* A version's artifact is a self-contained bundle directory (:mod:`facexplain.artifacts`) logged as
  run artifacts under ``bundle/`` and registered from ``runs:/<run_id>/bundle``. Its tags repeat the
  bundle's metadata (:data:`REQUIRED_TAGS`) so the UI shows what a version is without downloading it.

What each kind requires and which model a service serves by default come from the artifact kinds
themselves (:data:`facexplain.artifacts.KINDS`): nothing here spells a kind or a model name.
"""

from __future__ import annotations

import re

from facexplain.artifacts import KINDS
from facexplain.artifacts.direction_set import ROLE_ONLY_NAMES
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from registry.errors import RegistryError

CHAMPION = "champion"
CHALLENGER = "challenger"
CANDIDATE = "candidate"
ALIASES = (CHAMPION, CHALLENGER, CANDIDATE)
EXPERIMENT = "facexplain-registry"
ARTIFACT_PATH = "bundle"
MODEL_NAME_RE = re.compile(r"^facexplain-[a-z0-9]+-[a-z0-9][a-z0-9._-]*$")

# The model a service serves when FACEXPLAIN_MODEL_NAME is empty, by the kind it serves.
DEFAULT_MODEL_FOR_KIND: dict[str, str] = {name: k.default_model for name, k in KINDS.items() if k.default_model}

# Tags every model version carries, per kind (values come from the bundle's metadata).
COMMON_TAGS = ("kind", "bundle_format", "bundle_sha256")
REQUIRED_TAGS: dict[str, tuple[str, ...]] = {name: (*COMMON_TAGS, *k.required_tags) for name, k in KINDS.items()}

# Version tags a service shows in ModelStatus beside the bundle's metadata: the held-out quality
# figures training recorded (test_*, val_*, heldout_*), the gates (gates_passed, gates_failed), where a shipped
# model came from (shipped_from, shipped_release, shipped_training_run), and a
# forced promotion's record (promotion_forced_by / _reason / _at).
SERVED_TAG_PREFIXES = ("test_", "val_", "heldout_", "gates_", "promotion_", "shipped_")
SERVED_TAGS = ("data_manifest_sha256", "variant")


def check_model_name(name: str) -> None:
    """Refuse a registered name off the convention (the role-only direction-set defaults excepted)."""
    if name in ROLE_ONLY_NAMES:
        return
    if not MODEL_NAME_RE.match(name):
        raise RegistryError(
            f"model name {name!r} does not follow the convention facexplain-<role>-<architecture> "
            f"(lower case, e.g. {DEFAULT_FR_MODEL})"
        )


def missing_tags(kind: str, tags: dict[str, str]) -> list[str]:
    """Required tags absent or empty on a version of ``kind`` (unknown kinds need the common ones)."""
    return [t for t in REQUIRED_TAGS.get(kind, COMMON_TAGS) if not tags.get(t)]


def served_tags(tags: dict[str, str]) -> dict[str, str]:
    """The version tags ModelStatus repeats (:data:`SERVED_TAG_PREFIXES`, :data:`SERVED_TAGS`)."""
    return {k: str(v) for k, v in sorted(tags.items()) if k.startswith(SERVED_TAG_PREFIXES) or k in SERVED_TAGS}
