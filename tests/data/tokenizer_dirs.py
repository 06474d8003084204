"""Tokenizer directories built by the tests (nothing is downloaded): one byte-level BPE trained on a
little text, written out with the configs, post-processors and chat templates of the model
families parallax meets (Llama 3, Qwen2 / ChatML, Mistral)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from parallax.data import builtin_documents

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]"]

# Meta-Llama-3-8B-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2-Instruct's: ChatML with a default system message.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-Instruct style: whitespace control, an optional system message folded into the first
# user turn, and raise_exception for roles out of order.
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""
# Tools, tojson (no HTML escaping, non-ASCII kept, indent), namespace, dict, loop controls,
# strftime_now, a {% generation %} block and a caller's keyword argument.
TOOLS_TEMPLATE = """{%- set ns = namespace(seen=0) %}
{%- if tools %}<tools>{{ tools | tojson }}
{{ tools[0] | tojson(indent=2) }}</tools>
{% endif %}
{%- for message in messages %}
    {%- if message['role'] == 'stop' %}{% break %}{% endif %}
    {%- if message['role'] == 'skip' %}{% continue %}{% endif %}
    {%- set ns.seen = ns.seen + 1 %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>
{%- endfor %}
{{ dict(n=ns.seen) | tojson }} {{ strftime_now('%Y') | length }} {{ greeting | default('none') }}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

STYLES: dict[str, dict[str, Any]] = {
    "llama3": {"config": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                          "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
               "post_bos": "<|begin_of_text|>",
               "generation_config": {"eos_token_id": ["<|end_of_text|>", "<|eot_id|>"]}},
    "qwen2": {"config": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
                         "pad_token": "<|endoftext|>", "chat_template": QWEN2_TEMPLATE}},
    "mistral": {"config": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                           "chat_template": MISTRAL_TEMPLATE}, "post_bos": "<s>"},
    "tools": {"config": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                         "chat_template": TOOLS_TEMPLATE}},
}


def corpus() -> list[str]:
    """A little English text: 40 topics of the built-in corpus."""
    return builtin_documents()[:40]


@lru_cache(maxsize=None)
def base_tokenizer_json(vocab_size: int = 400) -> str:
    """A byte-level BPE with ``SPECIAL_TOKENS`` (ids 0..11), trained on ``corpus()``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def write_tokenizer_dir(path: Path, *, config: dict[str, Any] | None = None, post_bos: str | None = None,
                        generation_config: dict[str, Any] | None = None, files: dict[str, str] | None = None,
                        tokenizer_json: str | None = None) -> Path:
    """A tokenizer directory at ``path``: tokenizer.json (with a post-processor adding ``post_bos``
    when given), tokenizer_config.json, generation_config.json (token texts in its
    ``eos_token_id`` become ids) and any other ``files`` (name -> text)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tokenizer_json or base_tokenizer_json())
    if post_bos is not None:
        bos_id = tok.token_to_id(post_bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B",
                                                           special_tokens=[(post_bos, bos_id)])
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation_config is not None:
        ids = [tok.token_to_id(t) if isinstance(t, str) else t for t in generation_config["eos_token_id"]]
        (path / "generation_config.json").write_text(json.dumps({**generation_config, "eos_token_id": ids}))
    for name, text in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text, encoding="utf-8")
    return path


def write_style(path: Path, style: str) -> Path:
    """The tokenizer directory of one of ``STYLES``."""
    spec = STYLES[style]
    return write_tokenizer_dir(path, config=spec["config"], post_bos=spec.get("post_bos"),
                               generation_config=spec.get("generation_config"))


def hf_tokenizer(path: Path):
    """``transformers.AutoTokenizer.from_pretrained(path)``, the reference."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))
