"""The MLflow Model Registry as facexplain uses it: conventions, the client, and the promotion policy.

``from registry import Registry, CHAMPION, ...``: services, training, bench and the CLI import these
names from here. MLflow itself is imported lazily by the client, so importing this package is cheap.
"""

from registry import cache
from registry.client import Registry, VersionInfo, public_uri
from registry.conventions import (
    ALIASES,
    ARTIFACT_PATH,
    CANDIDATE,
    CHALLENGER,
    CHAMPION,
    COMMON_TAGS,
    DEFAULT_MODEL_FOR_KIND,
    EXPERIMENT,
    MODEL_NAME_RE,
    REQUIRED_TAGS,
    check_model_name,
    missing_tags,
    served_tags,
)
from registry.errors import RegistryError, RegistryNotFound, RegistryUnreachable
from registry.promotion import (
    Promotion,
    PromotionRefused,
    current_version,
    gates_failed,
    initial_alias,
    promote,
    registration_alias,
)

__all__ = [
    "ALIASES",
    "ARTIFACT_PATH",
    "CANDIDATE",
    "CHALLENGER",
    "CHAMPION",
    "COMMON_TAGS",
    "DEFAULT_MODEL_FOR_KIND",
    "EXPERIMENT",
    "MODEL_NAME_RE",
    "REQUIRED_TAGS",
    "Promotion",
    "PromotionRefused",
    "Registry",
    "RegistryError",
    "RegistryNotFound",
    "RegistryUnreachable",
    "VersionInfo",
    "cache",
    "check_model_name",
    "current_version",
    "gates_failed",
    "initial_alias",
    "missing_tags",
    "promote",
    "public_uri",
    "registration_alias",
    "served_tags",
]
