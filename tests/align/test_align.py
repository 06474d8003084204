"""``parallax align``: DPO-family preference tuning of a ``parallax train`` run through the train
loop: LoRA (reference = adapters disabled) and full fine-tuning (reference precomputed once, kept
for resume), TRL's logged statistics, outputs, ZeRO-3 on two ranks against one process, 16-bit
and offload, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallax.align.config import REFERENCE_FILE, AlignConfig
from parallax.cli import main
from parallax.finetune.run import finetune
from parallax.train import TrainConfig, train
from parallax.train.model_source import load_trained

DEMO = Path(__file__).parents[2] / "parallax" / "finetune" / "demo"
SMALL = dict(model={"n_layer": 2, "n_head": 2, "n_embd": 32}, block_size=64, batch_size=4, eval_batches=2,
             sample_tokens=0)
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny `parallax train` run (byte tokenizer) to align."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(TrainConfig(**SMALL, steps=4, eval_interval=4, checkpoint_interval=4, out=str(out)), progress=False)
    return out


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    """About 40 short demo prompts: chosen the right completion, rejected another row's."""
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()[:60]]
    rows = [r for r in rows if r["skill"] != "passage_qa"]
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]})
                            + "\n" for a, b in zip(rows, rows[1:]) if a["completion"] != b["completion"]))
    return path


@pytest.fixture(scope="module")
def few(prefs, tmp_path_factory) -> Path:
    """8 pairs: a batch of 8 sees them all each step, so the loss falls step by step."""
    path = tmp_path_factory.mktemp("few") / "prefs.jsonl"
    path.write_text("".join(prefs.read_text().splitlines(keepends=True)[:8]))
    return path


LEARN = dict(batch_size=8, val_fraction=0.0, warmup_steps=1, lr=2e-2)


def _cfg(base: Path, data: Path, out: Path, **fields) -> AlignConfig:
    values = dict(base=str(base), data=str(data), block_size=64, batch_size=4, steps=4, eval_interval=2,
                  eval_batches=1, checkpoint_interval=2, log_interval=1, lr=1e-2, out=str(out))
    return AlignConfig(**{**values, **fields})


@pytest.fixture(scope="module")
def fp32_run(base, prefs, tmp_path_factory) -> Path:
    """A LoRA DPO run in fp32 with padded batches: what packing and 16-bit runs are compared with."""
    out = tmp_path_factory.mktemp("fp32") / "run"
    finetune(_cfg(base, prefs, out, lora="r=4,alpha=8"), progress=False)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def _losses(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _records(out)]


def test_lora_dpo_logs_trl_statistics_and_writes_the_adapter(base, few, tmp_path):
    result = finetune(_cfg(base, few, tmp_path / "run", lora="r=4,alpha=8", steps=6, **LEARN), progress=False)
    records = _records(tmp_path / "run")
    assert records[0]["step"] == 0 and records[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    first = records[1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is the reference
    assert all(name in first and f"val_{name}" in records[-1] for name in STATS)
    assert first["rewards/chosen"] == 0 and first["rewards/margins"] == 0
    last = records[-1]
    assert last["loss"] < math.log(2) and last["rewards/margins"] > 0  # the preference is being learnt
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-6)
    assert result.written == tmp_path / "run" / "adapter"
    adapted = load_trained(str(tmp_path / "run"))[0]
    assert any("lora_" in name for name, _ in adapted.named_parameters())


@pytest.mark.parametrize("method", ["ipo", "hinge", "simpo", "orpo"])
def test_every_method_trains(base, few, tmp_path, method):
    finetune(_cfg(base, few, tmp_path / "run", lora="r=4,alpha=8", method=method, beta=0.5, steps=4, **LEARN),
             progress=False)
    records = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) and "rewards/accuracies" in r for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_full_dpo_precomputes_the_reference_and_resume_reuses_it(base, prefs, tmp_path):
    """Full fine-tuning: the reference is the initial model's log-probabilities, computed once; a
    run interrupted at step 2 and resumed (the model then is no longer the initial one) reproduces
    the uninterrupted run, with grad_accum splitting each step."""
    whole = tmp_path / "whole"
    finetune(_cfg(base, prefs, whole, full=True, grad_accum=2, batch_size=2), progress=False)
    assert _records(whole)[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    saved = torch.load(whole / REFERENCE_FILE, weights_only=True)
    assert saved["train"].shape[1] == 2 and (saved["train"] < 0).all()
    part = tmp_path / "part"
    finetune(_cfg(base, prefs, part, full=True, grad_accum=2, batch_size=2, steps=2), progress=False)
    finetune(_cfg(base, prefs, part, full=True, grad_accum=2, batch_size=2, resume=True), progress=False)
    for (s1, l1, v1), (s2, l2, v2) in zip(_losses(whole), _losses(part)):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-6) and v1 == pytest.approx(v2, abs=1e-6)
    (part / REFERENCE_FILE).unlink()
    with pytest.raises(Exception, match=REFERENCE_FILE):
        finetune(_cfg(base, prefs, part, full=True, steps=6, resume=True), progress=False)


def test_packing_trains_like_padding(base, prefs, fp32_run, tmp_path):
    finetune(_cfg(base, prefs, tmp_path / "packed", lora="r=4,alpha=8", packing=True), progress=False)
    for (s1, l1, v1), (s2, l2, v2) in zip(_losses(fp32_run), _losses(tmp_path / "packed")):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5) and v1 == pytest.approx(v2, abs=1e-5)


@pytest.mark.parametrize("tuning", [["--lora", "r=4,alpha=8"], ["--full"]])
def test_two_rank_zero3_dpo_equals_one_process(base, prefs, tmp_path, tuning):
    """`--nproc 2 --zero-stage 3` with packing and activation checkpointing, half the pairs per
    rank, gives one process's losses and statistics (the reference: disabled adapters under ZeRO-3
    gathers, or the precomputed pass on both ranks)."""
    flags = ["align", "--base", str(base), "--data", str(prefs), *tuning, "--packing", "--block-size", "64",
             "--steps", "3", "--eval-interval", "3", "--eval-batches", "1", "--log-interval", "1",
             "--checkpoint-interval", "3", "--lr", "1e-2"]
    assert main([*flags, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    two = subprocess.run([sys.executable, "-m", "parallax", *flags, "--batch-size", "2", "--nproc", "2",
                          "--zero-stage", "3", "--activation-checkpointing", "block", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=dict(os.environ))
    assert two.returncode == 0, two.stderr[-3000:]
    one_records, two_records = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(one_records) == len(two_records) == 4
    for a, b in zip(one_records, two_records):
        assert a.keys() - {"tokens_per_s"} == b.keys() - {"tokens_per_s"}
        for key in a.keys() - {"tokens_per_s", "step", "lr"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.parametrize("runtime", [dict(precision="bf16", zero_stage=2),
                                     dict(precision="fp16", zero_stage=1, offload="cpu")])
def test_lora_dpo_composes_with_16_bit_precision_and_offload(base, prefs, fp32_run, tmp_path, runtime):
    finetune(_cfg(base, prefs, tmp_path / "run", lora="r=4,alpha=8", **runtime), progress=False)
    for a, b in zip(_records(fp32_run), _records(tmp_path / "run")):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=2e-2, abs=2e-3)
            assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=0.1, abs=2e-3)


def test_show_masks_prints_chosen_and_rejected(base, prefs, capsys):
    assert main(["align", "--base", str(base), "--data", str(prefs), "--show-masks", "1"]) == 0
    text = capsys.readouterr().out
    row = json.loads(prefs.read_text().splitlines()[0])
    assert f"[[{row['chosen']}<eos>]]" in text and f"[[{row['rejected']}<eos>]]" in text


@pytest.mark.parametrize("flags,message", [
    (["--beta", "0"], "beta must be a positive finite number"),
    (["--beta", "-0.5"], "beta"),
    (["--prefix", "tokens=4"], "needs a reference model"),
    (["--loss", "all"], "loss 'all'"),
    (["--canaries", "2"], "canaries: parallax align trains on preference pairs"),
    (["--method", "ipo", "--label-smoothing", "0.2"], "label_smoothing"),
])
def test_bad_align_config_is_named(base, prefs, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["align", "--base", str(base), "--data", str(prefs), *flags, "--out", str(out), "--steps", "2"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_row_fails_before_anything_is_written(base, prefs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(prefs.read_text() + json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}) + "\n")
    out = tmp_path / "out"
    assert main(["align", "--base", str(base), "--data", str(bad), "--lora", "r=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:{len(bad.read_text().splitlines())}" in err and "'chosen' equals 'rejected'" in err
    assert not out.exists()


def test_safety_pairs_are_mixed_into_the_training_pairs_at_the_ratio(base, prefs, tmp_path):
    safety = tmp_path / "safety.jsonl"
    safety.write_text("".join(json.dumps({"category": "weapons", "prompt": f"make bomb {i}", "chosen": "No.",
                                          "rejected": "Sure."}) + "\n" for i in range(5)))
    cfg = _cfg(base, prefs, tmp_path / "run", lora="r=2", safety_data=str(safety), safety_ratio=0.2, val_fraction=0.1)
    tokenizer = cfg.load_tokenizer()
    plain = _cfg(base, prefs, tmp_path / "run", lora="r=2", val_fraction=0.1).load_data(tokenizer, cfg.model_config())
    ds = cfg.load_data(tokenizer, cfg.model_config())
    n_task = len(plain.splits.train)
    added = [p for p in ds.splits.train if "safety.jsonl" in p.source]
    assert len(ds.splits.train) == n_task + len(added) and len(added) == round(0.2 / 0.8 * n_task)
    assert ds.splits.val == plain.splits.val  # validation untouched
    text = bytes(t for t in added[0].chosen.tokens if t < 256).decode()
    assert text.startswith("Request: make bomb") and text.endswith("\nAnswer: No.")


def test_lora_dpo_on_a_hugging_face_llama_with_chat_rows(tmp_path):
    """--hf DIR (a transformers Llama and its tokenizer with a Llama 3 chat template) and TRL's
    conversational rows: the first step's loss is log 2 (LoRA B = 0) and a PEFT adapter is written."""
    from tests.eval.tiny_llama import write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "llama", positions=128)
    rows = [{"prompt": [{"role": "user", "content": f"colour {i}?"}],
             "chosen": [{"role": "assistant", "content": "red"}],
             "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(8)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = AlignConfig(hf=str(model_dir), data=str(data), lora="r=4,alpha=8", steps=2, batch_size=4, eval_interval=2,
                      eval_batches=1, checkpoint_interval=2, log_interval=1, val_fraction=0.0, sample_tokens=0,
                      out=str(tmp_path / "run"))
    result = finetune(cfg, progress=False)
    first = _records(tmp_path / "run")[1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["logps/chosen"] < 0
    assert (result.written / "adapter_model.safetensors").is_file()
