"""Byte sizes as users write them (512M, 2G) and as people read them."""

from .errors import UserError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse '512M', '2G', '1.5G' or a plain byte count; reject <= 0."""
    raw = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    number = raw[: len(raw) - len(unit)]
    try:
        value = int(float(number) * _UNITS[unit])
    except ValueError:
        raise UserError(f"size {text!r} is not a size; use a number with an optional "
                        "K, M, G or T suffix, for example 512M or 2G") from None
    if value <= 0:
        raise UserError(f"size {text!r} must be larger than 0")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
