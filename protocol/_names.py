"""Names of nodes and models: one rule, checked where a name enters (the wire decoder, a node's configuration, the
command line). Names become file names (a pulled model's folder), log fields and labels, so a name can hold no path
separator, no `..`, no control character and no glob character, and is bounded.

Model names include their pins (`name@1a2b3c4d`) and synthetic models' settings (`sleep:50`, `sleep:1e+06`); node
names include hostnames with a random suffix (`box-3f9a1c`) and dotted ones (`gpu1.lab`). A pipeline stage's name is a
model name followed by its layer range, `smollm2[0-14]` (`protocol._stages`): digits and a dash between brackets, at
the end only. Stages are never pulled or kept under their own name, and no name is ever used as a glob.
"""

from __future__ import annotations

import re

NAME_MAX = 128
NAME_RULE = (
    f"1 to {NAME_MAX} letters, digits and . _ : @ + -, starting with a letter or digit, with no '..' (no spaces, "
    "slashes or control characters); a pipeline stage's ends in its layers, [A-B]"
)
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:@+-]{{0,{NAME_MAX - 1}}}")
_STAGE_SUFFIX = re.compile(r"\[\d{1,6}-\d{1,6}\](?=@[0-9a-f]{1,64}$|$)")  # before a pin, or at the end
_VERSION = re.compile(r"[0-9a-f]{1,64}")
_known: set[str] = set()  # names that passed: a node sees the same few names in every message


def is_name(value: object) -> bool:
    """Whether `value` is a valid node or model name."""
    if type(value) is not str:
        return False
    if value in _known:
        return True
    base = _STAGE_SUFFIX.sub("", value, count=1) if "[" in value else value
    if len(value) > NAME_MAX or _NAME.fullmatch(base) is None or ".." in value:
        return False
    if len(_known) >= 4096:  # bounded: a stream of distinct names costs the check, never memory
        _known.clear()
    _known.add(value)
    return True


def name_problem(value: object, what: str = "name") -> str | None:
    """None when `value` is a valid name; else one line saying what is wrong with it (for errors and logs)."""
    if is_name(value):
        return None
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if not value:
        return f"{what} must not be empty"
    if len(value) > NAME_MAX:
        return f"{what} is longer than {NAME_MAX} characters"
    return f"{what} {value[:64]!r} is not a valid name: {NAME_RULE}"


def check_name(value: object, what: str = "name") -> str:
    """`value` when it is a valid name; else ValueError saying why."""
    problem = name_problem(value, what)
    if problem is not None:
        raise ValueError(problem)
    return value  # type: ignore[return-value]


def is_version(value: object) -> bool:
    """Whether `value` is a model version or a prefix of one: lowercase hex, at most 64 digits."""
    return type(value) is str and _VERSION.fullmatch(value) is not None
