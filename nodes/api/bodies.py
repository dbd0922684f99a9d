"""The OpenAI API's request and response bodies as this gateway serves them, and what each request asks of the mesh.

Checked against OpenAI's published spec (openai/openai-openapi; the schemas used are vendored in
`tests/http/openai_spec/`). Every field the spec accepts is one of:

- honoured: model, messages (text; tool calls and results), max_tokens / max_completion_tokens, temperature,
  top_p (0 is greedy), seed, stop, stream, stream_options.include_usage, tools, tool_choice, parallel_tool_calls,
  response_format, functions / function_call (the deprecated form of tools), completions' prompt (an empty one is
  the start of a document, as a null one), echo and max_tokens 0, embeddings' input, encoding_format and
  dimensions (when it is the model's own size; another size is refused as unsupported);
- set to its default, which is what lanmesh does anyway (n 1, logprobs false, penalties 0, an empty logit_bias,
  modalities ["text"], verbosity medium, reasoning_effort none, store false, best_of 1, no suffix): accepted;
  any other value is refused with a 400 naming the field (`code: unsupported_parameter`);
- about OpenAI's own service (user, metadata, service_tier, safety_identifier, prompt_cache_key,
  prompt_cache_retention, prompt_cache_options, stream_options.include_obfuscation): accepted and ignored.

Unknown fields are ignored, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from .schema_checks import AnswerChecks, SchemaCheck, strict_refusal
from .structured_output import ANY_OBJECT, AnswerShape, FunctionTool, assistant_text

# What a completions request without a prompt continues: OpenAI's default, the end-of-document marker, so the
# model starts a new document (tokenizers that know the marker read it as their special token).
DEFAULT_PROMPT = "<|endoftext|>"
_TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
_ROLES = {"developer": "system", "function": "tool"}  # OpenAI roles -> the roles chat templates know


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class ApiError(Exception):
    """An HTTP error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.detail).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def unsupported(param: str, why: str) -> ApiError:
    """A 400 for a valid request that asks for something lanmesh does not do."""
    return ApiError(400, f"{param}: {why} is not supported by lanmesh", param=param, code="unsupported_parameter")


def invalid(param: str, message: str) -> ApiError:
    """A 400 for a value that cannot be served as given (a name that is not there, a missing part): the caller
    must change it. OpenAI's code for it, `invalid_value`."""
    return ApiError(400, message, param=param, code="invalid_value")


def _refuse_unless_default(body: BaseModel, defaults: dict[str, Callable[[Any], bool]]) -> None:
    for name, is_default in defaults.items():
        value = getattr(body, name)
        if value is not None and not is_default(value):
            raise unsupported(name, f"{name}={value!r}")


# ---------------------------------------------------------------- chat messages


class ContentPart(BaseModel):
    """One part of a message's content. Only text (and, from the assistant, refusal) parts can be served."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="text, refusal (assistant) or image_url, input_audio, file (refused: text models)")
    text: str | None = None
    refusal: str | None = None


class FunctionCallIn(BaseModel):
    name: str
    arguments: str = ""


class ToolCallIn(BaseModel):
    """A call the assistant made in an earlier turn."""

    model_config = ConfigDict(extra="allow")

    id: str = ""
    type: str = "function"
    function: FunctionCallIn | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    function_call: FunctionCallIn | None = Field(default=None, description="Deprecated: tool_calls.")
    refusal: str | None = None
    audio: dict[str, Any] | None = Field(default=None, description="Refused: no audio here.")

    def check(self, where: str) -> None:
        """A 400 for what the mesh's models cannot read."""
        if self.audio is not None:
            raise unsupported(f"{where}.audio", "audio")
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            allowed = ("text", "refusal") if self.role == "assistant" else ("text",)
            if part.type not in allowed:
                raise unsupported(f"{where}.content.{j}", f"a {part.type!r} content part (the models here read text)")
            if getattr(part, part.type) is None:
                raise invalid(where, f"{where}.content.{j}: a {part.type} part needs {part.type}")
        for j, call in enumerate(self.tool_calls or []):
            if call.type != "function" or call.function is None:
                raise unsupported(f"{where}.tool_calls.{j}", f"a {call.type!r} tool call")

    def wire(self) -> dict[str, str]:
        """The message as the mesh carries it: {role, content: text}; earlier tool calls written out as text."""
        if isinstance(self.content, list):
            text = "".join(part.text or part.refusal or "" for part in self.content)
        else:
            text = self.content or ""
        if self.role == "assistant":
            text = text or self.refusal or ""
            calls = [(c.function.name, c.function.arguments) for c in self.tool_calls or [] if c.function is not None]
            if self.function_call is not None:
                calls.append((self.function_call.name, self.function_call.arguments))
            text = assistant_text(text, calls)
        return {"role": _ROLES.get(self.role, self.role), "content": text}


# ---------------------------------------------------------------- tools and response formats


class FunctionSpec(BaseModel):
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema; none means no arguments.")
    strict: bool | None = Field(
        default=None, description="Refuses schema keywords the grammar cannot enforce (else checked afterwards)."
    )

    def tool(self) -> FunctionTool:
        return FunctionTool(self.name, self.parameters if self.parameters is not None else {"type": "object"})

    def shown(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.tool().parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


class ToolSpec(BaseModel):
    """A tool the model may call: `function` tools are served; `custom` (free-form) tools are refused."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function", "custom"]
    function: FunctionSpec | None = None


class NamedFunction(BaseModel):
    name: str


class AllowedTools(BaseModel):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class ToolChoiceObject(BaseModel):
    """{type: function, function: {name}}, or {type: allowed_tools, allowed_tools: {mode, tools}}."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function", "allowed_tools", "custom"]
    function: NamedFunction | None = None
    allowed_tools: AllowedTools | None = None


class JsonSchemaFormat(BaseModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = Field(
        default=None, description="Refuses schema keywords the grammar cannot enforce (else checked afterwards)."
    )


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    include_obfuscation: bool | None = Field(default=None, description="Ignored.")


Stop = str | Annotated[list[str], Field(max_length=4)]


# ---------------------------------------------------------------- requests


class _Sampling(BaseModel):
    """What chat and completions share."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1, description="0 keeps only the likeliest token (greedy).")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: Stop | None = None
    n: int | None = Field(default=1, ge=1, le=128, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="Only 0 is supported.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="Only 0 is supported.")
    logit_bias: dict[str, int] | None = Field(default=None, description="Only an empty map is supported.")
    user: str | None = Field(default=None, description="Ignored.")

    def mesh_params(self, max_tokens: int | None = None) -> dict[str, Any]:
        """OpenAI sampling fields -> the mesh's params (unset ones are left to the model's defaults)."""
        given = {
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return params

    @property
    def streams(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_sampling(self) -> None:
        _refuse_unless_default(
            self,
            {
                "n": lambda v: v == 1,
                "frequency_penalty": lambda v: v == 0,
                "presence_penalty": lambda v: v == 0,
                "logit_bias": lambda v: not v,
            },
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31, description="Wins over max_tokens.")
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None
    functions: list[FunctionSpec] | None = Field(default=None, description="Deprecated: tools.")
    function_call: Literal["none", "auto"] | NamedFunction | None = Field(default=None, description="Deprecated.")
    logprobs: bool | None = Field(default=None, description="Only false is supported.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Only 0 is supported.")
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, description="Text only.")
    audio: dict[str, Any] | None = Field(default=None, description="Refused: no audio output.")
    prediction: dict[str, Any] | None = Field(default=None, description="Refused.")
    web_search_options: dict[str, Any] | None = Field(default=None, description="Refused: nothing leaves the LAN.")
    moderation: dict[str, Any] | None = Field(default=None, description="Refused.")
    verbosity: Literal["low", "medium", "high"] | None = Field(default=None, description="Only medium.")
    reasoning_effort: str | None = Field(default=None, description="Only none: these models do not reason.")
    store: bool | None = Field(default=None, description="Only false: lanmesh stores no completions.")

    @property
    def legacy_functions(self) -> bool:
        """The deprecated `functions` API: its answer is message.function_call, one call at most."""
        return bool(self.functions) and not self.tools

    def check(self) -> None:
        """A 400 naming the first field that asks for something lanmesh does not do."""
        self._check_sampling()
        _refuse_unless_default(
            self,
            {
                "logprobs": lambda v: v is False,
                "top_logprobs": lambda v: v == 0,
                "modalities": lambda v: "audio" not in v,
                "audio": lambda _v: False,
                "prediction": lambda _v: False,
                "web_search_options": lambda _v: False,
                "moderation": lambda _v: False,
                "verbosity": lambda v: v == "medium",
                "reasoning_effort": lambda v: v == "none",
                "store": lambda v: v is False,
            },
        )
        for i, message in enumerate(self.messages):
            message.check(f"messages.{i}")
        names: set[str] = set()
        for i, tool in enumerate(self.tools or []):
            if tool.type != "function" or tool.function is None:
                raise unsupported(f"tools.{i}", f"a {tool.type!r} tool (function tools are)")
            if tool.function.name in names:
                raise invalid(f"tools.{i}", f"tools.{i}: a second function named {tool.function.name!r}")
            names.add(tool.function.name)
        self.answer_shape()  # a tool_choice naming no offered function is a 400 here
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            why = "response_format: json_schema needs json_schema: {name, schema}"
            raise invalid("response_format", why)
        self._refuse_what_strict_cannot_keep()

    def _refuse_what_strict_cannot_keep(self) -> None:
        """`strict: true` promises the schema by construction: a keyword the grammar cannot enforce is a 400."""
        fmt = self.response_format.json_schema if self.response_format is not None else None
        if fmt is not None and fmt.strict and fmt.schema_ is not None:
            refused = strict_refusal(fmt.schema_, f"response_format {fmt.name!r}")
            if refused is not None:
                raise ApiError(400, refused[0], param="response_format", code=refused[1])
        specs = [(f"tools.{i}.function", t.function) for i, t in enumerate(self.tools or []) if t.function]
        specs += [(f"functions.{i}", f) for i, f in enumerate(self.functions or [])]
        for where, spec in specs:
            if spec.strict and spec.parameters is not None:
                refused = strict_refusal(spec.parameters, f"function {spec.name!r}")
                if refused is not None:
                    raise ApiError(400, refused[0], param=f"{where}.parameters", code=refused[1])

    def answer_checks(self, shape: AnswerShape) -> AnswerChecks:
        """What the grammar leaves to check in this request's answers, compiled (a 400 for a schema that cannot
        be checked)."""
        try:
            response = SchemaCheck.of(shape.json_schema) if shape.json_schema is not None else None
            calls = {fn.name: check for fn in shape.callable if (check := SchemaCheck.of(fn.parameters))}
        except ValueError as exc:
            where = "tools" if shape.expects_calls else "response_format"
            raise invalid(where, f"{where}: {exc}") from None
        except ImportError:
            why = "this node cannot check JSON answers: pip install 'lanmesh[http]'"
            raise ApiError(500, why, "server_error") from None
        return AnswerChecks(response, calls)

    def wire_messages(self) -> list[dict[str, str]]:
        return [m.wire() for m in self.messages]

    def answer_shape(self) -> AnswerShape:
        """What the answer may be, from tools, tool_choice, parallel_tool_calls and response_format."""
        json_schema = None
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            json_schema = ANY_OBJECT
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            json_schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
        if self.legacy_functions:
            assert self.functions is not None
            functions = [f.tool() for f in self.functions]
            shown = tuple(f.shown() for f in self.functions)
            choice: Any = self.function_call or "auto"
            if isinstance(choice, NamedFunction):
                choice = ToolChoiceObject(type="function", function=choice)
            where, parallel = "function_call", False
        else:
            specs = [t.function for t in self.tools or [] if t.function is not None]
            functions = [f.tool() for f in specs]
            shown = tuple(f.shown() for f in specs)
            choice = self.tool_choice or ("auto" if functions else "none")
            where, parallel = "tool_choice", self.parallel_tool_calls is not False
        if not functions:
            if choice not in ("none", "auto"):  # a call is asked for, and there is nothing to call
                raise invalid(where, f"Invalid value for '{where}': '{where}' is only allowed when tools are given")
            return AnswerShape(json_schema=json_schema)
        if choice == "none":
            return AnswerShape(shown, (), "none", parallel, json_schema)
        by_name = {f.name: f for f in functions}
        if choice in ("auto", "required"):
            calls: Literal["optional", "required"] = "optional" if choice == "auto" else "required"
            return AnswerShape(shown, tuple(functions), calls, parallel, json_schema)
        assert isinstance(choice, ToolChoiceObject)
        if choice.type == "function" and choice.function is not None:
            fn = by_name.get(choice.function.name)
            if fn is None:
                why = f"no function {choice.function.name!r} among the tools"
                raise invalid(where, f"Invalid value for '{where}': {why}")
            return AnswerShape(shown, (fn,), "required", parallel, json_schema)
        if choice.type == "allowed_tools" and choice.allowed_tools is not None:
            allowed = []
            for i, item in enumerate(choice.allowed_tools.tools):
                name = (item.get("function") or {}).get("name") if isinstance(item.get("function"), dict) else None
                if item.get("type") != "function" or name not in by_name:
                    raise invalid(where, f"Invalid value for '{where}': allowed_tools.tools.{i} is not among the tools")
                allowed.append(by_name[name])
            calls = "optional" if choice.allowed_tools.mode == "auto" else "required"
            return AnswerShape(shown, tuple(allowed), calls, parallel, json_schema)
        raise unsupported(where, f"a {choice.type!r} tool choice")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] | None = Field(
        description="One prompt, or several (one choice each; streaming takes one). Token ids are refused."
    )
    max_tokens: int | None = Field(default=None, ge=0, le=2**31, description="0: no new text (with echo: the prompt).")
    echo: bool | None = Field(default=False, description="Answer the prompt followed by its continuation.")
    best_of: int | None = Field(default=None, ge=0, le=20, description="Only 1 is supported.")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Refused: no log probabilities here.")
    suffix: str | None = Field(default=None, description="Only none is supported.")

    def check(self) -> None:
        self._check_sampling()
        _refuse_unless_default(
            self, {"best_of": lambda v: v in (0, 1), "logprobs": lambda _v: False, "suffix": lambda v: v == ""}
        )
        prompts = self.prompts()  # token ids are a 400 there
        if not prompts:
            raise unsupported("prompt", "an empty list of prompts")
        if self.streams and len(prompts) != 1:
            raise unsupported("prompt", "streaming several prompts")

    def prompts(self) -> list[str]:
        if self.prompt is None:
            return [DEFAULT_PROMPT]
        if isinstance(self.prompt, str):
            return [self.prompt]
        if any(not isinstance(p, str) for p in self.prompt):
            raise unsupported("prompt", "a prompt of token ids (send text)")
        return [p for p in self.prompt if isinstance(p, str)]


class EmbeddingRequest(BaseModel):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Text or texts; token ids are refused.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Must equal the model's own size if given.")
    user: str | None = Field(default=None, description="Ignored.")

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise unsupported("input", "an empty list of inputs")
        if any(not isinstance(x, str) for x in self.input):
            raise unsupported("input", "input of token ids (send text)")
        if len(self.input) > 2048:
            raise invalid("input", "input: at most 2048 texts per request")
        return [x for x in self.input if isinstance(x, str)]


# ---------------------------------------------------------------- responses

FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens the serving node's prefix cache did not read again.")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text (valid against the function's schema).")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCallOut | None = Field(default=None, description="Deprecated functions API only.")

    @model_serializer(mode="wrap")
    def _omit_absent_calls(self, handler: Any) -> Any:
        # content and refusal are required (null allowed); tool_calls and function_call are absent, not null.
        out = handler(self)
        for key in ("tool_calls", "function_call"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 values.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lanmesh"
    nodes: list[str] = Field(description="Live nodes serving this model (this node included).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ready", "unavailable", "leaving"]
    ready: bool
    node: str | None = Field(default=None, description="With the API key (or when the node has none).")
    models: list[str] | None = Field(default=None, description="Models this node serves; with the key, as node.")
