"""Kubernetes resource quantities, written the way the API server writes them.

The HPA reads metric values with ``Quantity.MilliValue()``, so values are kept to milli precision
and printed in canonical DecimalSI form: the largest SI suffix that leaves an integer mantissa
(``22``, ``22500m``, ``2k``, ``8G``), as ``resource.NewMilliQuantity(v, DecimalSI).String()`` does.
"""

from __future__ import annotations

import math

_SUFFIXES = ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k"), (0, ""))


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
