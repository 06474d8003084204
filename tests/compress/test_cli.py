"""``parallax compress``: each method writes a directory that generate/eval/compress load, methods
stack, recovery runs, and bad flags fail with one message naming the flag and nothing written."""

import json

import pytest
import torch

from parallax import compress
from parallax.cli import main
from parallax.data import load_tokenizer
from parallax.data.tokenizer import tokenizer_reference
from parallax.models import from_preset
from parallax.train.checkpoints import save_model
from parallax.train.model_source import load_trained


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small GPT checkpoint (random weights) with the byte tokenizer."""
    torch.manual_seed(0)
    model = from_preset("tiny", n_layer=2, n_embd=64, n_head=2, block_size=64)
    path = tmp_path_factory.mktemp("base") / "step_000001"
    save_model(path, model, step=1, model_config=model.config, tokenizer=tokenizer_reference(load_tokenizer("byte")))
    return path


def _logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("argv, kind", [
    (["quantize", "--bits", "8"], "QuantLinear"),
    (["quantize", "--bits", "4", "--group-size", "32", "--method", "gptq", "--samples", "8", "--seq-len", "32"],
     "QuantLinear"),
    (["prune", "--method", "wanda", "--sparsity", "0.5", "--samples", "4", "--seq-len", "32"], None),
    (["low-rank", "--rank", "8"], "LowRankLinear"),  # random weights: no energy threshold would save parameters
])
def test_each_method_writes_a_loadable_directory(tmp_path, base, argv, kind):
    out = tmp_path / "out"
    assert main(["compress", *argv, "--checkpoint", str(base), "--out", str(out)]) == 0
    model, tok, source = load_trained(str(out))
    original, _, _ = load_trained(str(base))
    x = torch.randint(0, 257, (2, 16))
    assert torch.isfinite(_logits(model, x)).all()
    assert not torch.equal(_logits(model, x), _logits(original, x))  # something was compressed
    manifest = compress.read_manifest(out)
    assert manifest["steps"][-1]["method"] == argv[0].replace("-", "_")
    if kind is not None:
        assert {spec["kind"] for spec in manifest["modules"].values()} == {kind}
    assert tok.vocab_size == 257 and source.startswith("compressed:")


def test_generate_and_eval_read_the_output_and_methods_stack(tmp_path, base, capsys):
    pruned, quantized = tmp_path / "pruned", tmp_path / "q"
    assert main(["compress", "prune", "--method", "structured", "--sparsity", "0.25", "--samples", "4", "--seq-len",
                 "32", "--recover-steps", "2", "--recover-batch-size", "2", "--checkpoint", str(base),
                 "--out", str(pruned)]) == 0
    assert main(["compress", "quantize", "--bits", "8", "--checkpoint", str(pruned), "--out", str(quantized)]) == 0
    steps = [s["method"] for s in compress.read_manifest(quantized)["steps"]]
    assert steps == ["prune", "recover", "quantize"]
    assert main(["generate", "--checkpoint", str(quantized), "--prompt", "The ", "--max-tokens", "4"]) == 0
    results = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(quantized), "--tasks", "pydoc_perplexity", "--limit", "2",
                 "--no-progress", "--output", str(results)]) == 0
    assert json.loads(results.read_text())["results"]["pydoc_perplexity"]["byte_perplexity"] > 1


@pytest.mark.parametrize("argv, message", [
    (["prune", "--sparsity", "1.5"], "sparsity"),
    (["quantize", "--bits", "4", "--group-size", "48"], "group_size"),
    (["low-rank", "--rank", "100000"], "rank"),
    (["quantize", "--method", "gptq", "--samples", "100000"], "calib"),
    (["quantize", "--recover-steps", "3"], "--recover-lora"),
])
def test_bad_flags_name_the_problem_and_write_nothing(tmp_path, base, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["compress", *argv, "--checkpoint", str(base), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err, err
    assert not out.exists()


def test_a_hugging_face_directory_compresses_and_serves(tmp_path):
    """--hf DIR (Qwen2: GQA, q/k/v biases, tied head): int8, and structured pruning of MLP channels
    and key/value head groups; each loads and generates, the int8 one close to transformers' model."""
    from tests.models.hf_models import hf_model

    hf = hf_model("qwen2", vocab_size=257)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        reference = hf(x).logits
    common = ["--tokenizer", "byte", "--samples", "8", "--seq-len", "32"]
    assert main(["compress", "quantize", "--hf", str(tmp_path / "hf"), "--bits", "8", *common,
                 "--out", str(tmp_path / "q8")]) == 0
    assert main(["compress", "prune", "--hf", str(tmp_path / "hf"), "--method", "structured", "--sparsity", "0.5",
                 "--targets", "mlp,heads", *common, "--out", str(tmp_path / "p")]) == 0
    quantized, _, _ = load_trained(str(tmp_path / "q8"))
    error = (_logits(quantized, x) - reference).abs().max() / reference.abs().max()
    assert error < 0.02, error  # 8-bit weights: close, not equal
    pruned, _, _ = load_trained(str(tmp_path / "p"))
    assert (pruned.config.n_kv_head, pruned.config.n_head) == (1, 2)  # half the KV groups, GQA ratio kept
    assert pruned.config.intermediate_size < hf.config.intermediate_size
    for out in ("q8", "p"):
        assert main(["generate", "--checkpoint", str(tmp_path / out), "--prompt", "ab", "--max-tokens", "3"]) == 0
