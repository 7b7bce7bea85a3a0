"""Promotion policy: when a version may take an alias, and which alias a new version gets.

Promotion is moving an alias; services following it swap within their poll. What this module adds
over :meth:`~registry.client.Registry.set_alias` is the policy the CLI (``facexplain registry promote``
and ``register-defaults``) applies: a version lacking the tags services require is refused unless
forced, since every service would reject it; and a freshly registered default becomes ``champion``
only when nothing is served yet, so registering never demotes a promoted version.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.client import Registry, VersionInfo
from registry.conventions import CHAMPION, missing_tags
from registry.errors import RegistryError, RegistryNotFound


class PromotionRefused(RegistryError):
    """The version lacks what services require of its kind (``force`` promotes anyway)."""


@dataclass(frozen=True)
class Promotion:
    """What a promotion did: the version now behind the alias, and the one it replaced ("" = none)."""

    info: VersionInfo
    alias: str
    previous: str


def promote(registry: Registry, name: str, version: str, alias: str = CHAMPION, *, force: bool = False) -> Promotion:
    """Point ``name@alias`` at ``version`` after checking its tags (see the module docstring)."""
    info = registry.get_version(name, version)
    missing = missing_tags(info.tags.get("kind", ""), info.tags)
    if missing and not force:
        raise PromotionRefused(
            f"{name} v{version} lacks required tags ({', '.join(missing)}); services would reject it "
            "(--force promotes anyway)"
        )
    previous = current_version(registry, name, alias)
    registry.set_alias(name, alias, version)
    return Promotion(info, alias, previous)


def current_version(registry: Registry, name: str, alias: str) -> str:
    """The version behind ``name@alias``, "" when the alias (or the model) does not exist."""
    try:
        return registry.resolve(name, alias).version
    except RegistryNotFound:
        return ""


def initial_alias(registry: Registry, name: str) -> str:
    """``champion`` for a new version when ``name`` has none yet, else "" (never demote a promoted one)."""
    return "" if current_version(registry, name, CHAMPION) else CHAMPION
