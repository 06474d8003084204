"""BERTScore through bert-score with a local encoder directory equals the definition (greedy
cosine matching of layer-L token embeddings, Zhang et al. 2020) computed here by hand, alone and
as a task metric through px.eval.evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import parallax as px
from parallax.data import load_tokenizer
from parallax.eval import metrics as M
from parallax.eval.lm import ParallaxLM
from parallax.eval.tasks import TaskError
from parallax.models import from_hf
from tests.eval.tiny_llama import write_tiny_llama

transformers = pytest.importorskip("transformers")  # installed by the test command
pytest.importorskip("bert_score")  # installed by the test command

WORDS = "the a cat dog sat on mat ran fast slow red blue house tree 1 2 3 4 5 6 7 8 9 0 plus is what ?".split()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A random-initialised 3-layer BERT with a WordPiece vocabulary of WORDS (no download)."""
    path = tmp_path_factory.mktemp("bertscore") / "bert"
    path.mkdir()
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _by_hand(encoder_dir: Path, prediction: str, references: list[str], layer: int) -> float:
    """F1 of the best reference: precision = mean over the prediction's tokens of the best cosine
    with a reference token, recall the converse ([CLS]/[SEP] match but carry no weight)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir)
    model = transformers.AutoModel.from_pretrained(encoder_dir).eval()

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            out = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        return F.normalize(out.hidden_states[layer][0], dim=-1)  # (tokens, hidden)

    best = -1.0
    for reference in references:
        sim = embed(prediction) @ embed(reference).T  # (prediction tokens, reference tokens)
        precision = sim[1:-1].max(dim=1).values.mean()
        recall = sim[:, 1:-1].max(dim=0).values.mean()
        best = max(best, float(2 * precision * recall / (precision + recall)))
    return best


def test_bertscore_equals_greedy_cosine_matching(encoder_dir):
    predictions = ["the cat sat on the mat", "a dog ran", "red house"]
    references = [["the cat sat on a mat"], ["the dog ran fast", "a slow dog"], "blue tree"]
    for layer in (1, 3):
        scores = M.bertscore(predictions, references, model=encoder_dir, num_layers=layer)
        expected = [_by_hand(encoder_dir, p, [r] if isinstance(r, str) else r, layer)
                    for p, r in zip(predictions, references)]
        assert scores["f1"] == pytest.approx(expected, abs=1e-5)
    # default: the last layer
    assert M.bertscore(predictions, references, model=encoder_dir)["f1"] == pytest.approx(
        M.bertscore(predictions, references, model=encoder_dir, num_layers=3)["f1"], abs=1e-6)


def test_bertscore_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="model: expected a local Hugging Face model directory"):
        M.bertscore(["a"], ["a"], model=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="num_layers: expected a layer index"):
        M.bertscore(["a"], ["a"], model=tmp_path, num_layers=-1)


def _generation_task(root: Path, model_option: str, extra: str = "") -> Path:
    rows = [{"question": f"what is {a} plus {b} ?", "answer": f"{a} plus {b} is {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 4), (2, 7)]]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = root / "gen.yaml"
    task.write_text("task: gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
                    "test_split: test\noutput_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
                    "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
                    f"metric_list:\n  - metric: bertscore\n    model: {model_option}\n    num_layers: 2\n{extra}")
    return task


def test_bertscore_task_metric_with_a_relative_model_directory(encoder_dir, tmp_path):
    import shutil

    shutil.copytree(encoder_dir, tmp_path / "encoder")
    llama = write_tiny_llama(tmp_path / "llama", layers=1)
    model, tokenizer = from_hf(llama), load_tokenizer(llama)
    task = _generation_task(tmp_path, "encoder")  # relative to the task file's folder
    scores = px.eval.evaluate(model, tokenizer, [task])["results"]["gen"]

    loaded = px.eval.load_task(task)
    requests = loaded.build_requests(limit=None, num_fewshot=None, seed=1234)
    predictions = ParallaxLM(model, tokenizer).generate_until([r.arguments for r in requests])
    expected = [_by_hand(encoder_dir, p, [doc["answer"]], 2) for p, doc in zip(predictions, loaded.docs)]
    assert scores["bertscore"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert scores["bertscore_stderr"] == pytest.approx(M.mean_stderr(expected), abs=1e-5)


@pytest.mark.parametrize("model_option, extra, field", [
    ("missing", "", "metric_list[0].model"),
    ("encoder", "    rescale_with_baseline: true\n", "metric_list[0].rescale_with_baseline"),
])
def test_bad_bertscore_options_name_the_field(encoder_dir, tmp_path, model_option, extra, field):
    import shutil

    shutil.copytree(encoder_dir, tmp_path / "encoder")
    with pytest.raises(TaskError, match=field.replace("[", r"\[").replace("]", r"\]")):
        px.eval.load_task(_generation_task(tmp_path, model_option, extra))
