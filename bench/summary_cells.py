"""How one figure and one verdict are written in bench/results/README.md, for every scenario's section."""

from __future__ import annotations

from typing import Any


def figure(v: Any, fmt: str = ".1f", unit: str = "") -> str:
    """A number as the README shows it; "—" where the result does not hold it (an older scenario's JSON)."""
    return "—" if v is None else f"{v:{fmt}}{unit}"


def verdict(ok: bool | None) -> str:
    """A goal's "met" cell: yes, **no**, or n/a where the figure it needs was not measured."""
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def dig(data: Any, *keys: str | int) -> Any:
    """data[k1][k2]...; None where any of them is missing, so a section renders older results too."""
    for key in keys:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data
