"""Kubernetes resource quantities, written the way the API server writes them.

The HPA reads metric values with ``Quantity.MilliValue()``, so values are kept to milli precision
and printed in canonical DecimalSI form: the largest SI suffix that leaves an integer mantissa
(``22``, ``22500m``, ``2k``, ``8G``), as ``resource.NewMilliQuantity(v, DecimalSI).String()`` does.
"""

from __future__ import annotations

import functools
import math
import re
from decimal import ROUND_CEILING, Decimal

_SUFFIXES = ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k"), (0, ""))


@functools.lru_cache(maxsize=4096)  # an answer's values repeat (whole percents, the same watts)
def format_quantity(value: float) -> str:
    """Canonical DecimalSI quantity of ``value`` rounded to milli-units; NaN and infinities refused."""
    if not math.isfinite(value):
        raise ValueError(f"a quantity must be finite, got {value}")
    milli = round(value * 1000)
    if milli == 0:
        return "0"
    sign, magnitude = ("-" if milli < 0 else ""), abs(milli)
    if magnitude % 1000:
        return f"{sign}{magnitude}m"
    units = magnitude // 1000
    for exponent, suffix in _SUFFIXES:
        if units % 10**exponent == 0:
            return f"{sign}{units // 10**exponent}{suffix}"
    raise AssertionError("unreachable: exponent 0 always divides")


_SCALE = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


def parse_milli(text: str) -> int:
    """A quantity (``12``, ``12000m``, ``1.5k``, ``2Gi``, ``1e3``) as integer milli-units, rounded up
    as Quantity.MilliValue() does."""
    match = re.fullmatch(
        r"\s*([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei)|([numkMGTPE]?))\s*", str(text)
    )
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, exponent, binary, suffix = match.groups()
    value = Decimal(number)
    if exponent:
        value *= Decimal(10) ** int(exponent[1:])
    elif binary:
        value *= 2 ** _BINARY[binary]
    else:
        value *= Decimal(10) ** _SCALE[suffix or ""]
    return int((value * 1000).to_integral_value(rounding=ROUND_CEILING))
