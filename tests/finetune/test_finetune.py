"""``parallax finetune``: LoRA, prefix tuning and full fine-tuning of a ``parallax train`` run on
SFT data through the train loop (packing, gradient accumulation, resume), its outputs (PEFT-format
adapter, merged checkpoint) read back by ``parallax eval`` / ``generate``, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallax.cli import main
from parallax.finetune.config import FinetuneConfig
from parallax.finetune.run import finetune
from parallax.train import TrainConfig, train
from parallax.train.checkpoints import latest_checkpoint, load_model
from parallax.train.config import ConfigError
from parallax.train.model_source import load_trained

DEMO = Path(__file__).parents[2] / "parallax" / "finetune" / "demo"
SMALL = dict(model={"n_layer": 2, "n_head": 2, "n_embd": 32}, block_size=64, batch_size=4, eval_batches=2,
             sample_tokens=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny `parallax train` run (byte tokenizer) to fine-tune."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(TrainConfig(**SMALL, steps=4, eval_interval=4, checkpoint_interval=4, out=str(out)), progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """60 demo rows (prompt/completion of varied lengths)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join((DEMO / "train.jsonl").read_text().splitlines(keepends=True)[:60]))
    return path


def _cfg(base: Path | None, data: Path, out: Path, **fields) -> FinetuneConfig:
    values = dict(base=str(base) if base else None, data=str(data), block_size=64, batch_size=4, steps=6, eval_interval=3,
                  eval_batches=2, checkpoint_interval=3, log_interval=1, lr=3e-3, out=str(out))
    return FinetuneConfig(**{**values, **fields})


def _losses(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_lora_finetune_writes_a_peft_adapter_that_eval_reads_back(base, data, tmp_path):
    result = finetune(_cfg(base, data, tmp_path / "run", lora="r=4,alpha=8,targets=all-linear", packing=True),
                      progress=False)
    adapter = tmp_path / "run" / "adapter"
    assert result.written == adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert Path(config["base_model_name_or_path"]) == latest_checkpoint(base / "checkpoints").resolve()
    # the run's checkpoint (with its adapter), the adapter alone, and the adapter on an explicit base agree
    x = torch.randint(0, 256, (2, 10))
    from_run = load_trained(str(tmp_path / "run"))[0]
    from_adapter = load_trained(adapter=str(adapter))[0]
    on_base = load_trained(str(base), adapter=str(adapter))[0]
    plain_base = load_model(latest_checkpoint(base / "checkpoints"))
    with torch.no_grad():
        assert torch.equal(from_run(x), from_adapter(x)) and torch.equal(from_adapter(x), on_base(x))
        assert not torch.allclose(from_run(x), plain_base(x))  # the adapter learnt something
    trainable = sum(p.numel() for n, p in from_run.named_parameters() if "lora_" in n)
    assert trainable < 0.2 * sum(p.numel() for p in from_run.parameters())


def test_lora_merged_output_equals_the_adapter(base, data, tmp_path):
    finetune(_cfg(base, data, tmp_path / "run", lora="r=4,alpha=8", save="merged"), progress=False)
    merged = load_trained(str(tmp_path / "run" / "merged"))[0]
    adapted = load_trained(str(tmp_path / "run"))[0]
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)


def test_prefix_finetune_and_generate_with_the_adapter(base, data, tmp_path, capsys):
    finetune(_cfg(base, data, tmp_path / "run", prefix="tokens=4"), progress=False)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    assert main(["generate", "--adapter", str(adapter), "--prompt", "Reverse: abc\nAnswer:", "--temperature", "0",
                 "--max-tokens", "4"]) == 0
    assert "Reverse: abc" in capsys.readouterr().out


def test_eval_reads_a_finetune_run_and_its_adapter_alike(base, data, tmp_path, capsys):
    finetune(_cfg(base, data, tmp_path / "run", lora="r=4,alpha=8"), progress=False)
    task = str(DEMO / "heldout.yaml")
    for source in (["--checkpoint", str(tmp_path / "run")], ["--adapter", str(tmp_path / "run" / "adapter")]):
        out = tmp_path / f"{len(source[1])}.json"
        assert main(["eval", *source, "--tasks", task, "--limit", "6", "--no-progress", "--output", str(out)]) == 0
    first, second = (json.loads(p.read_text())["results"] for p in sorted(tmp_path.glob("*.json")))
    assert first == second


def test_gradient_accumulation_and_resume_reproduce_one_uninterrupted_run(base, data, tmp_path):
    """Two micro-batches of 2 equal one batch of 4 (the loss is the mean over the window's trained
    tokens, however they are split), and a resumed run continues bit for bit."""
    common = dict(lora="r=4,alpha=8", packing=True)
    finetune(_cfg(base, data, tmp_path / "one", **common), progress=False)
    finetune(_cfg(base, data, tmp_path / "accum", batch_size=2, grad_accum=2, **common), progress=False)
    for (s1, l1, v1), (s2, l2, v2) in zip(_losses(tmp_path / "one"), _losses(tmp_path / "accum")):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5) and v1 == pytest.approx(v2, abs=1e-5)

    class Crash(Exception):
        pass

    def crash_at_5(step, record):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        finetune(_cfg(base, data, tmp_path / "split", **common), progress=False, on_step=crash_at_5)
    finetune(_cfg(base, data, tmp_path / "split", resume=True, **common), progress=False)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "one")


def test_full_finetune_writes_the_merged_model(base, data, tmp_path):
    result = finetune(_cfg(base, data, tmp_path / "run", full=True), progress=False)
    assert result.written == tmp_path / "run" / "merged"
    merged = load_trained(str(result.written))[0]
    final = load_model(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    for (name, p), q in zip(final.named_parameters(), merged.parameters()):
        assert torch.equal(p, q), name


def test_show_masks_prints_the_trained_tokens(base, data, capsys):
    assert main(["finetune", "--base", str(base), "--data", str(data), "--show-masks", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Answer:") == 2 and "[[" in printed and "]]" in printed


@pytest.mark.parametrize("fields, message", [
    ({"base_dir": None}, "--base CHECKPOINT"),
    ({"lora": "r=0"}, "r must be a positive integer"),
    ({"lora": "rank=4"}, "KEY=VALUE with KEY one of"),
    ({"lora": "r=4", "prefix": "tokens=2"}, "exclude each other"),
    ({"full": True, "save": "adapter"}, "save 'adapter' needs --lora or --prefix"),
    ({"prefix": "tokens=2", "save": "merged"}, "prefix tuning has no weights to merge"),
])
def test_bad_finetune_config_is_named(base, data, tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(fields.pop("base_dir", base), data, tmp_path / "run", **fields)


def test_bad_input_fails_before_anything_is_written(base, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cases = [(["--data", str(bad)], "bad.jsonl:1"), (["--data", str(chat)], "chat template"),
             (["--data", str(data), "--lora", "r=4,targets=no_such_module"], "no_such_module")]
    for flags, message in cases:
        out = tmp_path / "out"
        assert main(["finetune", "--base", str(base), *flags, "--out", str(out), "--steps", "2"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_two_rank_zero3_lora_finetune_equals_one_process(base, data, tmp_path):
    """`--nproc 2 --zero-stage 3` with packing, activation checkpointing and half the batch per rank
    trains the same adapter as one process (losses and adapter tensors element-wise)."""
    import os
    import subprocess
    import sys

    flags = ["finetune", "--base", str(base), "--data", str(data), "--lora", "r=4,alpha=8", "--packing",
             "--block-size", "64", "--steps", "4", "--eval-interval", "4", "--eval-batches", "1", "--log-interval", "1",
             "--checkpoint-interval", "4", "--lr", "3e-3"]
    one = finetune(_cfg(base, data, tmp_path / "one", lora="r=4,alpha=8", packing=True, steps=4, eval_interval=4,
                        eval_batches=1, checkpoint_interval=4), progress=False)
    two = subprocess.run([sys.executable, "-m", "parallax", *flags, "--batch-size", "2", "--nproc", "2",
                          "--zero-stage", "3", "--activation-checkpointing", "block", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=dict(os.environ))
    assert two.returncode == 0, two.stderr[-3000:]
    # one process took batch 4; two ranks take 2 each: the same units per step
    assert one.written is not None
    for (s1, l1, v1), (s2, l2, v2) in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5) and v1 == pytest.approx(v2, abs=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("runtime", [dict(precision="bf16", zero_stage=2),
                                     dict(precision="fp16", zero_stage=1, offload="cpu")])
def test_lora_finetune_composes_with_16_bit_precision_and_offload(base, data, tmp_path, runtime):
    """bf16 / fp16 (default loss scaling) with ZeRO and CPU offload train the same adapter as fp32,
    within 16-bit rounding (fp32 master weights; ZeRO-3's adapter-only state: test_lora_zero.py)."""
    from safetensors.torch import load_file

    common = dict(lora="r=4,alpha=8", packing=True)
    finetune(_cfg(base, data, tmp_path / "fp32", **common), progress=False)
    result = finetune(_cfg(base, data, tmp_path / "run", **common, **runtime), progress=False)
    for (s1, l1, _), (s2, l2, _) in zip(_losses(tmp_path / "fp32"), _losses(tmp_path / "run")):
        assert s1 == s2 and (l1 is None or l2 == pytest.approx(l1, rel=1e-2))
    ours, reference = load_file(result.written / "adapter_model.safetensors"), \
        load_file(tmp_path / "fp32" / "adapter" / "adapter_model.safetensors")
    for key, expected in reference.items():
        if "lora_B" in key:
            assert expected.abs().max() > 1e-4  # trained away from its zero init
        # Adam's normalised steps amplify 16-bit rounding in a few elements: compare the whole tensor
        assert (ours[key].float() - expected).norm() < 0.05 * expected.norm(), key


def test_the_planner_plans_the_adapted_model(base, data, tmp_path):
    """--plan sizes a LoRA run by its trained parameters: gradients and Adam state of the adapters."""
    import parallax as px

    cfg = _cfg(base, data, tmp_path / "run", lora="r=4,alpha=8")
    model_config = cfg.model_config()
    kwargs = dict(world_size=1, device_bytes="1GB", seq_len=64, micro_batch=4, stages=[0], precisions=["fp32"],
                  offloads=["none"], checkpointing=["none"], backend="gloo")
    adapted = px.plan(cfg.plan_model(model_config), **kwargs).find(0, "fp32")
    full = px.plan(model_config, **kwargs).find(0, "fp32")
    assert adapted.optimizer_bytes < full.optimizer_bytes / 5
    from parallax.train.planning import resolve_plan

    resolved = resolve_plan(FinetuneConfig(**{**cfg.to_dict(), "plan": "1GB"}))
    assert isinstance(resolved, FinetuneConfig) and resolved.plan == "off" and resolved.lora == cfg.lora
