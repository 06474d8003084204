"""``python -m bench finetune --quick``: every provider measured on the same objective, and the
figures hang together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import records

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("datasets")


def test_finetune_quick_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "finetune", "--quick", "--json", "--threads", "1", "--steps", "2",
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "finetune.jsonl")) == len(rows)
    by_name = {r["provider"]: r for r in rows}
    assert set(by_name) == {"parallax packed", "TRL packed", "parallax padded", "TRL padded", "TRL padding-free"}
    assert len({r["trainable"] for r in rows}) == 1  # the same LoRA layers everywhere
    for r in rows:
        assert r["steps"] == 2 and r["median_ms"] > 0 and r["peak_mb"] is not None
        assert 0 < r["trained_tokens_per_s"] < r["tokens_per_s"]  # prompts are processed, not trained
        # B starts at zero: every provider's first loss is the base model's completion-only loss
        assert abs(r["loss0_err"]) < 1e-4, (r["provider"], r["loss0_err"])
    for name in ("parallax packed", "TRL packed", "TRL padding-free"):
        assert by_name[name]["padding_share"] == 0.0
    ours, theirs = by_name["parallax padded"], by_name["TRL padded"]
    assert ours["padding_share"] > 0.0
    # the same batches from the same initial adapter: the same losses, trained tokens and padding (TRL
    # feeds each example's last token too, which parallax does not, hence the tolerance)
    assert ours["trained_share"] == pytest.approx(theirs["trained_share"], abs=0.02)
    assert ours["loss0"] == pytest.approx(theirs["loss0"], abs=1e-5)
    assert ours["final_loss"] == pytest.approx(theirs["final_loss"], abs=1e-4)
    assert ours["padding_share"] == pytest.approx(theirs["padding_share"], abs=0.02)
    assert "parallax packed padding share < 2%" in rows[-1]["notes"]["goals"]
    assert "Unsloth" in rows[-1]["notes"]["skipped"]
