"""Structured logging that cannot leak biometric data.

Handlers log events (method, status, latency, sizes), never payloads. As a second line of defence
the redaction filter replaces any bytes, arrays, tensors or long number sequences that reach a log
record's arguments, so a careless ``log.info("%s", template)`` prints ``<redacted ...>`` instead.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

_MAX_NUMBERS = 8


def _redact(value: Any) -> Any:
    kind = type(value).__name__
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<redacted {kind} len={len(value)}>"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy arrays, torch tensors
        return f"<redacted {kind} shape={tuple(value.shape)}>"
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > _MAX_NUMBERS
        and all(isinstance(v, (int, float)) for v in list(value)[: _MAX_NUMBERS + 1])
    ):
        return f"<redacted {kind} len={len(value)}>"
    if hasattr(value, "ListFields") and hasattr(value, "SerializeToString"):  # protobuf messages
        return f"<redacted {type(value).__name__}>"
    return value


class RedactBiometrics(logging.Filter):
    """Replace payload-like arguments of every record before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact(v) for k, v in record.args.items()}
        for key, val in list(record.__dict__.items()):
            if key.startswith("fx_"):
                record.__dict__[key] = _redact(val)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed as ``extra={"fx_<name>": ...}`` are included."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, val in record.__dict__.items():
            if key.startswith("fx_"):
                out[key[3:]] = val if isinstance(val, (str, int, float, bool, type(None))) else str(val)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Install one stderr handler with redaction on the root logger (idempotent)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_facexplain", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._facexplain = True  # type: ignore[attr-defined]
    handler.addFilter(RedactBiometrics())
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level.upper())
