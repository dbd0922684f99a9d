"""Naming of pipeline stages on the wire: a stage of model `M` holding layers a..b is served and gossiped as the
model `M[a-b]`; and the size of a `Stage` message's tensor frame."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from ._wire import STAGE_DTYPES

_STAGE = re.compile(r"^(?P<model>.+)\[(?P<first>\d{1,6})-(?P<last>\d{1,6})\]$")


class StageName(NamedTuple):
    """A parsed stage name: the model and the layers (inclusive) it holds."""

    model: str
    first: int
    last: int

    def __str__(self) -> str:
        return stage_name(self.model, self.first, self.last)


def stage_name(model: str, first: int, last: int) -> str:
    """`smollm2[0-14]`: the name a stage of `model` holding layers `first`..`last` is served under."""
    return f"{model}[{first}-{last}]"


def parse_stage(name: str) -> StageName | None:
    """The model and layers of a stage name, or None for any other name (a whole model, a pinned version)."""
    m = _STAGE.match(name)
    if m is None:
        return None
    first, last = int(m.group("first")), int(m.group("last"))
    if first > last:
        return None
    return StageName(m.group("model"), first, last)


def tensor_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of the tensor frame a `Stage` header announces (0: none follows). KeyError for an unknown dtype."""
    return math.prod(shape) * STAGE_DTYPES[dtype] if shape else 0
