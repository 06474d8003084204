"""``python -m bench compress --quick`` on a small checkpoint: the rows it measures hang together
(sizes follow the storage, pruning leaves zeros, structured pruning fewer parameters) and the
goals are judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from parallax.data import load_tokenizer
from parallax.data.tokenizer import tokenizer_reference
from parallax.models import from_preset
from parallax.train.checkpoints import save_model

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["fp16 cast", "bf16 cast", "bf16 + int8 RTN", "bf16 + int4 g128 RTN", "bf16 + int4 g128 GPTQ",
           "wanda 50%", "structured mlp 25% + recovery"]


def test_compress_quick_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = from_preset("tiny", n_layer=2, block_size=64)
    base = tmp_path / "base"
    save_model(base, model, step=1, model_config=model.config, tokenizer=tokenizer_reference(load_tokenizer("byte")))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "compress", "--quick", "--json", "--results-dir", str(tmp_path / "r"),
         "--checkpoint", str(base), "--samples", "16", "--methods", ",".join(METHODS)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.strip())}
    assert list(rows) == ["original (fp32)", *METHODS]
    original = rows["original (fp32)"]
    assert abs(rows["bf16 cast"]["size_mb"] / original["size_mb"] - 0.5) < 0.01
    assert rows["bf16 + int4 g128 RTN"]["size_mb"] < rows["bf16 + int8 RTN"]["size_mb"] < rows["bf16 cast"]["size_mb"]
    assert abs(rows["wanda 50%"]["nonzero"] - 0.5) < 0.1
    assert rows["structured mlp 25% + recovery"]["params"] < original["params"]
    assert rows["structured mlp 25% + recovery"]["recover_steps"] > 0  # the recovery report is in the row
    for row in rows.values():
        assert row["ppl"] > 1 and row["tok_s_b1"] > 0 and row["tok_s_b16"] > 0
    goals = rows["structured mlp 25% + recovery"]["notes"]["goals"]
    assert any(key.startswith("int8 weight-only perplexity") for key in goals)
    assert any(key.startswith("int4 g128 GPTQ") for key in goals)


def test_goals_are_judged_in_the_right_direction():
    """Each goal says met exactly when its figure is on the right side of the issue's threshold."""
    from types import SimpleNamespace

    from bench import compress as bench_compress

    def goals(rows):
        ctx = SimpleNamespace(notes={}, device=torch.device("cpu"))
        ctx.note = lambda key, value: ctx.notes.__setitem__(key, value)
        bench_compress._notes(ctx, {r["method"]: r for r in rows}, 8, 4, 4, 8, 1)
        return {key: value.endswith(", met") for key, value in ctx.notes["goals"].items()}

    def row(method, ppl, size_mb=1.0, **extra):
        return {"method": method, "ppl": ppl, "size_mb": size_mb, "ppl_change": 0.0, **extra}

    good = goals([row("bf16 cast", 4.0, 2.0), row("bf16 + int8 RTN", 4.01, 1.0),
                  row("bf16 + int4 g128 RTN", 4.2), row("bf16 + int4 g128 GPTQ", 4.09),
                  row("structured mlp 25% + recovery", 4.1, ppl_change=4.9, speed_b1=1.2, speed_b16=1.0),
                  row("student (no teacher)", 6.0), row("student distilled (KD)", 5.0)])
    assert all(good.values()) and len(good) == 6, good
    bad = goals([row("bf16 cast", 4.0, 2.0), row("bf16 + int8 RTN", 4.03, 1.2),
                 row("bf16 + int4 g128 RTN", 4.2), row("bf16 + int4 g128 GPTQ", 4.11),
                 row("structured mlp 25% + recovery", 4.1, ppl_change=5.1, speed_b1=1.1, speed_b16=1.1),
                 row("student (no teacher)", 5.0), row("student distilled (KD)", 6.0)])
    assert not any(bad.values()), bad
