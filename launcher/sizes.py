"""Size strings as the VM spec writes them: ``"512M"``, ``"2G"``, ``1048576``.

Units are binary (K = 1024) because memory and disk sizes are always whole
pages or blocks; a decimal ``M`` would silently give a size that is not a
multiple of the page size. Only whole numbers are accepted: ``"1.5G"`` is
ambiguous about rounding, and the spec's readers should not have to guess.
"""

from __future__ import annotations

import re

K = 1024
M = K * 1024
G = M * 1024
T = G * 1024

_UNITS = {"": 1, "K": K, "M": M, "G": G, "T": T}

# At most 20 digits: enough for any 64-bit byte count, and it keeps int()
# away from its limit on very long digit strings.
_SIZE_RE = re.compile(r"([0-9]{1,20})([KMGTkmgt]?)")

SIZE_SYNTAX = "an integer of bytes, or a whole number with suffix K, M, G or T (binary units)"


def parse_size(text: str | int) -> int:
    """Return the number of bytes that ``text`` names.

    ``text`` is a non-negative int (bytes) or a string of digits with an
    optional suffix K, M, G or T (either case; powers of 1024). Raises
    ValueError with a message fit to show a user.
    """
    # bool is an int subclass; "memory = true" is a mistake, not one byte.
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"not a size: {text!r}; expected {SIZE_SYNTAX}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"not a size: {text}; a size cannot be negative")
        return text
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r}; expected {SIZE_SYNTAX}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """Render ``size`` bytes with the largest unit that divides it exactly."""
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
