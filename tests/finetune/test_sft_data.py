"""SFT data: prompt/completion and chat rows, loss masks, truncation, validation splits, bad rows,
and the --show-masks rendering."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from parallax.data import load_tokenizer
from parallax.finetune import (IGNORE_INDEX, SFTDataError, SFTExample, format_masks, load_sft_data,
                               load_sft_examples, render_row)
from tests.data.tokenizer_dirs import write_style


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _trained_text(example: SFTExample, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(example.tokens, example.trained) if m])


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """A BPE tokenizer directory with Qwen2's ChatML template (a default system turn)."""
    return load_tokenizer(write_style(tmp_path_factory.mktemp("qwen2"), "qwen2"))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return load_tokenizer(write_style(tmp_path_factory.mktemp("llama3"), "llama3"))


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Hello again."}]


def test_completion_mask_trains_completion_and_eos_only(tmp_path):
    tok = load_tokenizer("byte")
    path = _write(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    (example,) = load_sft_examples(path, tok, max_length=64)
    assert list(example.tokens) == [*b"2+2=", *b"4", tok.eot_id]
    assert list(example.trained) == [False] * 4 + [True, True]
    inputs, targets = example.inputs_and_targets()
    assert inputs.tolist() == [*b"2+2=", *b"4"]
    assert targets.tolist() == [IGNORE_INDEX] * 3 + [ord("4"), tok.eot_id]


def test_all_mask_trains_every_token_but_the_first(tmp_path):
    tok = load_tokenizer("byte")
    path = _write(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "c"}])
    (example,) = load_sft_examples(path, tok, max_length=64, loss="all")
    assert example.inputs_and_targets()[1].tolist() == [ord("b"), ord("c"), tok.eot_id]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_assistant_mask_covers_exactly_the_assistant_turns(style, request):
    tok = request.getfixturevalue(style)
    example = render_row({"messages": CHAT}, tok, None, "x:1")
    assert list(example.tokens) == tok.apply_chat_template(CHAT)
    end_of_turn = "<|im_end|>" if style == "chatml" else "<|eot_id|>"
    trained = _trained_text(example, tok)
    assert trained.startswith("Hi there." + end_of_turn)
    assert "Hello again." + end_of_turn in trained
    for prompt_text in ("Be brief.", "Say hi.", "Again?", "assistant", "user"):
        assert prompt_text not in trained
    # Two contiguous trained spans, one per assistant turn.
    flips = sum(a != b for a, b in zip(example.trained, example.trained[1:]))
    assert flips in (3, 4)


def test_assistant_mask_refuses_a_template_that_rewrites_earlier_turns(chatml):
    # Marks the last message specially, so a prefix renders differently inside the whole chat.
    template = ("{% for m in messages %}{{ m['role'] }}{% if loop.last %}!{% endif %}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(SFTDataError, match=r"x:7: the chat template renders the first \d messages differently"):
        render_row({"messages": CHAT[1:3]}, chatml, "assistant", "x:7", chat_template=template)


def test_chat_rows_without_a_chat_template_are_refused(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(SFTDataError, match=r"chat\.jsonl:1: chat rows need a chat template"):
        load_sft_examples(path, load_tokenizer("byte"), max_length=64)


@pytest.mark.parametrize("row, field", [({"prompt": "a"}, "'completion'"), ({"completion": "a"}, "'prompt'"),
                                        ({"body": "a"}, "'prompt'"),
                                        ({"messages": [{"role": "user"}]}, r"messages\[0\] has no 'content'")])
def test_a_row_missing_its_fields_names_file_line_and_field(tmp_path, chatml, row, field):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, "", row])
    with pytest.raises(SFTDataError, match=rf"bad\.jsonl:3: .*{field}"):
        load_sft_examples(path, chatml, max_length=64)


def test_invalid_json_and_mismatched_loss_modes_are_refused(tmp_path, chatml):
    with pytest.raises(SFTDataError, match=r"j\.jsonl:1: not valid JSON"):
        load_sft_examples(_write(tmp_path / "j.jsonl", ["{oops"]), chatml, max_length=64)
    with pytest.raises(SFTDataError, match=r"c\.jsonl:1: loss='completion' needs prompt/completion rows"):
        load_sft_examples(_write(tmp_path / "c.jsonl", [{"messages": CHAT}]), chatml, max_length=64, loss="completion")
    with pytest.raises(SFTDataError, match=r"p\.jsonl:1: loss='assistant' needs chat rows"):
        load_sft_examples(_write(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}]), chatml, max_length=64,
                          loss="assistant")
    with pytest.raises(ValueError, match="loss must be one of"):
        load_sft_examples(tmp_path / "p.jsonl", chatml, max_length=64, loss="prompt")


def test_truncation_is_counted_and_empty_examples_dropped(tmp_path, caplog):
    tok = load_tokenizer("byte")
    rows = [{"prompt": "abc", "completion": "defgh"}, {"prompt": "a" * 20, "completion": "b"}, {"prompt": "x", "completion": "y"}]
    with caplog.at_level(logging.WARNING, logger="parallax.finetune.data"):
        examples = load_sft_examples(_write(tmp_path / "d.jsonl", rows), tok, max_length=6)
    assert [len(e) for e in examples] == [6, 2]  # the second lost its completion entirely
    assert list(examples[0].tokens) == list(b"abcdefg")
    assert "2 of 3 examples" in caplog.text and "1 examples" in caplog.text


def test_directory_of_jsonl_files_and_validation_splits(tmp_path):
    tok = load_tokenizer("byte")
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "a.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)])
    _write(data / "b.jsonl", [{"prompt": f"r{i}", "completion": f"b{i}"} for i in range(4)])
    (data / "notes.txt").write_text("not data")
    splits = load_sft_data(data, tok, max_length=32, val_fraction=0.3, seed=5)
    assert (len(splits.train), len(splits.val)) == (7, 3)
    assert {e.source for e in splits.train}.isdisjoint(e.source for e in splits.val)
    again = load_sft_data(data, tok, max_length=32, val_fraction=0.3, seed=5)
    assert [e.source for e in again.val] == [e.source for e in splits.val]
    assert [e.source for e in load_sft_data(data, tok, max_length=32, val_fraction=0.3, seed=6).val] != \
        [e.source for e in splits.val]
    val_file = _write(tmp_path / "val.jsonl", [{"prompt": "v", "completion": "w"}])
    explicit = load_sft_data(data, tok, max_length=32, val_path=val_file)
    assert (len(explicit.train), [e.source for e in explicit.val]) == (10, [f"{val_file}:1"])


def test_format_masks_marks_trained_tokens(tmp_path, chatml):
    tok = load_tokenizer("byte")
    examples = load_sft_examples(_write(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 3), tok,
                                 max_length=32)
    plain = format_masks(examples, tok, 2, color=False)
    assert plain.count("--- example") == 2
    assert "2+2=[[4<eos>]]" in plain
    coloured = format_masks(examples, tok, 1, color=True)
    assert "2+2=\x1b[1;32m4<eos>\x1b[0m" in coloured
    chat = format_masks([render_row({"messages": CHAT}, chatml, None, "x:1")], chatml, 1, color=False)
    assert "[[Hi there.<|im_end|>\n]]" in chat
