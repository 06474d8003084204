"""Evaluation throughput: ``px.eval.evaluate`` against lm-evaluation-harness's ``hf`` backend.

Both score the same ``transformers`` Llama directory (a BPE tokenizer trained on the built-in
corpus; random weights after a few untimed AdamW steps on the corpus, so generations stop after
varying lengths) on the same two local task files, in the same process, with the same batch
size: a 4-way multiple-choice cloze (log-likelihood requests) and a short greedy generation
(``generate_until``). Reported: wall time, requests/s, the speedup, and whether the scores are
identical. Goal (issue 11, reported in the ``goals`` note, not asserted): >= 2x lm-eval ``hf`` on
both task types on CPU, identical scores.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .table import Column

COLUMNS = [
    Column("task", "task"),
    Column("provider", "provider"),
    Column("requests", "requests", "d"),
    Column("seconds", "wall [s]", ".2f"),
    Column("requests_per_s", "requests/s", ",.1f"),
    Column("speedup", "vs lm-eval hf [x]", ".2f"),
    Column("score", "score", ".4f"),
    Column("same_score", "same score"),
]

GOAL_X = 2.0


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--docs", type=int, default=None, help="documents per task (default 120, quick 12)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of both evaluators (default 16)")


def _model_dir(root: Path, quick: bool) -> Path:
    import transformers

    from parallax.data import builtin_documents, load_tokenizer
    from parallax.data.train_tokenizer import train_tokenizer

    path = root / "model"
    train_tokenizer(builtin_documents()[:200], 2048, path)
    torch.manual_seed(0)
    width, layers = (64, 2) if quick else (256, 4)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=load_tokenizer(path).vocab_size, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True))
    _train_briefly(hf, load_tokenizer(path), steps=20 if quick else 150)
    hf.save_pretrained(path)
    return path


def _train_briefly(hf, tokenizer, steps: int) -> None:
    """A few AdamW steps on the built-in corpus, so greedy generations end at a stop string after
    varying lengths, as a real model's do (a random-initialised model never emits one: every
    request would run to max_gen_toks, the one case where continuous batching cannot help)."""
    from parallax.data import builtin_documents

    ids = torch.tensor([t for d in builtin_documents()[:400] for t in tokenizer.encode(d, add_special_tokens=False)])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=generator).tolist()
        batch = torch.stack([ids[s:s + 64] for s in starts])  # (16, 64)
        hf(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _tasks(root: Path, docs: int) -> dict[str, Path]:
    """A cloze multiple-choice task and a generation task over sentences of the built-in corpus."""
    from parallax.data import builtin_documents

    rng = random.Random(0)
    sentences = [s.strip() for d in builtin_documents() for s in d.split(". ") if 40 < len(s.strip()) < 160]
    rng.shuffle(sentences)
    words = sorted({w for s in sentences[:2000] for w in s.split() if w.isalpha() and len(w) > 3})
    rows = []
    for s in sentences[:docs]:
        tokens = s.split()
        k = max(range(1, len(tokens)), key=lambda i: len(tokens[i]) if tokens[i].isalpha() else 0)  # a context
        choices = [tokens[k]] + rng.sample([w for w in words if w != tokens[k]], 3)
        rng.shuffle(choices)
        rows.append({"text": " ".join(tokens[:k]), "choices": choices, "label": choices.index(tokens[k]),
                     "answer": " " + tokens[k]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    files = {
        "bench_cloze": "output_type: multiple_choice\ndoc_to_text: text\ndoc_to_choice: choices\n"
                       "doc_to_target: label\nmetric_list:\n  - metric: acc\n",
        "bench_generate": "output_type: generate_until\ndoc_to_text: text\ndoc_to_target: answer\n"
                          "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 32\n"
                          "metric_list:\n  - metric: exact_match\n",
    }
    paths = {}
    for name, body in files.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(f"task: {name}\n{common}{body}")
    return paths


def run(ctx) -> Iterator[dict]:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError(f"bench eval compares against lm-evaluation-harness: pip install 'parallax[lm-eval]' "
                           f"({exc})") from None
    import parallax as px
    from parallax.data import load_tokenizer
    from parallax.models import from_hf

    ctx.add_version("lm_eval", getattr(lm_eval, "__version__", None))
    docs = ctx.args.docs or (12 if ctx.quick else 120)
    batch = ctx.args.batch_size
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model_dir = _model_dir(root, ctx.quick)
        tasks = _tasks(root, docs)
        model = from_hf(model_dir).to(ctx.device)
        tokenizer = load_tokenizer(model_dir)
        from lm_eval.models.huggingface import HFLM

        reference = HFLM(pretrained=str(model_dir), batch_size=batch, device=str(ctx.device), dtype="float32")
        task_manager = TaskManager(include_path=str(root))  # indexes lm-eval's own tasks too: seconds, untimed
        goals = {}
        for name, path in tasks.items():
            t0 = time.perf_counter()
            ours = px.eval.evaluate(model, tokenizer, [path], batch_size=batch)["results"][name]
            ours_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            theirs = lm_eval.simple_evaluate(model=reference, tasks=[name], task_manager=task_manager)["results"][name]
            theirs_s = time.perf_counter() - t0
            metric = "acc" if name == "bench_cloze" else "exact_match"
            requests = docs * 4 if name == "bench_cloze" else docs
            same = ours[metric] == theirs[f"{metric},none"]
            for provider, seconds, score in (("parallax", ours_s, ours[metric]),
                                             ("lm-eval hf", theirs_s, theirs[f"{metric},none"])):
                yield {"task": name, "provider": provider, "requests": requests, "seconds": seconds,
                       "requests_per_s": requests / seconds, "speedup": theirs_s / seconds, "score": score,
                       "same_score": same}
            goals[f"{name}: >= {GOAL_X:g}x lm-eval hf, identical score"] = (
                f"{theirs_s / ours_s:.2f}x, score {'identical' if same else 'DIFFERENT'}: "
                f"{'met' if theirs_s / ours_s >= GOAL_X and same else 'not met'}")
        ctx.note("method", f"same model directory, tasks and batch size {batch}; wall time of one "
                           "px.eval.evaluate / lm_eval.simple_evaluate call each; models and lm-eval's TaskManager "
                           "created beforehand")
        ctx.note("goals", goals)
