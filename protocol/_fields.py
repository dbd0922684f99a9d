"""The checks every decoder applies to one field: each refusal is a `DecodeError` naming the field (and, when it
could be read, the request it belongs to, so the node can answer it)."""

from __future__ import annotations

from typing import Any

from ._errors import DecodeError
from ._names import is_name, is_version, name_problem
from ._wire import ID_LEN, NAME_LEN, Limits


def _fail(what: str, rid: str | None = None) -> DecodeError:
    return DecodeError(what, rid)


def _str(v: Any, name: str, max_len: int, rid: str | None, *, empty: bool = True) -> str:
    if type(v) is str and (empty or v) and len(v) <= max_len:
        return v  # the common case, checked cheaply: this runs several times per request
    if not isinstance(v, str):
        raise _fail(f"{name} must be a string, got {type(v).__name__}", rid)
    if len(v) > max_len:
        raise _fail(f"{name} is longer than {max_len} characters", rid)
    if not empty and not v:
        raise _fail(f"{name} must not be empty", rid)
    return v


def _int(v: Any, name: str, lo: int, hi: int, rid: str | None) -> int:
    if type(v) is int and lo <= v <= hi:
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f"{name} must be an integer, got {type(v).__name__}", rid)
    if not lo <= v <= hi:
        raise _fail(f"{name} must be between {lo} and {hi}, got {v}", rid)
    return v


def _name(v: Any, what: str, rid: str | None, *, empty: bool = False) -> str:
    """A node or model name (`protocol._names`); `empty`: "" is allowed too (nobody named)."""
    if is_name(v) or (empty and v == ""):
        return v
    raise _fail(name_problem(v, what) or f"{what} is not a valid name", rid)


def _label(v: Any, what: str, rid: str | None) -> str:
    """Who sent a message when that may be a client (its chosen id): any printable text, bounded."""
    v = _str(v, what, NAME_LEN, rid)
    if not v.isprintable():
        raise _fail(f"{what} must be printable text", rid)
    return v


def _version(v: Any, what: str, rid: str | None, *, empty: bool) -> str:
    """A model version (lowercase hex, or a prefix of it); `empty`: "" is allowed too (none known)."""
    if is_version(v) or (empty and v == ""):
        return v
    raise _fail(f"{what} must be lowercase hex digits (at most 64), got {str(v)[:80]!r}", rid)


def _bool(v: Any, name: str, rid: str | None) -> bool:
    if not isinstance(v, bool):
        raise _fail(f"{name} must be true or false, got {type(v).__name__}", rid)
    return v


def _depth_ok(v: Any, limit: int) -> bool:
    """True when `v` nests no deeper than `limit` containers."""
    t = type(v)
    if t is str or t is int or t is float or t is bool or v is None:
        return True
    if isinstance(v, (list, tuple, dict)):
        if limit <= 0:
            return False
        items = v.values() if isinstance(v, dict) else v
        return all(_depth_ok(x, limit - 1) for x in items)
    return True


def _value(v: Any, name: str, lim: Limits, rid: str | None) -> Any:
    if not _depth_ok(v, lim.max_depth):
        raise _fail(f"{name} nests deeper than {lim.max_depth} levels", rid)
    return v


def _strmap(v: Any, name: str, rid: str | None, lim: Limits, *, str_values: bool) -> dict[str, Any]:
    if type(v) is dict and not v:
        return v
    if not isinstance(v, dict):
        raise _fail(f"{name} must be a map, got {type(v).__name__}", rid)
    if str_values and not all(isinstance(x, str) for x in v.values()):
        raise _fail(f"{name} values must be strings", rid)
    return _value(v, name, lim, rid)


def _fields(body: list[Any], n_required: int, n_total: int, kind: str, rid: str | None) -> list[Any]:
    """Pad optional trailing fields with None; ignore fields added by newer peers."""
    n = len(body) - 1
    if n < n_required:
        raise _fail(f"{kind} needs at least {n_required} fields, got {n}", rid)
    return body[1 : n_total + 1] + [None] * max(0, n_total - n)


def _or(v: Any, default: Any) -> Any:
    return default if v is None else v


def _rid(b: list[Any]) -> str:
    return _str(b[1], "id", ID_LEN, None, empty=False)
