"""
Durations in config: C{"250ms"}, C{"15s"}, C{"1m"}, C{"1h"}, or a number of
seconds; as in Istio's and Envoy's YAML.
"""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | int | float) -> float:
    """
    @return: the duration in seconds.
    @raise ValueError: if C{value} is not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '15s', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ValueError(f"expected a duration like '250ms', '15s', '1m' or '1h', got {value!r}")
