"""Sizes, rates, durations, times and other values as people type and read them.

Imported by `corral.job`, and so by every shim: it must stay light (the
standard library's re, math and datetime, which a shim has loaded anyway).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

_SIZE = re.compile(
    r"(?P<whole>\d+)(?:\.(?P<fraction>\d+))?\s*(?P<unit>[kmgtp]?)(?:i?b)?", re.IGNORECASE
)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d|y)?", re.IGNORECASE)
YEAR = 365 * 86400  # seconds; what a person means by "10y" of runtime
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": YEAR, None: 1}
# Largest first: a size or duration is shown in the largest unit that says it exactly.
_SIZE_UNITS = (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))
_DURATION_UNITS = (("y", YEAR), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_QUARTERS = ("", ".25", ".5", ".75")  # exact in binary, so they survive parse_size's float


def parse_size(text: str) -> int:
    """'256M' -> 268435456. Units K, M, G, T, P are powers of 1024; no unit is bytes.

    Exact for any whole number (no float in the way); a fraction of a byte is
    dropped ('1.1K' -> 1126). ValueError if `text` is not a size of at least 1.
    """
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (try 512K, 256M, 2G)")
    fraction = match["fraction"] or ""
    scale: int = 1024 ** _POWERS[match["unit"].lower()]
    shift: int = 10 ** len(fraction)
    value = int(match["whole"] + fraction) * scale // shift
    if value < 1:
        raise ValueError(f"not a size: {text!r}")
    return value


def parse_duration(text: str) -> float:
    """'30s' -> 30.0, '5m' -> 300.0, '250ms' -> 0.25, '10y' -> 315360000.0 (a year is
    365 days); no unit is seconds. ValueError if `text` is not a duration."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 500ms, 30s, 5m, 2h)")
    unit = match["unit"].lower() if match["unit"] else None
    if unit == "ms":  # divided, not multiplied by 0.001: the nearest float, as people mean
        return float(match["number"]) / 1000
    return float(match["number"]) * _SECONDS[unit]


def short_number(value: float) -> str:
    """A number as a person writes it: 2.0 -> '2', 0.5 -> '0.5', 1e-05 -> '0.00001'
    (never an exponent); float() of it is `value` again. 'nan', 'inf', '-inf'."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer():
        return str(int(value))
    text = repr(value)  # the shortest digits that are exactly `value`
    if "e" not in text:
        return text
    # Below 1e-4 repr switches to an exponent: the fewest decimals that say it exactly.
    for decimals in range(1, 18 - math.floor(math.log10(abs(value)))):
        text = f"{value:.{decimals}f}"
        if float(text) == value:
            break
    return text


def short_size(size: int) -> str:
    """A size as a person types it, exactly: 8388608 -> '8M', 1 << 50 -> '1P',
    1610612736 -> '1.5G', 1536 -> '1.5K', 100 -> '100B'.

    The largest unit in which the size is a whole number or a quarter; bytes
    ('B') when there is none. parse_size reads it back as `size` (for size >= 1).
    """
    if size >= 1024:
        for unit, scale in _SIZE_UNITS:
            whole, rest = divmod(size, scale)
            if whole and (rest * 4) % scale == 0:
                return f"{whole}{_QUARTERS[rest * 4 // scale]}{unit}"
    return f"{size}B"


def short_duration(seconds: float) -> str:
    """A duration as a person types it, exactly: 3600 -> '1h', 315360000 -> '10y',
    90 -> '90s', 0.25 -> '250ms', 1.5 -> '1.5s'.

    Whole seconds in the largest unit that divides them; less than a second
    in milliseconds where that is exact; otherwise seconds with a fraction.
    parse_duration reads it back as the same float, for any finite
    `seconds` >= 0. A negative duration is shown with a minus; 'nan', 'inf'.
    """
    if not math.isfinite(seconds):
        return short_number(seconds)
    if seconds < 0:
        return "-" + short_duration(-seconds)
    if float(seconds).is_integer():
        whole = int(seconds)
        for unit, scale in _DURATION_UNITS:
            if whole % scale == 0 and (whole or unit == "s"):
                text = f"{whole // scale}{unit}"
                if parse_duration(text) == seconds:
                    return text
    elif seconds < 1:
        text = f"{round(seconds * 1000)}ms"
        if parse_duration(text) == seconds:
            return text
    return f"{short_number(seconds)}s"


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


# The longest text a message quotes whole: paths and names come from callers.
QUOTE_LIMIT = 200


def quote(text: str | bytes) -> str:
    """`text` quoted for a message, as a person would write it: bytes read as
    UTF-8 (a byte that is not UTF-8 shown as \\xNN), an unprintable character
    escaped (so a message stays one line), a long text cut short."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    shown = "".join(c if c.isprintable() else _escape(c) for c in text[:QUOTE_LIMIT])
    mark = '"' if "'" in shown and '"' not in shown else "'"
    if len(text) > QUOTE_LIMIT:
        return f"{mark}{shown}...{mark} ({len(text)} characters)"
    return f"{mark}{shown}{mark}"


def _escape(char: str) -> str:
    code = ord(char)
    if char in "\n\t\r":
        return repr(char)[1:-1]
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def describe(value: object) -> str:
    """A value a caller gave, as a person would write it, for the "not ..."
    of a message: 'text', 3, 1.5, true, null, a list, a map."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return short_number(value) + ".0"  # a whole number, but not given as one
    if isinstance(value, int | float):
        return short_number(value)
    if isinstance(value, str | bytes):
        return quote(value)
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, Sequence | set | frozenset):
        return "a list"
    kind = type(value).__name__
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"
