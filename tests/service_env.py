"""The environment every registry-following service gets in the integration tests; each module adds its limits."""

from __future__ import annotations

from pathlib import Path


def registry_service_env(uri: str, cache: Path, *, poll_s: float = 5, **extra: str) -> dict[str, str]:
    """Follow the registry at ``uri`` (poll every ``poll_s`` s, 5-s registry timeout), models cached in
    ``cache``, one torch thread; ``extra`` adds or overrides ``FACEXPLAIN_*`` settings."""
    return {
        "FACEXPLAIN_REGISTRY_URI": uri,
        "FACEXPLAIN_POLL_INTERVAL_S": f"{poll_s:g}",
        "FACEXPLAIN_REGISTRY_TIMEOUT_S": "5",
        "FACEXPLAIN_MODEL_CACHE_DIR": str(cache),
        "FACEXPLAIN_TORCH_THREADS": "1",
        **extra,
    }
