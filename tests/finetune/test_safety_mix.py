"""Safety data mixed into fine-tuning (``--safety-data FILE --safety-ratio R``): the shipped set,
its rendering in the task data's style (prompt/completion or chat, SFT or preference rows), the
mix's exact ratio and seed, bad input, and a tiny ``finetune`` run with it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from parallax.cli import main
from parallax.data.chat import DEFAULT_CHAT_TEMPLATE
from parallax.data.tokenizer import ByteTokenizer
from parallax.finetune.config import FinetuneConfig
from parallax.finetune.data import SFTDataError, render_row
from parallax.finetune.run import finetune
from parallax.finetune.safety import (BUILTIN, PREFERENCE_DATA, SFT_DATA, data_style, mix_rows, safety_count,
                                      safety_rows)
from parallax.train import TrainConfig, train
from parallax.train.config import ConfigError

DEMO = Path(__file__).parents[2] / "parallax" / "finetune" / "demo"
SMALL = dict(model={"n_layer": 1, "n_head": 2, "n_embd": 16}, block_size=128, batch_size=4, eval_batches=1,
             sample_tokens=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny `parallax train` run (byte tokenizer, 128 positions: the safety rows fit) to fine-tune."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(TrainConfig(**SMALL, steps=2, eval_interval=2, checkpoint_interval=2, out=str(out)), progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join((DEMO / "train.jsonl").read_text().splitlines(keepends=True)[:40]))
    return path


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("n_task, ratio", [(90, 0.0), (90, 0.1), (90, 0.25), (40, 0.5), (10, 0.9), (7, 0.3)])
def test_the_mix_has_the_ratio_and_uses_each_safety_row_before_repeating(n_task, ratio):
    task = [("task", i) for i in range(n_task)]
    safety = [("safety", i) for i in range(7)]
    mixed = mix_rows(task, safety, ratio, seed=3)
    drawn = [row for row in mixed if row[0] == "safety"]
    assert len(drawn) == safety_count(n_task, ratio) == round(ratio / (1 - ratio) * n_task)
    assert len(drawn) / len(mixed) == pytest.approx(ratio, abs=0.5 / len(mixed))
    assert sorted(row for row in mixed if row[0] == "task") == task  # every task row once
    uses = Counter(drawn)
    assert max(uses[row] for row in safety) - min(uses[row] for row in safety) <= 1


def test_the_mix_is_a_function_of_the_seed():
    task, safety = list(range(100)), list(range(1000, 1010))
    assert mix_rows(task, safety, 0.2, seed=0) == mix_rows(task, safety, 0.2, seed=0)
    assert mix_rows(task, safety, 0.2, seed=0) != mix_rows(task, safety, 0.2, seed=1)


def test_shipped_rows_render_as_the_demo_prompts():
    rows = safety_rows(BUILTIN, "completion")
    first = json.loads(SFT_DATA.read_text().splitlines()[0])
    assert rows[0] == {"prompt": f"Request: {first['prompt']}\nAnswer:", "completion": " " + first["completion"],
                       "source": f"{SFT_DATA}:1"}
    assert len(rows) == 1500
    tokenizer = ByteTokenizer()
    example = render_row(rows[0], tokenizer, None, rows[0]["source"])
    trained = bytes(t for t, keep in zip(example.tokens, example.trained) if keep and t < 256).decode()
    assert trained == " " + first["completion"]
    longest = max(len(render_row(row, tokenizer, None, row["source"])) for row in rows)
    assert longest <= 128  # the demo byte model's positions


def test_chat_rendering_trains_the_answer_as_the_assistant_turn(tmp_path):
    path = _write(tmp_path / "s.jsonl", [{"category": "malware", "prompt": "how do I kill a Python process",
                                          "completion": "Run kill PID."}])
    row = safety_rows(path, "chat")[0]
    assert row == {"messages": [{"role": "user", "content": "how do I kill a Python process"},
                                {"role": "assistant", "content": "Run kill PID."}], "source": f"{path}:1"}
    example = render_row(row, ByteTokenizer(), None, row["source"], chat_template=DEFAULT_CHAT_TEMPLATE)
    trained = bytes(t for t, keep in zip(example.tokens, example.trained) if keep and t < 256).decode()
    assert trained.startswith("Run kill PID.") and "kill a Python" not in trained


def test_preference_rows_render_in_both_styles():
    first = json.loads(PREFERENCE_DATA.read_text().splitlines()[0])
    assert safety_rows(BUILTIN, "completion", preferences=True) == safety_rows(PREFERENCE_DATA, "completion")
    flat = safety_rows(PREFERENCE_DATA, "completion")[0]
    assert flat == {"prompt": f"Request: {first['prompt']}\nAnswer:", "chosen": " " + first["chosen"],
                    "rejected": " " + first["rejected"], "source": f"{PREFERENCE_DATA}:1"}
    chat = safety_rows(PREFERENCE_DATA, "chat")[0]
    assert chat == {"prompt": [{"role": "user", "content": first["prompt"]}],
                    "chosen": [{"role": "assistant", "content": first["chosen"]}],
                    "rejected": [{"role": "assistant", "content": first["rejected"]}], "source": f"{PREFERENCE_DATA}:1"}


def test_data_style_reads_the_first_row(tmp_path, data):
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert data_style(data) == "completion" and data_style(chat) == "chat"


def test_bad_safety_rows_are_named(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(SFTDataError, match=r"bad.jsonl:2: the row needs a string 'completion'"):
        safety_rows(bad, "completion")
    half = _write(tmp_path / "half.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(SFTDataError, match=r"half.jsonl:1: the row needs a string 'rejected'"):
        safety_rows(half, "chat")
    with pytest.raises(SFTDataError, match="no_such.jsonl is not a file"):
        safety_rows(tmp_path / "no_such.jsonl", "completion")
    with pytest.raises(ValueError, match="style must be one of"):
        safety_rows(bad, "plain")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mix_rows([1], [2], 1.0, seed=0)


@pytest.mark.parametrize("fields, message", [
    ({"safety_data": BUILTIN, "safety_ratio": 1.0}, r"safety_ratio \(--safety-ratio\) must be a number in \[0, 1\)"),
    ({"safety_data": BUILTIN, "safety_ratio": -0.1}, r"--safety-ratio"),
    ({"safety_data": "no_such.jsonl"}, r"safety_data \(--safety-data\): no_such.jsonl is not a file"),
])
def test_bad_safety_config_is_named(base, data, tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(base=str(base), data=str(data), out=str(tmp_path / "run"), **fields)


def test_preference_rows_are_refused_by_finetune(base, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", "--base", str(base), "--data", str(data), "--safety-data", str(PREFERENCE_DATA),
                 "--out", str(out), "--steps", "1"]) == 2
    assert f"{PREFERENCE_DATA}:1: a preference row" in capsys.readouterr().err
    assert not out.exists()


def test_finetune_mixes_the_builtin_set_into_training_only(base, data, tmp_path):
    cfg = FinetuneConfig(base=str(base), data=str(data), safety_data=BUILTIN, safety_ratio=0.2, val_fraction=0.1,
                         full=True, batch_size=4, steps=2, eval_interval=2, eval_batches=1, checkpoint_interval=2,
                         log_interval=1, out=str(tmp_path / "run"))
    plain = FinetuneConfig(**{**cfg.to_dict(), "safety_data": None})
    tokenizer, model_config = cfg.load_tokenizer(), cfg.model_config()
    mixed, task = cfg.load_data(tokenizer, model_config).splits, plain.load_data(tokenizer, model_config).splits
    safety = [e for e in mixed.train if e.source.startswith(str(SFT_DATA))]
    assert len(task.train) == 36 and len(safety) == 9 == len(mixed.train) - len(task.train)  # 9 / 45 = 0.2
    assert mixed.val == task.val
    assert all(bytes(t for t in e.tokens if t < 256).startswith(b"Request: ") for e in safety)

    result = finetune(cfg, progress=False)
    assert result.train.steps == 2 and (tmp_path / "run" / "merged").is_dir()
