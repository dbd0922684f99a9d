"""What the grammar cannot promise about a JSON answer, and how the gateway keeps the promise anyway.

llguidance compiles a JSON schema into a grammar, but some keywords cannot be a grammar (`uniqueItems`, `not`,
`contains`, `dependentRequired`, ...): in its lenient mode (JSON_STYLE) it ignores them, so an answer could
break them (`{"days": ["mon", "thu", "thu"]}` under `uniqueItems`). Each such keyword is either

- refused, when the caller asked for `strict: true` (OpenAI's promise that the answer follows the schema by
  construction): a 400 naming the keyword and where it is, in OpenAI's words and code; or
- checked after generation: the answer is validated against the caller's schema (jsonschema-rs), and an answer
  that breaks it is drawn again (sampled, SCHEMA_TRIES in all); after that the request fails with 500
  `schema_not_met`, naming what broke.

`oneOf` is enforced as `anyOf` (at least one branch); that exactly one matches is checked after generation,
strict or not. A `format` llguidance does not know is a keyword it cannot enforce, like the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..models.backends.textgen import GREEDY_BELOW

# Keywords llguidance ignores with lenient=True (its warning "Unimplemented keys"; tests/unit/test_schema_checks.py
# holds this list to the installed llguidance).
UNENFORCED = frozenset(
    {
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
    }
)
# The formats llguidance enforces; any other `format` is ignored by the grammar.
ENFORCED_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"}
)
CHECKED_ONLY = frozenset({"oneOf"})  # partly enforced (as anyOf); the rest is checked, strict or not
SCHEMA_TRIES = 3  # an answer that breaks its schema is drawn again, this many tries in all
RESAMPLE_TEMPERATURE = 0.7  # a greedy request's second draw would be the same answer: it is sampled at this

_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_ONE = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_ONE += ("unevaluatedProperties", "unevaluatedItems")


def _subschemas(schema: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key in _MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield (key, name), sub
    for key in _LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield (key, str(i)), sub
    for key in _ONE:
        value = schema.get(key)
        if isinstance(value, dict):
            yield (key,), value
        elif key == "items" and isinstance(value, list):  # draft 4-7 tuples
            for i, sub in enumerate(value):
                yield (key, str(i)), sub


def unenforced(schema: Any, where: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """Where `schema` uses keywords the grammar does not enforce: (path to the subschema, keyword), in order."""
    if not isinstance(schema, dict):
        return []
    found = [(where, key) for key in schema if key in UNENFORCED or key in CHECKED_ONLY]
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in ENFORCED_FORMATS:
        found.append((where, f"format {fmt!r}"))
    for path, sub in _subschemas(schema):
        found += unenforced(sub, where + path)
    return found


def _context(where: tuple[str, ...]) -> str:
    return "(" + ", ".join(repr(p) for p in where) + ("," if len(where) == 1 else "") + ")"


def strict_refusal(schema: Any, what: str) -> tuple[str, str] | None:
    """Under `strict: true`: (message, code) refusing the first keyword the grammar cannot enforce, in OpenAI's
    words and code for a schema its strict mode does not take; None when every keyword is enforced.
    `what`: "response_format 'NAME'" or "function 'NAME'"."""
    for where, keyword in unenforced(schema):
        if keyword in CHECKED_ONLY:
            continue
        code = "invalid_function_parameters" if what.startswith("function") else "invalid_json_schema"
        shown = keyword if keyword.startswith("format") else repr(keyword)
        message = (
            f"Invalid schema for {what}: In context={_context(where)}, {shown} is not permitted: "
            "the grammar cannot enforce it (without strict, answers are checked against it after generation)"
        )
        return message, code
    return None


# ---------------------------------------------------------------- checking answers


@dataclass(frozen=True)
class SchemaCheck:
    """A caller's schema, compiled for checking answers against it (formats too, where the grammar lets them be)."""

    schema: Any
    validator: Any

    @classmethod
    def of(cls, schema: Any) -> SchemaCheck | None:
        """A check for `schema` when the grammar leaves something to check, else None. ValueError (for the
        client) for a schema that cannot be compiled; ImportError without jsonschema-rs (lanmesh[http])."""
        found = unenforced(schema)
        if not found:
            return None
        import jsonschema_rs

        formats = any(keyword.startswith("format") for _where, keyword in found)
        try:
            validator = jsonschema_rs.validator_for(schema, validate_formats=formats, offline=True)
        except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"not a JSON schema this node can check: {first}") from None
        return cls(schema, validator)

    def problem(self, value: Any) -> str | None:
        """What `value` breaks, in one line (the first problem), or None when it validates."""
        for error in self.validator.iter_errors(value):
            at = "/" + "/".join(str(p) for p in error.instance_path)
            keyword = error.schema_path[-1] if error.schema_path else "schema"
            return f"{keyword} at {at}: {error.message}"
        return None


@dataclass(frozen=True)
class AnswerChecks:
    """What to check in a chat answer after generation: its JSON content, and each tool call's arguments."""

    response: SchemaCheck | None = None
    calls: Mapping[str, SchemaCheck] | None = None  # by function name

    @property
    def needed(self) -> bool:
        return self.response is not None or bool(self.calls)

    def problem(self, content: str, calls: list[tuple[str, str]]) -> str | None:
        """What the answer (its content, or its calls as (name, arguments)) breaks, or None when it all holds."""
        for name, arguments in calls:
            check = (self.calls or {}).get(name)
            if check is not None:
                found = _problem_in(check, arguments)
                if found is not None:
                    return f"the arguments of {name}: {found}"
        if not calls and self.response is not None and content:
            found = _problem_in(self.response, content)
            if found is not None:
                return f"the answer: {found}"
        return None


def _problem_in(check: SchemaCheck, text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not JSON ({exc})"
    return check.problem(value)


def resampled(params: Mapping[str, Any], attempt: int) -> dict[str, Any]:
    """The params of the `attempt`-th draw again (1, 2, ...): sampled, and with another seed when one was given."""
    out = dict(params)
    temperature = params.get("temperature")
    if params.get("top_p") == 0 or not isinstance(temperature, int | float) or temperature < GREEDY_BELOW:
        out["temperature"] = RESAMPLE_TEMPERATURE  # greedy would write the same answer again
        out.pop("top_p", None)
    seed = params.get("seed")
    if isinstance(seed, int):
        out["seed"] = (seed + attempt + 2**63) % 2**64 - 2**63
    return out
