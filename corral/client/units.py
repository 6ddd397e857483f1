"""Sizes, rates, durations and times as people type and read them."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgtp]?)(?:i?b)?", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_size(text: str) -> int:
    """'256M' -> 268435456. Units K, M, G, T, P are powers of 1024; no unit is bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (try 512K, 256M, 2G)")
    value = float(match["number"]) * 1024 ** _POWERS[match["unit"].lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"not a size: {text!r}")
    return int(value)


def parse_duration(text: str) -> float:
    """'30s' -> 30.0, '5m' -> 300.0, '250ms' -> 0.25; no unit is seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 500ms, 30s, 5m, 2h)")
    unit = match["unit"].lower() if match["unit"] else None
    return float(match["number"]) * _SECONDS[unit]


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    """3 -> '3s', 125 -> '2m', 7300 -> '2h', 200000 -> '2d'."""
    for limit, unit, size in ((60, "s", 1), (3600, "m", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds // 86400)}d"


def rfc3339(ns: int | None) -> str | None:
    """Nanoseconds since the epoch as RFC 3339 UTC with microseconds, or None."""
    if ns is None:
        return None
    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
