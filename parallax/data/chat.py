"""Chat templates: a model directory's Jinja template rendered the way ``transformers``'
``apply_chat_template`` renders it, so the same string and the same token ids come out.

Where a tokenizer's templates come from (transformers' precedence):

1. ``chat_template.jinja`` in the directory (the default template) and
   ``additional_chat_templates/<name>.jinja`` (named ones); when either exists,
   tokenizer_config.json's ``chat_template`` is ignored;
2. tokenizer_config.json's ``chat_template``: a string, or a list of ``{"name", "template"}``;
3. neither: ``DEFAULT_CHAT_TEMPLATE`` (ChatML).

The environment is transformers': jinja2's ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the loop controls (``{% break %}``, ``{% continue %}``),
``{% generation %}`` blocks (rendered as their body), ``raise_exception(message)``,
``strftime_now(format)``, a ``tojson`` filter that is plain ``json.dumps`` (no HTML escaping,
``ensure_ascii=False``), and ``dict``/``namespace`` restricted as transformers restricts them.
A template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
tokenizer's named special tokens as strings (``bos_token``, ``eos_token``, ...) and the
caller's keyword arguments, which win over the special tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from parallax.data.errors import TokenizerError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatTemplate", "ChatTemplateMixin", "load_chat_templates"]

log = logging.getLogger(__name__)

# ChatML, the template transformers used for tokenizers without one until v4.43, and the one
# `parallax tokenizer train` writes. A generation prompt opens the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SOURCE = "parallax's default chat template (ChatML)"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# Names a message's reasoning is passed under; templates read the first (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' apply_chat_template arguments this one does not implement: refused, rather than
# silently passed to the template as variables.
_UNSUPPORTED = ("continue_final_message", "return_dict", "return_tensors", "padding", "truncation", "max_length",
                "tokenizer_kwargs", "return_assistant_tokens_mask", "sanitize_control_tokens")


@dataclass(frozen=True)
class ChatTemplate:
    """One Jinja template and where it came from (every error about it names ``source``)."""

    text: str
    source: str


def load_chat_templates(directory: Path, config: Mapping[str, Any], config_path: Path) -> dict[str, ChatTemplate]:
    """The named templates of a tokenizer directory (empty when it has none); ``"default"`` is
    the one ``apply_chat_template`` uses unless asked for another. Precedence: module docstring."""
    templates: dict[str, ChatTemplate] = {}
    main_file = directory / TEMPLATE_FILE
    if main_file.is_file():
        templates["default"] = ChatTemplate(_read_template(main_file), str(main_file))
    extra_dir = directory / TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = ChatTemplate(_read_template(path), str(path))
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": ChatTemplate(value, f"{config_path} (chat_template)")}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: ChatTemplate(t["template"], f"{config_path} (chat_template {t['name']!r})") for t in value}
    raise TokenizerError(f"{config_path}: chat_template must be a string or a list of "
                         f'{{"name": ..., "template": ...}} objects, got {type(value).__name__}')


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read the chat template ({exc})") from None


class ChatTemplateMixin:
    """``apply_chat_template`` for a tokenizer with ``encode(text, add_special_tokens)``,
    ``chat_templates`` (name -> ``ChatTemplate``; empty means ``DEFAULT_CHAT_TEMPLATE``) and
    ``special_tokens`` (name -> text)."""

    chat_templates: dict[str, ChatTemplate]
    special_tokens: dict[str, str]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
                            **kwargs: Any) -> list[int] | str:
        """Render ``messages`` (dicts with "role" and "content") with the chat template; the token
        ids (``tokenize=True``) or the text.

        As transformers' ``apply_chat_template(..., return_dict=False)``: ``add_generation_prompt``
        opens the assistant's turn; ``tools`` and ``documents`` (lists of JSON-schema / document
        dicts) are passed to the template; ``chat_template`` names one of the directory's templates
        or is a template string itself; other keyword arguments become template variables. The
        text is tokenized with ``add_special_tokens=False``: a BOS the template writes is not doubled.
        Raises ``TokenizerError`` naming the template's file when the template fails.
        """
        unsupported = sorted(set(kwargs) & set(_UNSUPPORTED))
        if unsupported:
            raise TypeError(f"apply_chat_template: {', '.join(unsupported)} is a transformers argument parallax does "
                            "not implement (it returns the ids as a list, or the text with tokenize=False)")
        template = self._select_template(chat_template, tools)
        variables = {**self.special_tokens, **_plain(kwargs)}
        text = render(template, _normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                      tools=_check_dicts("tools", tools), documents=_check_dicts("documents", documents),
                      variables=variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_template(self, chat_template: str | None, tools: Sequence[Any] | None) -> ChatTemplate:
        templates = self.chat_templates
        if chat_template is not None:
            return templates.get(chat_template) or ChatTemplate(chat_template, "the chat_template argument")
        if not templates:
            return ChatTemplate(DEFAULT_CHAT_TEMPLATE, DEFAULT_SOURCE)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise TokenizerError(f"this tokenizer has several chat templates and no 'default' "
                             f"({', '.join(sorted(templates))}); pass chat_template=NAME")


def render(template: ChatTemplate, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
           tools: list[dict[str, Any]] | None, documents: list[dict[str, Any]] | None,
           variables: Mapping[str, Any]) -> str:
    """The text of ``template`` for these inputs; ``TokenizerError`` naming the template's source
    (and its line, where jinja knows it) when the template does not parse or raises."""
    import jinja2

    compiled = _compile(template.text, template.source)
    try:
        return compiled.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as exc:
        line = _template_line(exc)
        where = f"{template.source}, line {line}" if line is not None else template.source
        raise TokenizerError(f"{where}: the chat template raised an error: {exc}") from exc


@lru_cache(maxsize=32)
def _compile(text: str, source: str):
    import jinja2

    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"{source}, line {exc.lineno}: chat template syntax error: {exc.message}") from None


def _template_line(exc: BaseException) -> int | None:
    """The template line a render error came from: jinja rewrites its traceback so that the
    template's frames carry the file name "<template>" and the template's line numbers."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@lru_cache(maxsize=1)
def _environment():
    """transformers' chat-template environment (``utils/chat_template_utils.py``)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1.6' "
                          "(or pip install 'parallax[cli]')") from None

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for transformers'
        assistant masks; rendering it yields its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        """``dict(...)`` for templates, without the attributes a ``dict`` type would expose."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` refusing underscore names, which could reach Python internals."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain dicts with the keys whose value is None dropped (APIs send ``content=None``, which
    templates render as "None"), and the reasoning aliases filled in, as transformers does."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {key: _plain(value) for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _check_dicts(name: str, values: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    if values is None:
        return None
    if isinstance(values, (str, Mapping)) or not all(isinstance(v, Mapping) for v in values):
        raise TypeError(f"{name} must be a list of dicts (JSON schemas for tools), got {values!r}")
    return [_plain(v) for v in values]


def _plain(value: Any) -> Any:
    """JSON-like data only (what transformers lets a template see): containers are rebuilt and
    any other object becomes a placeholder naming its type, so a sandboxed template cannot call
    methods of rich objects (arrays, images, tensors) passed in by the caller."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy floats) back to the base type, whose methods are known to be safe.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy scalars: np.bool_(False) must stay falsy
    return f"<{type(value).__name__}>"
