"""px.eval.evaluate on local lm-eval task files equals lm-eval's `hf` backend on the same model
directory: acc, acc_norm and exact_match exactly, perplexities within 1e-4 relative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import parallax as px
from parallax.data import load_tokenizer
from parallax.models import from_hf
from tests.eval.tiny_llama import write_tiny_llama

transformers = pytest.importorskip("transformers")  # installed by the test command
lm_eval = pytest.importorskip("lm_eval")  # installed by the test command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("evaluate") / "llama", positions=128)


def _write_tasks(root: Path) -> list[Path]:
    """Three tasks over the same JSONL: multiple choice with few-shot, greedy generation, rolling."""
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0,
             "answer": str(a + b), "text": f"The sum of {a} and {b} is {a + b}. " * 3}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n    train: {data}\n" \
             "test_split: test\ntraining_split: train\n"
    specs = {
        "px_mc": "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
                 "doc_to_choice: choices\ndoc_to_target: label\nnum_fewshot: 2\n"
                 "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "px_gen": "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
                  "doc_to_target: \" {{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 5\n"
                  "metric_list:\n  - metric: exact_match\n",
        "px_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n",
    }
    paths = []
    for name, body in specs.items():
        path = root / f"{name}.yaml"
        path.write_text(f"task: {name}\n{common}{body}")
        paths.append(path)
    return paths


def test_scores_equal_lm_eval_hf_backend(model_dir, tmp_path):
    tasks = _write_tasks(tmp_path)
    ours = px.eval.evaluate(from_hf(model_dir), load_tokenizer(model_dir), tasks=tasks, batch_size=4)["results"]
    from lm_eval.tasks import TaskManager

    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", batch_size=4,
                                     tasks=["px_mc", "px_gen", "px_ppl"], device="cpu",
                                     task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    for metric in ("acc", "acc_norm"):
        assert ours["px_mc"][metric] == theirs["px_mc"][f"{metric},none"]
        assert ours["px_mc"][f"{metric}_stderr"] == pytest.approx(theirs["px_mc"][f"{metric}_stderr,none"])
    assert ours["px_gen"]["exact_match"] == theirs["px_gen"]["exact_match,none"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["px_ppl"][metric] == pytest.approx(theirs["px_ppl"][f"{metric},none"], rel=1e-4)


def test_bad_metric_for_the_task_type_is_named(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    task = tmp_path / "t.yaml"
    task.write_text(f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
                    "output_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n"
                    "metric_list:\n  - metric: acc_norm\n")
    with pytest.raises(ValueError, match="acc_norm.*does not apply to output_type 'generate_until'"):
        px.eval.evaluate(from_hf(model_dir), load_tokenizer(model_dir), tasks=[task])


def test_the_eval_command_writes_results_and_compares_them(model_dir, tmp_path, capsys):
    from parallax.cli import main

    tasks = _write_tasks(tmp_path)
    out = tmp_path / "a.json"
    args = ["eval", "--hf", str(model_dir), "--tasks", ",".join(map(str, tasks[:2])), "--limit", "3"]
    assert main([*args, "--output", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "px_mc" in printed and "acc_norm" in printed
    # progress bars on stderr: the multiple-choice requests (3 documents x 3 choices), then the generations
    assert "loglikelihood: 100%" in captured.err and "9/9" in captured.err
    assert "generate: 100%" in captured.err and "3/3" in captured.err
    assert main([*args, "--no-progress"]) == 0
    assert "100%" not in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"px_mc", "px_gen"} and saved["n_samples"] == {"px_mc": 3, "px_gen": 3}
    assert saved["config"]["limit"] == 3
    assert main(["eval", "--compare", str(out), str(out)]) == 0
    assert "0.0000" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [(["--limit", "0"], "--limit"), (["--tasks", "missing.yaml"], "missing"),
                                            ([], "--tasks")])
def test_bad_eval_input_fails_with_one_line_and_writes_nothing(model_dir, tmp_path, capsys, extra, message):
    from parallax.cli import main

    tasks = _write_tasks(tmp_path)
    out = tmp_path / "r.json"
    base = ["eval", "--hf", str(model_dir), "--output", str(out)]
    if extra[:1] != ["--tasks"] and extra:
        base += ["--tasks", str(tasks[0])]
    assert main([*base, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
