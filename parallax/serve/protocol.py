"""The OpenAI request bodies (pydantic v2, strict types) and the JSON of the answers.

``CompletionRequest`` (``POST /v1/completions``) and ``ChatCompletionRequest`` (``POST /v1/chat/completions``)
validate a parsed JSON body; ``parse_request`` turns a ``ValidationError`` into a 400 ``APIError`` whose
``param`` names the field (``max_tokens``, ``messages[0].content``). Fields with several accepted shapes
(``prompt``, ``stop``, a message's ``content``) are checked by validators rather than pydantic unions, so
that an error names the field and not a union member. Unknown fields are ignored, as OpenAI's API does;
fields parallax cannot honour (penalties, ``logit_bias``, ``best_of`` > 1, ``suffix``) are rejected by name
unless they hold their neutral value.

The answers are plain dicts (``json.dumps`` per streamed chunk is the cheapest path): ``usage``,
``completion_logprobs`` and ``chat_logprobs`` build their pieces; the app assembles them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from parallax.inference import SamplingParams
from parallax.serve.errors import APIError, invalid_request, pydantic_param

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "parse_request",
           "usage", "completion_logprobs", "chat_logprobs", "check_model", "MAX_N", "MAX_STOP", "MAX_STOP_CHARS"]

MAX_N = 128  # samples per prompt; the engine also bounds n by its max_num_seqs
MAX_STOP = 4  # OpenAI's limit on stop strings
# Longest stop string: a stream checks each tail of the text against each stop string's prefixes
# (parallax.serve.streaming.sendable_text), quadratic in this length.
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MIN_LOGPROB = -9999.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # None: the base model
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension: -1, 0 or None keep every token
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"holds {len(stops)} strings; at most {MAX_STOP} are allowed")
        if max(len(s) for s in stops) > MAX_STOP_CHARS:
            raise ValueError(f"strings may have at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0.0):
            raise ValueError("is not supported by this server; only 0 (the default) is accepted")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("is not supported by this server; leave it out")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        extra = {} if logprobs is None else {"logprobs": logprobs}
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k if self.top_k and self.top_k > 0 else None, n=self.n,
                              seed=self.seed, stop=list(self.stop), ignore_eos=self.ignore_eos, **extra)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``. ``prompt`` becomes a list of prompts, each a string or a list of token ids."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default; None: up to the model's context
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(_is_token(t) for t in value):
                return [value]
            if all(isinstance(p, str) for p in value):
                return value
            if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in value):
                return value
        raise ValueError("must be a string, a list of strings, a list of token ids (integers >= 0) or a list of "
                         "token-id lists, none of them empty")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("other than 1 is not supported by this server; use n")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("is not supported by this server; leave it out")
        return value

    @model_validator(mode="after")
    def _echo_without_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise _FieldError("echo", "with logprobs is not supported (the prompt's logprobs are not computed)")
        return self

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters, ``max_tokens`` already fitted to the context."""
        return self._params(max_tokens, self.logprobs)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ChatMessage(BaseModel):
    """One turn. ``content``: a string or a list of ``{"type": "text", "text": ...}`` parts (joined);
    None only for an assistant turn."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for i, part in enumerate(value):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"part [{i}] must be {{\"type\": \"text\", \"text\": string}}; this server "
                                     "takes text only")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")

    @model_validator(mode="after")
    def _content_needed(self):
        if self.content is None and self.role != "assistant":
            raise _FieldError("content", f"is required in a {self.role} message")
        return self


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: the messages go through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the model's context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True  # vLLM's extension

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "needs logprobs: true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters, ``max_tokens`` already fitted to the context."""
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class _FieldError(ValueError):
    """A model validator's error that names its field (pydantic would report the model itself)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


Request = TypeVar("Request", bound=BaseModel)


def parse_request(model: type[Request], body: Any) -> Request:
    """``model`` validated from a parsed JSON body; a 400 ``APIError`` naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise invalid_request(f"the request body must be a JSON object; got {type(body).__name__}", None)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        cause = error.get("ctx", {}).get("error")
        loc = tuple(error["loc"])
        if isinstance(cause, _FieldError):
            loc, message = loc + (cause.field,), cause.message
        elif error["type"] == "value_error":
            message = str(cause) if cause is not None else error["msg"]
        else:
            message = error["msg"][0].lower() + error["msg"][1:]
        param = pydantic_param(loc)
        if error["type"] == "missing":
            raise invalid_request(f"'{param}' is required", param) from None
        raise invalid_request(f"'{param}': {message}" if param else message, param) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprob(value: float) -> float:
    """A logprob JSON can carry: -inf (a token the model rules out) and NaN become ``MIN_LOGPROB``, as
    vLLM does (JSON has no infinities, and OpenAI's clients reject them)."""
    value = float(value)
    return value if value >= MIN_LOGPROB else MIN_LOGPROB


def _top(entry: Any, token_text: Callable[[int], str]) -> list[tuple[str, float]]:
    """The alternatives of one ``TokenLogprob`` as (text, logprob), most likely first."""
    return [(token_text(t), _logprob(lp)) for t, lp in entry.top]


def completion_logprobs(entries: Sequence[Any], token_text: Callable[[int], str], offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object of some generated tokens (``TokenLogprob``s): their
    texts, logprobs, top alternatives (the sampled token always among them, as OpenAI does) and text
    offsets, counted from ``offset`` characters."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(_logprob(entry.logprob))
        top = dict(_top(entry, token_text))
        top.setdefault(text, _logprob(entry.logprob))
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(entries: Sequence[Any], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat ``logprobs`` object (``{"content": [...]}``) of some generated tokens."""
    content = []
    for entry in entries:
        text = token_text(entry.token_id)
        content.append({"token": text, "logprob": _logprob(entry.logprob), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                         for t, lp in _top(entry, token_text)]})
    return {"content": content}


def check_model(requested: str | None, known: Sequence[str]) -> None:
    """404 ``model_not_found`` unless ``requested`` (None: the base) is one of ``known``."""
    if requested is not None and requested not in known:
        raise APIError(404, f"The model '{requested}' does not exist; this server has {', '.join(known)}",
                       param="model", code="model_not_found")
