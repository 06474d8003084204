"""The `parallax` model for lm-evaluation-harness: lm-eval's own evaluator, run on local JSON tasks,
gives the same acc, acc_norm and exact_match through parallax as through its `hf` backend; it loads
`parallax train` checkpoints, applies chat templates as the hf backend does, and refuses bad
model_args by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval.tiny_llama import write_tiny_llama

transformers = pytest.importorskip("transformers")  # installed by the test command
lm_eval = pytest.importorskip("lm_eval")  # installed by the test command
from lm_eval.tasks import TaskManager  # noqa: E402

from parallax.eval.lm_eval import ParallaxEvalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("px_backend_mc", "px_backend_gen")
MC_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a very long answer"], "label": 0},
    {"question": "Two plus two equals", "choices": [" four", " five", " 4"], "label": 2},
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "label": 1},
    {"question": "Cats say", "choices": [" meow", " woof"], "label": 0},
]
GEN_DOCS = [{"question": "Say a", "answer": "a"}, {"question": "Once upon a", "answer": "time"},
            {"question": "Repeat x", "answer": "x"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a Llama 3 style tokenizer (BOS added by its post-processor)."""
    return write_tiny_llama(tmp_path_factory.mktemp("lm_eval_backend") / "llama")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice and a generate_until task in lm-eval's vocabulary over local JSONL."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs in (("mc.jsonl", MC_DOCS), ("gen.jsonl", GEN_DOCS)):
        (folder / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: px_backend_mc\n" + data.format(folder / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
          "doc_to_target: label\ntarget_delimiter: ''\n"
          "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "gen.yaml").write_text(
        "task: px_backend_gen\n" + data.format(folder / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: 'Q: {{question}}\\nA:'\ndoc_to_target: answer\n"
          "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")
    return folder


def _evaluate(model: str, model_args: str, task_dir: Path) -> dict:
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS),
                                      task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    return results


def _scores(results: dict) -> dict[tuple[str, str], float]:
    return {(task, metric): value for task, row in results["results"].items()
            for metric, value in row.items() if metric.split(",")[0] in ("acc", "acc_norm", "exact_match")}


def test_simple_evaluate_equals_lm_eval_hf(model_dir, task_dir):
    ours = _evaluate("parallax", f"hf={model_dir},batch_size=2,device=cpu", task_dir)
    reference = _evaluate("hf", f"pretrained={model_dir},dtype=float32,device=cpu", task_dir)
    scores = _scores(ours)
    assert {key[1] for key in scores} == {"acc,none", "acc_norm,none", "exact_match,none"}
    assert scores == _scores(reference)
    for task in TASKS:  # the same responses document by document, not just the same averages
        ours_rows = [s["filtered_resps"] for s in ours["samples"][task]]
        reference_rows = [s["filtered_resps"] for s in reference["samples"][task]]
        if task == "px_backend_gen":
            assert ours_rows == reference_rows
        else:
            for got, expected in zip(ours_rows, reference_rows):
                assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
                assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny `parallax train` run (RUN/checkpoints/step_N, byte tokenizer), 2 steps."""
    from parallax.train import TrainConfig, train

    root = tmp_path_factory.mktemp("lm_eval_train")
    mp = pytest.MonkeyPatch()
    mp.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "parallax-cache"))
    try:
        train(TrainConfig(model={"n_layer": 1, "n_head": 2, "n_embd": 32}, block_size=32, batch_size=2, steps=2,
                          eval_interval=2, eval_batches=1, sample_tokens=0, checkpoint_interval=2,
                          out=str(root / "out")), progress=False)
    finally:
        mp.undo()
    return root / "out"


def test_checkpoint_runs_through_simple_evaluate(run_dir, task_dir):
    from parallax.data import ByteTokenizer
    from parallax.eval.lm import ParallaxLM
    from parallax.train.checkpoints import load_model

    results = _evaluate("parallax", f"checkpoint={run_dir},batch_size=3,dtype=float32", task_dir)
    checkpoint = run_dir / "checkpoints" / "step_000002"
    expected = ParallaxLM(load_model(checkpoint), ByteTokenizer()).loglikelihood(
        [(d["question"], choice) for d in MC_DOCS for choice in d["choices"]])
    got = [resp for s in results["samples"]["px_backend_mc"] for resp in s["filtered_resps"]]
    # the run's newest checkpoint, with the run's byte tokenizer
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], rel=1e-5)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert set(results["results"]) == set(TASKS)


def test_chat_template_equals_lm_eval_hf(model_dir):
    from lm_eval.models.huggingface import HFLM

    reference = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32")
    ours = ParallaxEvalLM(hf=str(model_dir), device="cpu")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    prefilled = chat + [{"role": "assistant", "content": "The answer is "}]
    assert ours.chat_template(True) == reference.chat_template(True)
    assert ours.apply_chat_template(chat) == reference.apply_chat_template(chat)
    assert ours.apply_chat_template(prefilled, add_generation_prompt=False) == reference.apply_chat_template(
        prefilled, add_generation_prompt=False)
    assert ours.chat_template(False) is None
    assert str(model_dir).replace("/", "__") in ours.tokenizer_name


@pytest.mark.parametrize("model_args, message", [
    ("", "exactly one of checkpoint=PATH"),
    ("hf=A,checkpoint=B", "exactly one of checkpoint=PATH"),
    ("hf={dir},dtype=float64", "dtype must be one of float32, bfloat16, float16"),
    ("hf={dir},batch_size=auto", "batch_size must be a positive integer"),
    ("hf={dir},device=tpu", "device must be cpu, cuda"),
    ("hf={dir},max_length=0", "max_length must be a positive integer"),
])
def test_bad_model_args_fail_by_name(model_dir, model_args, message):
    with pytest.raises(ValueError, match=message):
        ParallaxEvalLM.create_from_arg_string(model_args.format(dir=model_dir))


def test_the_cli_wrapper_registers_the_model(model_dir, task_dir, tmp_path):
    """`python -m parallax.eval.lm_eval` is lm-eval's command line knowing `--model parallax`."""
    out = subprocess.run(
        [sys.executable, "-m", "parallax.eval.lm_eval", "--model", "parallax", "--model_args",
         f"hf={model_dir}", "--device", "cpu", "--batch_size", "2", "--tasks", "px_backend_mc",
         "--include_path", str(task_dir), "--limit", "2", "--output_path", str(tmp_path / "results")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "px_backend_mc" in out.stdout and "acc_norm" in out.stdout


def test_simple_evaluate_with_dict_model_args_and_default_batch_size(model_dir, task_dir):
    """lm-eval passes batch_size=None and device=None with dict model_args: the defaults apply."""
    results = lm_eval.simple_evaluate(model="parallax", model_args={"hf": str(model_dir)}, tasks=["px_backend_mc"],
                                      task_manager=TaskManager(include_path=str(task_dir)), limit=1)
    assert "acc,none" in results["results"]["px_backend_mc"]


def test_importing_parallax_eval_does_not_import_lm_eval():
    code = "import sys, parallax.eval; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_without_lm_eval_the_import_error_names_the_extra():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "try:\n    import parallax.eval.lm_eval\nexcept ImportError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert "pip install 'parallax[lm-eval]'" in out.stdout, out.stderr
