"""OpenAI request schemas (pydantic) and their translation into `SamplingParams`.

This is the only wire schema for requests. Three kinds of fields:
- built: validated here, then checked again by `SamplingParams` (its ValueError names the field);
- known but not built (tools, guided decoding, suffix, best_of > n, response_format other than
  text, ...): a 400 naming the field, never silently ignored (`UNBUILT` below);
- unknown: kept by pydantic (`extra="allow"`), ignored, and logged as a warning by the handler.
Responses are plain dicts built in completions.py / chat.py (cheaper than pydantic per chunk).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxserve.sampling_params import SamplingParams
from jaxserve.server.errors import bad_request

MAX_N = 128  # OpenAI's cap on choices per request

TokenId = Annotated[int, Field(ge=0, lt=2**31)]
# Ints bounded to what the device arrays hold (int32; seeds int64), so a huge value is a 400, not a crash.
Int32 = Annotated[int, Field(ge=-(2**31), lt=2**31)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]
Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: Int32 = 0
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    response_format: dict[str, Any] | None = None
    user: str | None = None
    best_of: Int32 | None = None


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: Int32 | None = 16
    echo: bool = False
    logprobs: Int32 | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: bool = False
    top_logprobs: Int32 | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


# Fields OpenAI or vLLM define that jaxserve does not implement: a present, non-null value is a 400.
UNBUILT = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "guided_json",
           "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
           "guided_whitespace_pattern", "structured_outputs", "prompt_logprobs", "logprobs_mode")


def check_unbuilt(req: _SamplingRequest, max_logprobs: int) -> None:
    extra = req.model_extra or {}
    for name in UNBUILT:
        if extra.get(name) is not None and not (name == "tool_choice" and extra[name] == "none"):
            raise bad_request(f"'{name}' is not supported by this server", name)
    fmt = req.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise bad_request(f"response_format {fmt.get('type')!r} is not supported; only {{'type': 'text'}}",
                          "response_format")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of ({req.best_of}) different from n ({req.n}) is not supported", "best_of")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise bad_request("'suffix' is not supported by this server", "suffix")
        if req.logprobs is not None and not 0 <= req.logprobs <= max_logprobs:
            raise bad_request(f"logprobs must be in [0, {max_logprobs}], got {req.logprobs}", "logprobs")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= req.top_logprobs <= max_logprobs:
            raise bad_request(f"top_logprobs must be in [0, {max_logprobs}], got {req.top_logprobs}",
                              "top_logprobs")


def unknown_fields(req: BaseModel) -> list[str]:
    return sorted(k for k in (req.model_extra or {}) if k not in UNBUILT)


# Sampling fields whose default comes from generation_config.json when the request leaves them out.
_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
              "repetition_penalty")


def to_sampling_params(req: CompletionRequest | ChatCompletionRequest, defaults: dict) -> SamplingParams:
    """Request fields -> SamplingParams; a ValueError from SamplingParams becomes a 400 naming the field."""
    kw: dict[str, Any] = {}
    for name in _DEFAULTED:
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            kw[name] = value
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens, logprobs = req.max_tokens, req.logprobs
        if req.echo and logprobs is not None:
            kw["prompt_logprobs"] = logprobs
    try:
        return SamplingParams(
            n=req.n, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
            max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
            logit_bias=req.logit_bias, skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens, **kw)
    except ValueError as e:
        msg = str(e)
        raise bad_request(msg, msg.split(" ", 1)[0]) from None


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template wants them: content flattened to text (text parts only)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"content part type {part.type!r} is not supported (text only)",
                                      f"messages.{i}.content")
            content = "".join(p.text for p in content)
        msg = {"role": m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out
