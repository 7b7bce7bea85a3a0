"""Promotion policy: when a version may take an alias, and which alias a new version gets.

Promotion is moving an alias; services following it swap within their poll. What this module adds
over :meth:`~registry.client.Registry.set_alias` is the policy the CLI (``facexplain registry promote``
and ``register-defaults``) and the training pipelines apply:

* a version lacking the tags services require is refused unless forced, since every service would
  reject it;
* a version whose recorded quality gates failed (tag ``gates_passed`` = "false", or ``heldout_passed`` =
  "false": a shipped model judged on identities its training never saw) never takes an alias
  but ``candidate`` implicitly: training registers it under ``candidate`` whatever alias was asked for,
  and ``promote`` refuses it unless forced with a reason;
* a forced promotion is recorded on the version: tags ``promotion_forced_by`` (``by``, else
  ``FACEXPLAIN_USER``, else the OS user), ``promotion_forced_reason`` and ``promotion_forced_at``;
* a freshly registered version becomes ``champion`` only when nothing is served yet, so registering
  never demotes a promoted version.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from registry.client import Registry, VersionInfo
from registry.conventions import CANDIDATE, CHALLENGER, CHAMPION, missing_tags
from registry.errors import RegistryError, RegistryNotFound

GATES_TAG = "gates_passed"
GATES_FAILED_TAG = "gates_failed"
HELDOUT_TAG = "heldout_passed"
FORCED_BY_TAG = "promotion_forced_by"
FORCED_REASON_TAG = "promotion_forced_reason"
FORCED_AT_TAG = "promotion_forced_at"
AUTO = "auto"  # training's default alias request: champion when the model has none, else challenger


class PromotionRefused(RegistryError):
    """The version lacks what services require of its kind, or failed its quality gates (``force`` overrides)."""


@dataclass(frozen=True)
class Promotion:
    """What a promotion did: the version now behind the alias, the one it replaced ("" = none), and
    the refusals ``force`` overrode (empty when none was needed)."""

    info: VersionInfo
    alias: str
    previous: str
    forced: tuple[str, ...] = ()


def gates_failed(tags: dict[str, str]) -> bool:
    """True when the version records quality gates and they failed (no ``gates_passed`` tag = no gates).

    The held-out verdict counts as a gate too: a decoder that meets its own test split's gates but
    misses them on people no model saw must not become what users get by default."""
    return any(tags.get(tag, "").strip().lower() == "false" for tag in (GATES_TAG, HELDOUT_TAG))


def refusals(info: VersionInfo, alias: str) -> list[str]:
    """Why ``info`` may not take ``alias`` without ``force`` (empty when it may)."""
    why = []
    missing = missing_tags(info.tags.get("kind", ""), info.tags)
    if missing:
        why.append(f"it lacks required tags ({', '.join(missing)}); services would reject it")
    if alias != CANDIDATE and gates_failed(info.tags):
        failed = info.tags.get(GATES_FAILED_TAG, "")
        detail = f": {failed}" if failed else ""
        why.append(f"its recorded quality gates failed (gates_passed=false{detail})")
    return why


def default_user() -> str:
    """Who forces a promotion when ``--by`` is not given: ``FACEXPLAIN_USER``, else the OS user."""
    try:
        return os.environ.get("FACEXPLAIN_USER") or getpass.getuser()
    except (OSError, KeyError):  # no user name in a bare container
        return "unknown"


def promote(
    registry: Registry,
    name: str,
    version: str,
    alias: str = CHAMPION,
    *,
    force: bool = False,
    reason: str = "",
    by: str = "",
) -> Promotion:
    """Point ``name@alias`` at ``version`` after checking it (see the module docstring).

    ``force`` overrides the refusals; overriding failed gates needs a ``reason``. Whatever ``force``
    overrode is recorded as tags on the version before the alias moves.
    """
    info = registry.get_version(name, version)
    why = refusals(info, alias)
    if why and not force:
        raise PromotionRefused(
            f"{name} v{version} not promoted to @{alias}: {'; '.join(why)} "
            '(--force --reason "..." promotes anyway and records who and why on the version)'
        )
    reason = reason.strip()
    if why and gates_failed(info.tags) and alias != CANDIDATE and not reason:
        raise PromotionRefused(
            f"{name} v{version} failed its quality gates: forcing it to @{alias} needs --reason "
            "(recorded on the version)"
        )
    previous = current_version(registry, name, alias)
    if why:
        record = {
            FORCED_BY_TAG: by.strip() or default_user(),
            FORCED_REASON_TAG: reason or "(no reason given)",
            FORCED_AT_TAG: datetime.now(UTC).isoformat(timespec="seconds"),
        }
        for key, value in record.items():
            registry.set_version_tag(name, version, key, value)
        info = registry.get_version(name, version)
    registry.set_alias(name, alias, version)
    return Promotion(info, alias, previous, tuple(why))


def current_version(registry: Registry, name: str, alias: str) -> str:
    """The version behind ``name@alias``, "" when the alias (or the model) does not exist."""
    try:
        return registry.resolve(name, alias).version
    except RegistryNotFound:
        return ""


def initial_alias(registry: Registry, name: str, tags: dict[str, str] | None = None) -> str:
    """``champion`` for a new version when ``name`` has none yet, else "" (never demote a promoted one);
    ``candidate`` for a version whose ``tags`` record failed quality gates."""
    if gates_failed(tags or {}):
        return CANDIDATE
    return "" if current_version(registry, name, CHAMPION) else CHAMPION


def registration_alias(registry: Registry, name: str, wanted: str, tags: dict[str, str] | None = None) -> str:
    """The alias a version registered with ``tags`` gets when ``wanted`` was asked for.

    "" = none. Failed gates: ``candidate``, whatever else was asked for. ``auto``: ``champion`` when
    ``name`` has none yet, ``challenger`` otherwise. Any other alias as asked.
    """
    if not wanted:
        return ""
    if gates_failed(tags or {}):
        return CANDIDATE
    if wanted == AUTO:
        return CHALLENGER if current_version(registry, name, CHAMPION) else CHAMPION
    return wanted
