"""Registered model artifacts: the bundle format once (:mod:`.bundle`) and one module per kind.

Importing this package registers every kind, so :data:`KINDS` and :func:`kind_named` always see all
of them (the format's metadata check, the registry's tag conventions and the services' loader read
them from here). A new kind is a new module exporting ``KIND`` plus one line below.
"""

from facexplain.artifacts import decoder, direction_set, embedder, probes
from facexplain.artifacts.kind import KINDS, ArtifactKind, UnknownKindError, kind_named

__all__ = ["KINDS", "ArtifactKind", "UnknownKindError", "decoder", "direction_set", "embedder", "kind_named", "probes"]
