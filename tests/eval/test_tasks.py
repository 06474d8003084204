"""Task files (lm-eval's YAML vocabulary over local JSON/JSONL) and the requests they build."""

import json
import random

import pytest

pytest.importorskip("yaml")
pytest.importorskip("jinja2")

from parallax.eval.tasks import Request, Task, TaskError, load_task  # noqa: E402

MC_DOCS = [
    {"question": "2+2?", "choices": ["3", "4"], "label": 1, "answer": "4"},
    {"question": "Sky colour?", "choices": ["blue", "green"], "label": 0, "answer": "blue"},
    {"question": "Capital of France?", "choices": ["Paris", "Rome"], "label": 0, "answer": "Paris"},
    {"question": "1+1?", "choices": ["2", "5"], "label": 0, "answer": "2"},
    {"question": "Opposite of up?", "choices": ["down", "left"], "label": 0, "answer": "down"},
]
TRAIN_DOCS = [
    {"question": f"train question {i}?", "choices": [f"a{i}", f"b{i}"], "label": i % 2,
     "answer": f"b{i}" if i % 2 else f"a{i}"}
    for i in range(6)
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_task(folder, text, name="task.yaml", test=MC_DOCS, train=TRAIN_DOCS):
    """Write data/test.jsonl, data/train.jsonl and a task file naming them relative to it."""
    write_jsonl(folder / "data" / "test.jsonl", test)
    write_jsonl(folder / "data" / "train.jsonl", train)
    path = folder / name
    path.write_text(text)
    return path


HEADER = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
    train: data/train.jsonl
test_split: test
"""
MC_TASK = HEADER + """\
task: tiny_mc
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
"""


def test_multiple_choice_one_request_per_choice_with_target_delimiter(tmp_path):
    task = load_task(write_task(tmp_path, MC_TASK))
    assert isinstance(task, Task) and task.name == "tiny_mc" and len(task.docs) == 5
    requests = task.build_requests(limit=2)
    ctx0, ctx1 = "Question: 2+2?\nAnswer:", "Question: Sky colour?\nAnswer:"
    assert requests == [
        Request("loglikelihood", (ctx0, " 3"), 0, 0), Request("loglikelihood", (ctx0, " 4"), 0, 1),
        Request("loglikelihood", (ctx1, " blue"), 1, 0),
        Request("loglikelihood", (ctx1, " green"), 1, 1)]
    assert [m.metric for m in task.metric_list] == ["acc", "acc_norm"]  # lm-eval's defaults


def test_loglikelihood_continuation_is_the_target_as_written(tmp_path):
    """lm-eval's construct_requests adds no target_delimiter for loglikelihood: the target
    template carries its own leading space (as lambada's does)."""
    task = load_task(write_task(tmp_path, HEADER + """\
output_type: loglikelihood
doc_to_text: "{{question}}"
doc_to_target: "{{' ' + answer}}"
metric_list: [{metric: perplexity}, {metric: acc}]
"""))
    assert task.build_requests(limit=1) == [Request("loglikelihood", ("2+2?", " 4"), 0)]
    assert task.name == "task"  # defaults to the file name


def test_loglikelihood_rolling_scores_doc_to_target_alone(tmp_path):
    task = load_task(write_task(tmp_path, HEADER + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: question
"""))
    assert task.build_requests() == [Request("loglikelihood_rolling", (d["question"],), i)
                                     for i, d in enumerate(MC_DOCS)]
    assert [m.metric for m in task.metric_list] == ["word_perplexity", "byte_perplexity",
                                                    "bits_per_byte"]


def test_generate_until_carries_generation_kwargs(tmp_path):
    task = load_task(write_task(tmp_path, HEADER + """\
output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: answer
generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false, temperature: 0}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}]
"""))
    (request,) = task.build_requests(limit=1)
    assert request == Request("generate_until", ("Q: 2+2?\nA:", {
        "until": ["\n"], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0}), 0)
    (metric,) = task.metric_list
    assert (metric.metric, metric.aggregation, metric.higher_is_better, metric.kwargs) == (
        "exact_match", "mean", True, {"ignore_case": True})


def test_generate_until_defaults_follow_lm_eval(tmp_path):
    """No generation_kwargs: greedy, 256 tokens, until the few-shot delimiter."""
    task = load_task(write_task(tmp_path, HEADER + """\
output_type: generate_until
doc_to_text: question
doc_to_target: answer
fewshot_delimiter: "\\n###\\n"
"""))
    assert task.generation_kwargs == {"temperature": 0.0, "do_sample": False,
                                      "max_gen_toks": 256, "until": ["\n###\n"]}


@pytest.mark.parametrize("choice_spec,target_spec", [
    ("choices", "label"),                                   # columns
    ('["{{choices[0]}}", "{{choices[1]}}"]', "{{label}}"),  # template -> list literal / int
    ("{{choices}}", "answer"),                              # template of a list column; str target
])
def test_doc_to_choice_and_target_forms_agree(tmp_path, choice_spec, target_spec):
    task = load_task(write_task(tmp_path, MC_TASK.replace("doc_to_choice: choices",
                                                          f"doc_to_choice: '{choice_spec}'")
                                .replace("doc_to_target: label", f"doc_to_target: '{target_spec}'")
                                + "num_fewshot: 1\nfewshot_split: train\n"))
    doc = MC_DOCS[0]
    assert task.doc_to_choice(doc) == ["3", "4"]
    assert task.doc_to_target(doc) in (1, "4")
    # The few-shot answer is the gold choice's text whichever form names it.
    shot = task.contexts(limit=1)[0].split("\n\n")[0]
    assert shot.startswith("Question: train question ") and shot.split("Answer: ")[1][0] in "ab"


def test_doc_to_choice_yaml_list_and_text_template_equal_field_name(tmp_path):
    by_template = load_task(write_task(tmp_path, MC_TASK.replace(
        "doc_to_choice: choices", "doc_to_choice: ['no', 'yes']")))
    assert by_template.doc_to_choice(MC_DOCS[3]) == ["no", "yes"]
    by_field = load_task(write_task(tmp_path, MC_TASK.replace(
        'doc_to_text: "Question: {{question}}\\nAnswer:"', "doc_to_text: question"), "f.yaml"))
    assert by_field.contexts(limit=2) == ["2+2?", "Sky colour?"]


def test_fewshot_context_matches_lm_eval_layout(tmp_path):
    """description + (text + target_delimiter + answer + fewshot_delimiter) per shot + text,
    with shots drawn by random.Random(1234).sample from the few-shot split."""
    task = load_task(write_task(tmp_path, MC_TASK + """\
description: "Answer briefly.\\n\\n"
fewshot_split: train
num_fewshot: 2
target_delimiter: " => "
fewshot_delimiter: "\\n--\\n"
"""))
    rnd = random.Random(1234)
    expected = []
    for doc in MC_DOCS[:3]:
        shots = rnd.sample(TRAIN_DOCS, 2)
        expected.append("Answer briefly.\n\n" + "".join(
            f"Question: {s['question']}\nAnswer: => {s['choices'][s['label']]}\n--\n" for s in shots)
            + f"Question: {doc['question']}\nAnswer:")
    assert task.contexts(limit=3) == expected
    assert task.contexts(limit=3) == expected  # reproducible
    assert task.contexts(limit=5)[:3] == expected  # the first prompts do not depend on --limit
    assert task.contexts(limit=3, seed=7) != expected
    assert task.contexts(limit=1, num_fewshot=0) == ["Answer briefly.\n\nQuestion: 2+2?\nAnswer:"]


def test_fewshot_from_the_test_split_excludes_the_doc(tmp_path):
    task = load_task(write_task(tmp_path, MC_TASK + "fewshot_split: test\nnum_fewshot: 4\n"))
    rnd = random.Random(1234)
    for doc, ctx in zip(MC_DOCS, task.contexts()):
        shots = [x for x in rnd.sample(MC_DOCS, 5) if x != doc][:4]
        assert len(shots) == 4
        assert ctx.count("Question: ") == 5 and ctx.count(doc["question"]) == 1
        assert ctx.startswith(f"Question: {shots[0]['question']}")


def test_fewshot_falling_back_onto_the_test_split_must_be_named(tmp_path):
    """lm-eval would let a doc be its own example here (it only excludes when fewshot_split is
    written): parallax asks for fewshot_split instead of silently differing."""
    text = MC_TASK.replace("    train: data/train.jsonl\n", "") + "num_fewshot: 1\n"
    with pytest.raises(TaskError, match=r"task.yaml: field 'fewshot_split'"):
        load_task(write_task(tmp_path, text))


def test_relative_data_paths_resolve_from_the_task_folder(tmp_path, monkeypatch):
    path = write_task(tmp_path / "tasks", MC_TASK)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert len(load_task(path).docs) == 5


def test_data_file_list_and_json_array(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text(json.dumps(MC_DOCS[:2]))
    write_jsonl(tmp_path / "data" / "b.jsonl", MC_DOCS[2:])
    path = tmp_path / "t.yaml"
    path.write_text(MC_TASK.replace("test: data/test.jsonl", "test: [data/a.json, data/b.jsonl]")
                    .replace("    train: data/train.jsonl\n", ""))
    assert load_task(path).docs == MC_DOCS


@pytest.mark.parametrize("extra,field", [
    ("shots: 3\n", "shots"),
    ("process_docs: foo\n", "process_docs"),
    ("metric_list: [{metric: accuracy}]\n", "metric_list[0].metric"),
    ("generation_kwargs: {until: [x], beams: 2}\n", "generation_kwargs.beams"),
    ("num_fewshot: -1\n", "num_fewshot"),
])
def test_bad_fields_name_file_and_field(tmp_path, extra, field):
    with pytest.raises(TaskError) as err:
        load_task(write_task(tmp_path, MC_TASK + extra))
    assert str(err.value).startswith(f"{tmp_path / 'task.yaml'}: field '{field}'")
    assert err.value.field == field


def test_bad_output_type(tmp_path):
    with pytest.raises(TaskError, match=r"task.yaml: field 'output_type': 'ranking' is not one of"):
        load_task(write_task(tmp_path, MC_TASK.replace("multiple_choice", "ranking")))


def test_template_with_missing_column_names_field_and_column(tmp_path):
    text = MC_TASK.replace("{{question}}", "{{prompt}}")
    with pytest.raises(TaskError, match=r"task.yaml: field 'doc_to_text': template references "
                                        r"column 'prompt'"):
        load_task(write_task(tmp_path, text))


def test_misspelt_column_name_is_an_error(tmp_path):
    with pytest.raises(TaskError, match=r"field 'doc_to_target': 'lable' is not a column"):
        load_task(write_task(tmp_path, MC_TASK.replace("doc_to_target: label",
                                                       "doc_to_target: lable")))


def test_missing_data_file_names_it(tmp_path):
    path = write_task(tmp_path, MC_TASK)
    (tmp_path / "data" / "train.jsonl").unlink()
    with pytest.raises(TaskError, match=r"field 'dataset_kwargs.data_files.train': data file "
                                        r".*train.jsonl does not exist"):
        load_task(path)


def test_unknown_split_names_the_split_field(tmp_path):
    with pytest.raises(TaskError, match=r"field 'test_split': split 'validation' is not in"):
        load_task(write_task(tmp_path, MC_TASK.replace("test_split: test",
                                                       "test_split: validation")))


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_must_be_positive(tmp_path, limit):
    task = load_task(write_task(tmp_path, MC_TASK))
    with pytest.raises(ValueError, match=r"--limit: expected a number of documents >= 1"):
        task.build_requests(limit=limit)


def test_python_function_tags_are_refused(tmp_path):
    with pytest.raises(TaskError, match="!function"):
        load_task(write_task(tmp_path, MC_TASK + "process_results: !function utils.f\n"))


LM_EVAL_TASKS = {
    "mc_train": MC_TASK + "fewshot_split: train\nnum_fewshot: 2\n"
                          "description: \"Answer.\\n\\n\"\ntarget_delimiter: \" -> \"\n",
    "mc_self": MC_TASK + "fewshot_split: test\nnum_fewshot: 3\n",
    "gen": HEADER + "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
                    "doc_to_target: answer\nfewshot_split: train\nnum_fewshot: 2\n"
                    "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 5, do_sample: false}\n",
    "ll": HEADER + "output_type: loglikelihood\ndoc_to_text: question\n"
                   "doc_to_target: \"{{' ' + answer}}\"\nfewshot_split: train\nnum_fewshot: 1\n",
    "rolling": HEADER + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                        "doc_to_target: question\n",
}


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """Every LM_EVAL_TASKS file in one folder, loaded once by lm-eval's own TaskManager.
    lm-eval resolves data_files from the working directory, so it runs from that folder."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    paths = {kind: write_task(folder, f"task: parallax_{kind}\n"
                              + text.replace("task: tiny_mc\n", ""), name=f"parallax_{kind}.yaml")
             for kind, text in LM_EVAL_TASKS.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.chdir(folder)
        loaded = TaskManager(include_path=str(folder)).load(
            [f"parallax_{kind}" for kind in LM_EVAL_TASKS])["tasks"]
    return {kind: (paths[kind], loaded[f"parallax_{kind}"]) for kind in LM_EVAL_TASKS}


@pytest.mark.parametrize("kind", sorted(LM_EVAL_TASKS))
def test_lm_eval_builds_the_same_requests(lm_eval_tasks, kind):
    """The same YAML through lm-eval gives the same requests, character for character."""
    path, theirs = lm_eval_tasks[kind]
    theirs.set_fewshot_seed(1234)  # simple_evaluate's default fewshot_random_seed
    theirs.build_all_requests(rank=0, world_size=1, limit=4)
    expected = [(i.request_type, tuple(i.arguments), i.doc_id, i.idx) for i in theirs.instances]
    ours = [(r.request_type, r.arguments, r.doc_index, r.index)
            for r in load_task(path).build_requests(limit=4)]
    assert ours == expected
