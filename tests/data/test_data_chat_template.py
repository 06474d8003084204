"""Chat templates: the same text and ids as transformers' apply_chat_template for Llama 3, Qwen2 /
ChatML and Mistral templates; where templates come from; the default; errors naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallax.data import DEFAULT_CHAT_TEMPLATE, ByteTokenizer, TokenizerError, load_tokenizer
from tests.data.tokenizer_dirs import QWEN2_TEMPLATE, hf_tokenizer, write_style, write_tokenizer_dir

pytest.importorskip("transformers")
pytest.importorskip("jinja2")

SYSTEM = {"role": "system", "content": "You are terse. Answer in <= 5 words & no \"quotes\"."}
CHATS = {
    "one user turn": [{"role": "user", "content": "Hello, how are you?"}],
    "system and user": [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. 👋"},
                   {"role": "user", "content": "  Tell me a joke about café owners.  "},
                   {"role": "assistant", "content": "No."}, {"role": "user", "content": "Why?"}],
}


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-styles")
    return {name: write_style(root / name, name) for name in ("llama3", "qwen2", "mistral", "tools")}


def _reference(ref, messages, **kw):
    """transformers' text and ids (return_dict=False: plain ids, as transformers 4 returned)."""
    text = ref.apply_chat_template(messages, tokenize=False, **kw)
    ids = ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    return text, list(ids)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("style", ["llama3", "qwen2", "mistral"])
def test_same_text_and_ids_as_transformers(styles: dict[str, Path], style: str, chat: str,
                                           add_generation_prompt: bool):
    ours, ref = load_tokenizer(styles[style]), hf_tokenizer(styles[style])
    messages = CHATS[chat]
    text, ids = _reference(ref, messages, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False) == text
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == ids


def test_template_writes_bos_once(styles: dict[str, Path]):
    """Llama 3's template writes <|begin_of_text|> itself; tokenizing must not add a second one."""
    tok = load_tokenizer(styles["llama3"])
    ids = tok.apply_chat_template(CHATS["one user turn"])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tools_tojson_namespace_loop_controls_and_kwargs(styles: dict[str, Path], add_generation_prompt: bool):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find <b> & ünïcode",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [SYSTEM, {"role": "skip", "content": "hidden"}, {"role": "user", "content": "hi", "tool_calls": None},
                {"role": "assistant", "content": "yo"}, {"role": "stop", "content": "x"},
                {"role": "user", "content": "z"}]
    ours, ref = load_tokenizer(styles["tools"]), hf_tokenizer(styles["tools"])
    kw = dict(tools=tools, add_generation_prompt=add_generation_prompt, greeting="hey")
    text, ids = _reference(ref, messages, **kw)
    assert "<b> & ünïcode" in text and '{"n": 3}' in text and "hey" in text and "hidden" not in text
    assert ours.apply_chat_template(messages, tokenize=False, **kw) == text
    assert ours.apply_chat_template(messages, **kw) == ids


def test_chat_template_jinja_file_wins_over_the_config(tmp_path: Path):
    """As in transformers: chat_template.jinja replaces tokenizer_config.json's chat_template, and
    additional_chat_templates/NAME.jinja are named templates ("tool_use" is picked when tools are given)."""
    files = {"chat_template.jinja": "FILE {% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}",
             "additional_chat_templates/tool_use.jinja": "TOOLS {{ tools | length }} {{ messages | length }}",
             "additional_chat_templates/brief.jinja": "BRIEF {{ messages[-1]['content'] }}"}
    path = write_tokenizer_dir(tmp_path / "t", config={"tokenizer_class": "PreTrainedTokenizerFast",
                                                       "eos_token": "</s>", "chat_template": QWEN2_TEMPLATE},
                               files=files)
    ours, ref = load_tokenizer(path), hf_tokenizer(path)
    messages = CHATS["system and user"]
    for kw in ({}, {"tools": [{"name": "f"}]}, {"chat_template": "brief"}, {"chat_template": "{{ 'inline' }}"}):
        expected = ref.apply_chat_template(messages, tokenize=False, **kw)
        assert ours.apply_chat_template(messages, tokenize=False, **kw) == expected, kw
    assert ours.apply_chat_template(messages, tokenize=False).startswith("FILE [system:")


def test_list_of_named_templates_in_the_config(tmp_path: Path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
              "chat_template": [{"name": "default", "template": "D {{ messages[0]['content'] }}"},
                                {"name": "rag", "template": "R {{ documents[0]['text'] }}"}]}
    path = write_tokenizer_dir(tmp_path / "t", config=config)
    ours, ref = load_tokenizer(path), hf_tokenizer(path)
    messages = CHATS["one user turn"]
    docs = [{"title": "t", "text": "body"}]
    assert ours.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages, tokenize=False, chat_template="rag", documents=docs) == "R body" == \
        ref.apply_chat_template(messages, tokenize=False, chat_template="rag", documents=docs)


def test_default_template_is_chatml_for_tokenizers_without_one(tmp_path: Path):
    path = write_tokenizer_dir(tmp_path / "t", config={"eos_token": "<|im_end|>"})
    tok = load_tokenizer(path)
    messages = CHATS["system and user"]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\n" + SYSTEM["content"] + "<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    # transformers renders the same default when it is given as the template
    ref = hf_tokenizer(path)
    assert ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                   chat_template=DEFAULT_CHAT_TEMPLATE) == text
    assert tok.apply_chat_template(messages) == tok.encode(tok.apply_chat_template(messages, tokenize=False))
    assert ByteTokenizer().apply_chat_template(messages, tokenize=False) == \
        tok.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------------------- bad input


def test_raise_exception_names_the_config_file(styles: dict[str, Path]):
    tok = load_tokenizer(styles["mistral"])
    out_of_order = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TokenizerError) as info:
        tok.apply_chat_template(out_of_order)
    msg = str(info.value)
    assert str(styles["mistral"] / "tokenizer_config.json") + " (chat_template)" in msg
    assert "Conversation roles must alternate" in msg and ", line 11:" in msg  # the raise_exception line


def test_syntax_error_names_the_jinja_file_and_line(tmp_path: Path):
    broken = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"  # line 2: "}" instead of "}}"
    path = write_tokenizer_dir(tmp_path / "t", config={"eos_token": "</s>"}, files={"chat_template.jinja": broken})
    tok = load_tokenizer(path)  # templates compile on first use: loading for data needs no jinja2
    with pytest.raises(TokenizerError, match=rf"{path / 'chat_template.jinja'}, line 2: chat template syntax error"):
        tok.apply_chat_template(CHATS["one user turn"])


def test_undefined_variable_names_the_file(tmp_path: Path):
    path = write_tokenizer_dir(tmp_path / "t", config={"eos_token": "</s>"},
                               files={"chat_template.jinja": "{{ messages[0]['content'].nope.deeper }}"})
    with pytest.raises(TokenizerError, match=rf"{path / 'chat_template.jinja'}.*raised an error"):
        load_tokenizer(path).apply_chat_template(CHATS["one user turn"])


def test_bad_chat_template_value_in_the_config(tmp_path: Path):
    path = write_tokenizer_dir(tmp_path / "t", config={"eos_token": "</s>", "chat_template": {"default": "x"}})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: chat_template must be a string or a list"):
        load_tokenizer(path)


def test_several_templates_without_default(tmp_path: Path):
    path = write_tokenizer_dir(tmp_path / "t", config={"eos_token": "</s>", "chat_template": [
        {"name": "a", "template": "A"}, {"name": "b", "template": "B"}]})
    with pytest.raises(TokenizerError, match=r"several chat templates and no 'default' \(a, b\)"):
        load_tokenizer(path).apply_chat_template(CHATS["one user turn"])


@pytest.mark.parametrize("messages, error, match", [
    ([], ValueError, "messages is empty"),
    ("hello", TypeError, "messages must be a list"),
    ([("user", "hi")], TypeError, r"messages\[0\] must be a dict"),
])
def test_bad_messages(messages, error, match):
    with pytest.raises(error, match=match):
        ByteTokenizer().apply_chat_template(messages)


@pytest.mark.parametrize("kwarg", ["continue_final_message", "return_dict"])
def test_transformers_arguments_not_implemented_are_refused(kwarg: str):
    """Not silently passed to the template as variables."""
    with pytest.raises(TypeError, match=f"{kwarg} is a transformers argument parallax does not implement"):
        ByteTokenizer().apply_chat_template(CHATS["one user turn"], **{kwarg: True})


@pytest.mark.parametrize("template", ["{{ messages.__class__.__mro__[1].__subclasses__() }}",
                                      "{% set ns = namespace() %}{% set ns._x = 1 %}",
                                      "{{ messages.append(1) }}"])
def test_sandbox_blocks_python_internals(tmp_path: Path, template: str):
    path = write_tokenizer_dir(tmp_path / "t", config={"eos_token": "</s>", "chat_template": template})
    with pytest.raises(TokenizerError, match="raised an error"):
        load_tokenizer(path).apply_chat_template(CHATS["one user turn"])
