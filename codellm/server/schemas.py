"""Request bodies of every route, as pydantic models: types and ranges here, limits that depend on the server
(context, stop count) in the routes.

Types are strict (a string is not a number, 1.0 is not an integer, true is not 1). Unknown fields are
ignored, as TGI, vLLM and llama.cpp do. Ranges follow what users send, not TGI's narrower rules:
temperature 0 means greedy and top_p/typical_p 1 mean off (SERVING.md, pitfall 9). TGI and OpenAI parameters
codellm does not implement (watermark, grammar, logit_bias, tools) are accepted at their "off" value and refused
otherwise; llama.cpp's tuning options on
/infill (min_p, cache_prompt, t_max_predict_ms, samplers, ...) are ignored, so its editor plugins work as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from codellm.server.errors import ApiError, from_pydantic, invalid

Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1)]
# outside this range a penalty overflows float32 logits (and sampling from NaN would stop the engine)
Penalty = Annotated[float, Field(ge=1e-3, le=1e3)]
AdditivePenalty = Annotated[float, Field(ge=-2, le=2)]  # OpenAI's presence/frequency range
TypicalP = Annotated[float, Field(gt=0, le=1)]  # 1: off (TGI refuses 1; pitfall 9)
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]
PositiveInt = Annotated[int, Field(ge=1)]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def unsupported(name: str, value, off) -> None:
    if value not in (None, off):
        raise PydanticCustomError("unsupported", f"{name} is not supported by codellm (leave it unset or {off!r})")


def string_list(value, what: str = "a string or a list of strings") -> list[str]:
    """None, a string or a list of strings -> a list (OpenAI's `stop`)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise PydanticCustomError("type", f"must be {what}")
    if any(not s for s in value):
        raise PydanticCustomError("value", "stop strings must not be empty")
    return value


# --- TGI / SageMaker --------------------------------------------------------------------------------


class TGIParameters(Body):
    max_new_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Penalty | None = None
    stop: list[str] | None = None
    seed: Seed | None = None
    do_sample: bool | None = None
    details: bool | None = None
    return_full_text: bool | None = None
    truncate: PositiveInt | None = None
    top_n_tokens: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: PositiveInt | None = None  # the route checks it against --max-best-of
    decoder_input_details: bool | None = None
    typical_p: TypicalP | None = None
    frequency_penalty: AdditivePenalty | None = None
    # accepted at their "off" value only
    watermark: bool | None = None
    grammar: Any = None
    adapter_id: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return string_list(v, "a list of strings")

    @field_validator("watermark", "grammar", "adapter_id")
    @classmethod
    def _off(cls, v, info):
        off = {"watermark": False, "grammar": None, "adapter_id": None}[info.field_name]
        unsupported(info.field_name, v, off)
        return v


class TGIRequest(Body):
    inputs: str
    parameters: TGIParameters | None = None
    stream: bool | None = None

    @property
    def params(self) -> TGIParameters:
        return self.parameters or TGIParameters()


# --- OpenAI -----------------------------------------------------------------------------------------


class StreamOptions(Body):
    include_usage: bool | None = None


class OpenAISampling(Body):
    """Fields /v1/completions and /v1/chat/completions share (vLLM's extras top_k, repetition_penalty too)."""

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM says -1)
    repetition_penalty: Penalty | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    stop: Annotated[Any, Field(validate_default=True)] = None  # -> a list of strings
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: AdditivePenalty | None = None
    frequency_penalty: AdditivePenalty | None = None
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return string_list(v)

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise PydanticCustomError("unsupported", "logit_bias is not supported by codellm")
        return v


class CompletionRequest(OpenAISampling):
    prompt: Any
    suffix: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 only with echo: score the prompt (the route checks)
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
        ok = isinstance(v, str) or (
            isinstance(v, list)
            and v
            and (
                all(isinstance(p, str) for p in v)
                or all(_is_id(t) for t in v)
                or all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in v)
            )
        )
        if not ok:
            raise PydanticCustomError(
                "type",
                "must be a string, a non-empty list of strings, or token ids (a list "
                "of integers, or a list of such lists)",
            )
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        unsupported("best_of", v, 1)
        return v


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: str
    content: str | list[TextPart]  # required: no tool calls here, so a message without text is an error
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatRequest(OpenAISampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise PydanticCustomError("unsupported", "tools are not supported by codellm")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type") != "text":
            raise PydanticCustomError("unsupported", 'only response_format {"type": "text"} is supported')
        return v


# --- llama.cpp /infill ------------------------------------------------------------------------------


class ExtraChunk(Body):
    filename: str = "tmp"
    text: str = ""


class InfillRequest(Body):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []
    prompt: str = ""  # llama.cpp appends it to the prefix: the current line up to the cursor
    order: Literal["psm", "spm"] = "psm"
    n_predict: Annotated[int, Field(ge=-1)] | None = None  # -1: until the context is full
    temperature: Temperature = 0.8  # llama.cpp's defaults
    top_k: Annotated[int, Field(ge=0)] = 40
    top_p: TopP = 0.95
    repeat_penalty: Penalty = 1.0
    seed: Annotated[int, Field(ge=-1, le=2**64 - 1)] = -1  # -1: random
    stop: list[str] = []
    stream: bool | None = None
    n_probs: Annotated[int, Field(ge=0, le=20)] = 0

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return string_list(v, "a list of strings")

    @field_validator("n_predict")
    @classmethod
    def _n_predict(cls, v):
        if v == 0:
            raise PydanticCustomError("value", "n_predict must be -1 (until the context is full) or >= 1 (got 0)")
        return v


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def parse(model: type[Body], data, prefix: str = ""):
    """Validate a decoded JSON body; an ApiError names the first bad field."""
    if not isinstance(data, dict):
        raise invalid(prefix or "body", f"must be a JSON object (got {type(data).__name__})")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_pydantic(e, prefix) from None
    except RecursionError:
        raise ApiError("validation", "body: nested too deeply", "body") from None
