"""LoRA under ZeRO-3 on 2 gloo ranks: the adapters train exactly as in one process, the frozen
base stays as it was, only the adapters have optimizer state, save_adapter writes the full
adapter and merging sharded weights is refused."""

from safetensors.torch import load_file

from tests.distributed.launch import run_ranks
from tests.helpers import assert_close
from tests.peft import lora_zero_workers as workers

STEPS = 3


def test_lora_trains_under_zero3_like_one_process(tmp_path):
    reference = workers.reference_run(STEPS)
    initial = workers.lora_llama().state_dict()
    results = run_ranks(workers.zero3_run, 2, STEPS, str(tmp_path / "adapter"))
    adapter_numel = sum(t.numel() for k, t in reference.items() if "lora_" in k)
    for rank, result in enumerate(results):
        for key, expected in reference.items():
            assert_close(result["state"][key], expected, atol=1e-6, name=f"rank {rank} {key}")
            if "lora_" not in key:
                assert result["state"][key].equal(initial[key]), key
        # AdamW's two moments in float32 for this rank's shard of the adapters (plus padding).
        assert "sharded by ZeRO-3" in result["merge_error"]
        assert 0 < result["report"]["optimizer_bytes"] <= 2 * 4 * (adapter_numel // 2 + 64)
    assert sum(r["report"]["optimizer_bytes"] for r in results) >= 2 * 4 * adapter_numel
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == sum("lora_" in k for k in reference)
    for key, tensor in saved.items():
        name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert_close(tensor, reference[name], atol=1e-6, name=key)
