"""Decoding what pipeline stages put on the wire: a `Stage` header, a pipeline try's chain and tokens (`Request`), a
node's wants (`LoadReport`). Checked as every other message is (`_fields`)."""

from __future__ import annotations

from typing import Any

from ._fields import _bool, _fail, _fields, _int, _name, _or, _rid, _str, _value, _version
from ._messages import Stage, StageWant
from ._wire import MAX_DEADLINE_MS, MAX_STAGES, NAME_LEN, STAGE_DTYPES, STAGE_KINDS, Limits


def _stages(v: Any, rid: str | None) -> tuple[tuple[str, str], ...]:
    """A pipeline's chain: [[node, stage name], ...], at most MAX_STAGES."""
    if not isinstance(v, list) or len(v) > MAX_STAGES:
        raise _fail(f"stages must be a list of at most {MAX_STAGES} [node, stage] pairs", rid)
    out = []
    for pair in v:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail("each stage must be a [node, stage] pair", rid)
        out.append((_str(pair[0], "stage node", NAME_LEN, rid, empty=False),
                    _str(pair[1], "stage", NAME_LEN, rid, empty=False)))  # fmt: skip
    return tuple(out)


def _token_ids(v: Any, name: str, rid: str | None) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(type(x) is int and 0 <= x < 2**31 for x in v):
        raise _fail(f"{name} must be a list of token ids (integers >= 0)", rid)
    return tuple(v)


def _dec_wants(v: Any) -> dict[str, StageWant]:
    if not isinstance(v, dict):
        raise _fail("wants must be a map")
    out = {}
    for name, want in v.items():
        if not isinstance(want, list) or len(want) < 3:
            raise _fail("a want must be [version, budget, speed]")
        speed = want[2]
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 <= speed < 1e6:
            raise _fail("a want's speed must be a number >= 0")
        out[_name(name, "model", None)] = StageWant(
            _version(want[0], "want version", None, empty=True),
            _int(want[1], "want budget", 0, 2**62, None),
            float(speed),
        )
    return out


def _dec_stage(b: list[Any], lim: Limits) -> Stage:
    f = _fields(b, 4, 15, "stage", None)
    rid = _rid(b)
    kind = _str(f[2], "stage kind", 16, rid)
    if kind not in STAGE_KINDS:
        raise _fail(f"stage kind must be one of {list(STAGE_KINDS)}, got {kind!r}", rid)
    shape = _or(f[6], [])
    if not isinstance(shape, list) or len(shape) > 4 or not all(type(x) is int and 0 <= x <= 2**24 for x in shape):
        raise _fail("stage shape must be a list of at most 4 sizes", rid)
    dtype = _str(_or(f[7], "float32"), "stage dtype", 16, rid)
    if dtype not in STAGE_DTYPES:
        raise _fail(f"stage dtype must be one of {list(STAGE_DTYPES)}, got {dtype!r}", rid)
    request = _or(f[9], b"")
    if not isinstance(request, bytes):
        raise _fail("stage request must be bytes (an encoded Request)", rid)
    return Stage(
        id=rid,
        model=_str(f[1], "model", NAME_LEN, rid, empty=False),
        kind=kind,
        first=_str(f[3], "first", NAME_LEN, rid, empty=False),
        start=_int(_or(f[4], 0), "start", 0, 2**31, rid),
        tokens=_token_ids(_or(f[5], []), "tokens", rid),
        shape=tuple(shape),
        dtype=dtype,
        last=_bool(_or(f[8], False), "last", rid),
        request=request,
        stages=_stages(_or(f[10], []), rid),
        need=_int(_or(f[11], 0), "need", 0, 2**31, rid),
        deadline_ms=_int(_or(f[12], 0), "deadline_ms", 0, MAX_DEADLINE_MS, rid),
        data=_value(f[13], "data", lim, rid),
        due=_bool(_or(f[14], False), "due", rid),
    )
