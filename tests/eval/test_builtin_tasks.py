"""Built-in tasks: they load by name, build requests, and their data is what the generator makes."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("yaml")
pytest.importorskip("jinja2")

from parallax.data import builtin_documents
from parallax.eval.builtin import (
    BUILTIN_DIR,
    BUILTIN_TASKS,
    builtin_task_path,
    make_tasks,
)
from parallax.eval.tasks import load_task


def rows(name):
    return [json.loads(line) for line in (BUILTIN_DIR / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_task_loads_by_name_and_builds_requests(name):
    task = load_task(name)
    assert task.path == builtin_task_path(name)
    assert 19 <= len(task.docs) <= 100
    requests = task.build_requests()
    per_doc = 4 if task.output_type == "multiple_choice" else 1
    assert len(requests) == per_doc * len(task.docs)
    assert {r.doc_index for r in requests} == set(range(len(task.docs)))


def test_unknown_builtin_name_is_a_clear_error():
    with pytest.raises(ValueError, match="'pydoc_nope' is not a built-in task"):
        builtin_task_path("pydoc_nope")


def test_committed_data_matches_a_fresh_run_of_the_generator():
    """A fresh process (a different hash seed, so set order cannot leak in) writes the same bytes."""
    recorded = (BUILTIN_DIR / "corpus.sha256").read_text().strip()
    if make_tasks.corpus_sha256(builtin_documents()) != recorded:
        pytest.skip("this Python's pydoc_data.topics differs from the corpus the tasks were made from")
    code = ("import json, sys; from parallax.eval.builtin.make_tasks import generate; "
            "json.dump(generate(), sys.stdout)")
    fresh = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                      text=True, env={**os.environ, "PYTHONHASHSEED": "7"}).stdout)
    assert set(fresh) == set(BUILTIN_TASKS)
    for name in BUILTIN_TASKS:
        assert fresh[name] == (BUILTIN_DIR / f"{name}.jsonl").read_text(encoding="utf-8"), name


def test_perplexity_passages_come_from_the_held_out_tail():
    held_out = "\n".join(p for d in make_tasks.held_out_documents(builtin_documents())
                         for p in make_tasks.prose_paragraphs(d))
    for row in rows("pydoc_perplexity"):
        for paragraph in row["text"].split("\n\n"):
            assert paragraph in held_out


def test_qa_answers_are_spans_of_their_contexts():
    for row in rows("pydoc_qa"):
        start = row["answer_start"]
        assert row["context"][start:start + len(row["answer"])] == row["answer"]


def test_cloze_choices_hold_the_answer_exactly_once():
    for row in rows("pydoc_cloze"):
        assert row["options"].count(row["answer"]) == 1
        assert len(set(row["options"])) == 4
        assert row["options"][row["label"]] == row["answer"]
        rest = row["choices"][row["label"]][len(row["answer"]):]
        assert [c.removesuffix(rest) for c in row["choices"]] == row["options"]
