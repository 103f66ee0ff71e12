"""Byte sizes as people write them: ``parse_size("256MiB")`` and back.

Units follow GNU coreutils: ``KB``/``MB``/... are powers of 1000, ``KiB``/
``MiB``/... and the bare letters ``K``/``M``/... are powers of 1024. Units are
case-insensitive; a plain number is bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal

_PREFIXES = "KMGTPE"
_UNITS: dict[str, int] = {"": 1, "B": 1}
for _power, _letter in enumerate(_PREFIXES, start=1):
    _UNITS[_letter] = 1024**_power
    _UNITS[_letter + "B"] = 1000**_power
    _UNITS[_letter + "IB"] = 1024**_power

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``"4096"``, ``"4 KiB"``, ``"1.5GB"``, ``"256MiB"``.

    Fractions are rounded down to whole bytes. Raises ``ValueError`` on
    anything else, including negative sizes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r}")
    if text.strip().startswith("-"):
        raise ValueError(f"size must not be negative, got {text!r}")
    match = _SIZE.fullmatch(text)
    unit = match and _UNITS.get(match.group(2).upper())
    if not unit:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4096, 64KiB, 1.5GB, 256MiB)")
    return int(Decimal(match.group(1)) * unit)


def format_size(nbytes: float) -> str:
    """``nbytes`` in binary units, e.g. ``format_size(1536) == "1.5 KiB"``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"


def size_argument(text: str) -> int:
    """``parse_size`` for argparse: a bad size becomes a usage error naming the value."""
    import argparse

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
