"""A model's chat template (Jinja, as shipped in its tokenizer files), rendered the way transformers renders it.

Engines that do not load transformers (onnx_chat) use this: the same sandboxed Jinja environment, the same
helpers (`raise_exception`, `tojson`, `strftime_now`) and the same variables, so a prompt is byte-identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any


class TemplateError(ValueError):
    """The template refused the conversation (e.g. roles out of order); the message is for the client."""


def find_template(folder: Path) -> str | None:
    """The chat template shipped in a model folder: chat_template.jinja, or tokenizer_config.json's."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.exists():
        value = json.loads(config.read_text()).get("chat_template")
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            default = named.get("default")
            return default if isinstance(default, str) else None
    return None


def special_tokens(folder: Path) -> dict[str, str]:
    """bos_token, eos_token, ... as named in tokenizer_config.json (templates refer to them)."""
    config = folder / "tokenizer_config.json"
    if not config.exists():
        return {}
    values = json.loads(config.read_text())
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = values.get(key)
        if isinstance(value, dict):  # AddedToken form
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


class ChatTemplate:
    """Renders conversations into the prompt text the model was trained on."""

    def __init__(self, source: str, tokens: dict[str, str]) -> None:
        self.source = source
        self.tokens = tokens
        self._template = _compile(source)

    def render(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, generation: bool = True
    ) -> str:
        from jinja2.exceptions import TemplateError as JinjaError

        try:
            return str(
                self._template.render(messages=messages, tools=tools, add_generation_prompt=generation, **self.tokens)
            )
        except JinjaError as exc:
            raise TemplateError(f"the chat template refused these messages: {exc}") from None


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError as JinjaError

    raise JinjaError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
