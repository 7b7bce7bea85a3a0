"""What can go wrong talking to the registry, as the three cases callers act on differently."""

from __future__ import annotations


class RegistryError(Exception):
    """The registry answered but the request cannot be served (refused, inconsistent metadata, ...)."""


class RegistryUnreachable(RegistryError):
    """No answer from the registry (connection refused, timeout, 5xx): keep serving what is loaded."""


class RegistryNotFound(RegistryError):
    """The registry answered: no such registered model, version or alias."""
