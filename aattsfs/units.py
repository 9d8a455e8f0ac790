"""Byte sizes as users write them (512M, 2G) and as people read them."""

import re
from fractions import Fraction

from .errors import UserError

# Units are binary whatever the spelling: G, Gi, GiB and GB are all 2**30
# (nobody sizes a RAM tier in powers of ten, and two meanings would surprise).
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# digits only: no inf, nan or exponent (1e400) can slip through float()
_SIZE = re.compile(r"\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])I?)?B?\s*", re.I)
MAX_SIZE = 1 << 62  # far beyond any disk, and still a signed 64-bit number
SIZE_HELP = "K, M, G or T (binary: G, Gi, GiB and GB all mean 2**30 bytes)"


def parse_size(text: str | int) -> int:
    """Parse '512M', '2G', '1.5GiB', a plain byte count or an int; reject
    anything <= 0 or larger than MAX_SIZE with a UserError."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            raise UserError(f"size {text!r} is not a size; use a number with an optional "
                            f"{SIZE_HELP}, for example 512M or 2G")
        whole, _, frac = m[2].partition(".")
        # exact arithmetic (1.5G is 3 << 29 to the byte); 26 digits are past
        # MAX_SIZE in any unit, and sparing int() huge strings keeps it cheap
        value = MAX_SIZE + 1 if len(whole.lstrip("0")) > 25 else \
            int(Fraction(f"{whole or 0}.{frac[:30]}") * _UNITS[(m[3] or "").upper()])
        value = -value if m[1] == "-" else value
    if value <= 0:
        raise UserError(f"size {text!r} must be larger than 0")
    if value > MAX_SIZE:
        raise UserError(f"size {text!r} is too large; at most 2**62 bytes")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
