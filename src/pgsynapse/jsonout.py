"""JSON for the commands' ``--json`` output: numbers stay numbers (PostgreSQL's numeric arrives as ``Decimal``),
times are ISO 8601, anything else is its text."""

from __future__ import annotations

import json
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any


def json_value(value: Any) -> Any:
    """``json.dumps``'s ``default``: what the standard encoder cannot write."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    return str(value)


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(obj, default=json_value, **kw)
