"""Evaluation tasks in lm-evaluation-harness's YAML vocabulary, over local JSON/JSONL data.

A task file such as::

    task: tiny_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: test.jsonl, train: train.jsonl}}
    test_split: test
    fewshot_split: train
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices
    doc_to_target: label
    num_fewshot: 2
    metric_list: [{metric: acc}, {metric: acc_norm}]

runs unchanged in lm-eval (``--include_path``) and here. ``load_task(path)`` validates it and
loads the data; ``Task.build_requests()`` turns the documents into the same requests lm-eval
sends to a model (see ``ConfigurableTask.fewshot_context``/``build_qa_turn``/``construct_requests``
in ``lm_eval/api/task.py`` and ``ContextSampler.sample`` in ``lm_eval/api/samplers.py``, 0.4.x):
the prompt whitespace and the few-shot draws are what make scores comparable, so they follow
lm-eval character for character.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

OutputType = Literal["loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until"]
RequestType = Literal["loglikelihood", "loglikelihood_rolling", "generate_until"]

OUTPUT_TYPES: tuple[str, ...] = ("loglikelihood", "loglikelihood_rolling", "multiple_choice",
                                 "generate_until")
KNOWN_METRICS: tuple[str, ...] = (
    "acc", "acc_norm", "acc_bytes", "perplexity", "word_perplexity", "byte_perplexity",
    "bits_per_byte", "exact_match", "f1", "squad_exact_match", "bleu", "chrf", "ter", "rouge1", "rouge2",
    "rougeL", "bertscore")
# The options a metric_list entry may give its metric (everything else is an error).
METRIC_OPTIONS: dict[str, frozenset[str]] = {
    "exact_match": frozenset({"regexes_to_ignore", "ignore_case", "ignore_punctuation", "ignore_numbers"}),
    "bertscore": frozenset({"model", "num_layers", "idf", "batch_size"}),
}
# lm-eval's DEFAULT_METRIC_REGISTRY (lm_eval/api/registry.py): used when metric_list is absent.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("exact_match",),
}
# lm-eval's DEFAULT_OTHER_SEED: simple_evaluate(fewshot_random_seed=1234) seeds every task's sampler.
DEFAULT_FEWSHOT_SEED = 1234
# lm-eval's DEFAULT_MAX_GEN_TOKS, used by default_gen_kwargs when a task gives no generation_kwargs.
DEFAULT_MAX_GEN_TOKS = 256

_USED_KEYS = frozenset({
    "task", "dataset_path", "dataset_kwargs", "training_split", "validation_split", "test_split",
    "fewshot_split", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice",
    "target_delimiter", "fewshot_delimiter", "description", "num_fewshot", "generation_kwargs",
    "metric_list"})
# lm-eval keys that do not change the requests or the scores.
_HARMLESS_KEYS = frozenset({"task_alias", "tag", "should_decontaminate",
                            "doc_to_decontamination_query", "metadata", "unsafe_code"})
# lm-eval keys that change prompts or scoring in ways parallax does not reproduce: refusing them
# beats silently producing scores that differ from lm-eval's.
_UNSUPPORTED_KEYS = frozenset({
    "dataset_name", "custom_dataset", "process_docs", "process_results", "use_prompt",
    "doc_to_image", "doc_to_audio", "gen_prefix", "fewshot_config", "filter_list", "repeats",
    "include", "group", "class"})
_GENERATION_KEYS = frozenset({"until", "max_gen_toks", "do_sample", "temperature"})
_METRIC_KEYS = frozenset({"metric", "aggregation", "higher_is_better"})
_SPLIT_FIELDS = ("test_split", "validation_split", "training_split", "fewshot_split")


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file and the field."""

    def __init__(self, path: Path | str, field_name: str, problem: str):
        super().__init__(f"{path}: field '{field_name}': {problem}")
        self.path = Path(path)
        self.field = field_name


@dataclass(frozen=True)
class MetricSpec:
    """One ``metric_list`` entry: a metric name, its aggregation and direction (None = the
    metric's default), and any extra keys lm-eval passes to the metric (e.g. ``ignore_case``)."""

    metric: str
    aggregation: str | None = None
    higher_is_better: bool | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One model call, as lm-eval's ``Instance``.

    ``arguments`` is ``(context, continuation)`` for ``loglikelihood``, ``(text,)`` for
    ``loglikelihood_rolling`` and ``(context, generation_kwargs)`` for ``generate_until``.
    ``doc_index`` is the document's position in ``Task.docs``; ``index`` the choice's position
    for a multiple-choice document (0 otherwise).
    """

    request_type: RequestType
    arguments: tuple
    doc_index: int
    index: int = 0


@dataclass(frozen=True)
class _Field:
    """A ``doc_to_*`` value compiled once: a column name, a Jinja template or a YAML literal."""

    name: str
    kind: Literal["column", "template", "literal"]
    value: Any
    template: Any = None


@dataclass(kw_only=True)
class Task:
    """A loaded task: its settings, evaluation documents and few-shot pool.

    Build one with :func:`load_task`. ``docs`` are the evaluated split's rows (dicts), in file
    order; ``fewshot_docs`` the rows few-shot examples are drawn from.
    """

    name: str
    path: Path
    output_type: OutputType
    docs: list[dict[str, Any]]
    fewshot_docs: list[dict[str, Any]]
    eval_split: str
    fewshot_split: str
    exclude_doc_from_fewshot: bool
    doc_to_text_field: _Field
    doc_to_target_field: _Field
    doc_to_choice_field: _Field | None
    description_field: _Field | None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    generation_kwargs: dict[str, Any] | None = None
    metric_list: list[MetricSpec] = field(default_factory=list)

    def doc_to_text(self, doc: dict[str, Any]) -> Any:
        """The document's prompt text (lm-eval's ``doc_to_text``)."""
        value = self._resolve(self.doc_to_text_field, doc)
        if isinstance(value, str) and value.isdigit() and self.doc_to_choice_field is not None \
                and self.doc_to_text_field.kind == "template":
            return ast.literal_eval(value)
        return value

    def doc_to_target(self, doc: dict[str, Any]) -> Any:
        """The gold answer: a string, a choice index, or a list of strings (lm-eval's rules)."""
        value = self._resolve(self.doc_to_target_field, doc)
        if self.doc_to_target_field.kind != "template":
            return value
        if value.isdigit() and self.doc_to_choice_field is not None:
            return ast.literal_eval(value)
        if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            try:
                return ast.literal_eval(value)
            except (SyntaxError, ValueError):
                return value
        return value

    def doc_to_choice(self, doc: dict[str, Any]) -> list[str]:
        """The document's answer choices; a TaskError when the task has no ``doc_to_choice``."""
        spec = self.doc_to_choice_field
        if spec is None:
            raise TaskError(self.path, "doc_to_choice", "is not set")
        value = self._resolve(spec, doc)
        if spec.kind == "template":
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError) as err:
                raise TaskError(self.path, "doc_to_choice",
                                f"template rendered {value!r}, not a Python list literal") from err
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise TaskError(self.path, "doc_to_choice",
                            f"expected a list of strings, got {value!r}")
        return value

    def contexts(self, *, limit: int | None = None, num_fewshot: int | None = None,
                 seed: int = DEFAULT_FEWSHOT_SEED) -> list[str]:
        """The prompt of each of the first ``limit`` documents, few-shot examples included.

        One ``random.Random(seed)`` draws the examples for the documents in order, as lm-eval's
        task-level sampler does, so the first N prompts do not depend on ``limit``.
        """
        shots = self.num_fewshot if num_fewshot is None else _check_num_fewshot(num_fewshot)
        docs = self.docs[:_check_limit(limit)]
        if shots:
            _check_fewshot_pool(self)
        rnd = random.Random(seed)
        return [self._context(doc, self._sample_fewshot(rnd, doc, shots)) for doc in docs]

    def build_requests(self, *, limit: int | None = None, num_fewshot: int | None = None,
                       seed: int = DEFAULT_FEWSHOT_SEED) -> list[Request]:
        """Every model call for the first ``limit`` documents, in document order.

        Follows lm-eval's ``ConfigurableTask.construct_requests``: ``multiple_choice`` gives one
        ``(context, target_delimiter + choice)`` loglikelihood per choice; ``loglikelihood`` gives
        ``(context, doc_to_target)`` (lm-eval adds no delimiter there: the target carries its own
        leading space); ``loglikelihood_rolling`` scores ``doc_to_target`` alone;
        ``generate_until`` gives ``(context, generation_kwargs)``.
        """
        if self.output_type == "loglikelihood_rolling":
            docs = self.docs[:_check_limit(limit)]
            return [Request("loglikelihood_rolling", (self._target_text(doc, "doc_to_target"),), i)
                    for i, doc in enumerate(docs)]
        contexts = self.contexts(limit=limit, num_fewshot=num_fewshot, seed=seed)
        requests: list[Request] = []
        for i, (doc, ctx) in enumerate(zip(self.docs, contexts)):
            if self.output_type == "multiple_choice":
                requests += [Request("loglikelihood", (ctx, f"{self.target_delimiter}{choice}"), i, j)
                             for j, choice in enumerate(self.doc_to_choice(doc))]
            elif self.output_type == "loglikelihood":
                requests.append(Request("loglikelihood",
                                        (ctx, self._target_text(doc, "doc_to_target")), i))
            else:
                requests.append(Request("generate_until",
                                        (ctx, copy.deepcopy(self.generation_kwargs)), i))
        return requests

    def _sample_fewshot(self, rnd: random.Random, doc: dict[str, Any],
                        n: int) -> list[dict[str, Any]]:
        """lm-eval's ``ContextSampler.sample``: n + 1 draws minus the doc itself when the
        few-shot split is the test split, a redraw without it if duplicates removed too many."""
        if n == 0:
            return []
        pool = self.fewshot_docs
        need = n + 1 if self.exclude_doc_from_fewshot else n
        if need > len(pool):
            raise TaskError(self.path, "num_fewshot",
                            f"{n} examples need {need} documents in split "
                            f"'{self.fewshot_split}', which has {len(pool)}")
        if not self.exclude_doc_from_fewshot:
            return rnd.sample(pool, n)
        chosen = [x for x in rnd.sample(pool, n + 1) if x != doc][:n]
        if len(chosen) < n:
            chosen = rnd.sample([x for x in pool if x != doc], n)
        return chosen

    def _context(self, doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
        """description + each shot (text, target_delimiter, answer, fewshot_delimiter) + text,
        as lm-eval's ``fewshot_context``/``build_qa_turn`` render it without a chat template."""
        parts = [self._resolve(self.description_field, doc) if self.description_field else ""]
        for shot in shots:
            parts.append(self._prompt_text(shot))
            target = self.doc_to_target(shot)
            if target is None or target == "":
                continue  # build_qa_turn: no answer, so neither delimiter
            parts += [self.target_delimiter, self._answer_text(shot, target), self.fewshot_delimiter]
        parts.append(self._prompt_text(doc))
        return "".join(parts)

    def _prompt_text(self, doc: dict[str, Any]) -> str:
        text = self.doc_to_text(doc)
        if not isinstance(text, str):
            raise TaskError(self.path, "doc_to_text",
                            f"must give a string, got {text!r} (lm-eval's multiple-input form, "
                            "where doc_to_text picks a choice, is not supported)")
        return text

    def _answer_text(self, doc: dict[str, Any], target: Any) -> str:
        """The few-shot answer: choices[target] for an index, the first of a list, else target."""
        if isinstance(target, int) and self.doc_to_choice_field is not None:
            choices = self.doc_to_choice(doc)
            if not 0 <= target < len(choices):
                raise TaskError(self.path, "doc_to_target",
                                f"index {target} is outside the {len(choices)} choices")
            target = choices[target]
        elif isinstance(target, list):
            target = target[0] if target else None
        if not isinstance(target, str):
            raise TaskError(self.path, "doc_to_target", f"must give a string, got {target!r}")
        return target

    def _target_text(self, doc: dict[str, Any], field_name: str) -> str:
        target = self.doc_to_target(doc)
        if not isinstance(target, str):
            raise TaskError(self.path, field_name, f"must give a string, got {target!r}")
        return target

    def _resolve(self, spec: _Field, doc: dict[str, Any]) -> Any:
        if spec.kind == "literal":
            return spec.value
        if spec.kind == "column":
            return doc[spec.value]
        return _render(spec, doc, self.path)


def load_task(path: str | Path) -> Task:
    """Read a task YAML file and its JSON/JSONL data; raise TaskError naming any bad field.

    ``path`` may also be a built-in task's name (``parallax.eval.builtin.BUILTIN_TASKS``)."""
    from parallax.eval.builtin import BUILTIN_TASKS, builtin_task_path

    path = builtin_task_path(path) if path in BUILTIN_TASKS else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    config = _read_yaml(path)
    _check_keys(path, config)
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(path, "output_type",
                        f"{output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    splits = _load_splits(path, config)
    eval_split, fewshot_split = _choose_splits(path, config, splits)
    docs = splits[eval_split]
    if not docs:
        raise TaskError(path, "test_split" if config.get("test_split") else "validation_split",
                        f"split '{eval_split}' has no documents")
    columns = set().union(*(doc.keys() for doc in docs))
    has_choices = config.get("doc_to_choice") is not None
    if output_type == "multiple_choice" and not has_choices:
        raise TaskError(path, "doc_to_choice", "is required for output_type multiple_choice")
    num_fewshot = _check_num_fewshot(config.get("num_fewshot") or 0, path)
    task = Task(
        name=_string(path, config, "task", None) or path.stem,
        path=path,
        output_type=output_type,
        docs=docs,
        fewshot_docs=splits[fewshot_split],
        eval_split=eval_split,
        fewshot_split=fewshot_split,
        # lm-eval compares the configured names: fewshot_cfg.split == config.test_split.
        exclude_doc_from_fewshot=config.get("fewshot_split") == config.get("test_split"),
        doc_to_text_field=_compile(path, "doc_to_text", config.get("doc_to_text", ""), columns),
        doc_to_target_field=_compile(path, "doc_to_target", config.get("doc_to_target", ""),
                                     columns),
        doc_to_choice_field=(_compile(path, "doc_to_choice", config["doc_to_choice"], columns)
                             if has_choices else None),
        description_field=_description(path, config.get("description", ""), columns),
        target_delimiter=_string(path, config, "target_delimiter", " "),
        fewshot_delimiter=_string(path, config, "fewshot_delimiter", "\n\n"),
        num_fewshot=num_fewshot,
        metric_list=_metrics(path, config.get("metric_list"), output_type),
    )
    task.generation_kwargs = _generation_kwargs(path, config.get("generation_kwargs"), output_type,
                                                task.fewshot_delimiter)
    if task.num_fewshot:
        _check_fewshot_pool(task)
    _check_first_doc(task)
    return task


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as err:
        raise ImportError("task files need PyYAML: pip install pyyaml "
                          "(or pip install 'parallax[eval]')") from err
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise TaskError(path, f"<yaml line {line}>", f"{err.problem}: YAML tags such as !function "
                        "(Python callables) are not supported; use a field name or a Jinja "
                        "template") from err
    except yaml.YAMLError as err:
        raise TaskError(path, "<yaml>", f"is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise TaskError(path, "<top level>", f"expected a mapping of fields, got {type(config).__name__}")
    return config


def _check_keys(path: Path, config: dict[str, Any]) -> None:
    for key in config:
        if key in _UNSUPPORTED_KEYS:
            if key == "repeats" and config[key] == 1 or key == "dataset_name" and config[key] is None:
                continue
            raise TaskError(path, key, "is an lm-eval option parallax does not support")
        if key not in _USED_KEYS and key not in _HARMLESS_KEYS:
            raise TaskError(path, key, "unknown field; known fields: "
                            + ", ".join(sorted(_USED_KEYS | _HARMLESS_KEYS)))


def _load_splits(path: Path, config: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Read every split named in dataset_kwargs.data_files, as lm-eval's ``json`` dataset does."""
    if config.get("dataset_path") != "json":
        raise TaskError(path, "dataset_path",
                        f"expected 'json' (local JSON/JSONL files), got {config.get('dataset_path')!r}")
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        raise TaskError(path, "dataset_kwargs", "expected a mapping with 'data_files'")
    extra = set(kwargs) - {"data_files"}
    if extra:
        raise TaskError(path, f"dataset_kwargs.{sorted(extra)[0]}",
                        "is not supported (only data_files)")
    data_files = kwargs["data_files"]
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}  # datasets' rule for files given without split names
    if not isinstance(data_files, dict) or not data_files:
        raise TaskError(path, "dataset_kwargs.data_files",
                        "expected a file, a list of files, or a mapping split -> file(s)")
    splits = {}
    for split, files in data_files.items():
        name = f"dataset_kwargs.data_files.{split}"
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files) or not files:
            raise TaskError(path, name, "expected a file name or a list of file names")
        rows = [row for f in files for row in _read_rows(path, name, path.parent / f)]
        splits[str(split)] = _fill_missing_columns(rows)
    return splits


def _read_rows(path: Path, field_name: str, file: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or one JSON object per line (JSONL)."""
    if not file.is_file():
        raise TaskError(path, field_name, f"data file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
        rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TaskError(path, field_name,
                                f"{file} line {number} is not valid JSON: {err.msg}") from err
    if not all(isinstance(row, dict) for row in rows):
        raise TaskError(path, field_name, f"{file} must hold JSON objects (one document each)")
    return rows


def _fill_missing_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A datasets table has one column set per split: a key missing from a row reads as None."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return [{c: row.get(c) for c in columns} for row in rows]


def _choose_splits(path: Path, config: dict[str, Any],
                   splits: dict[str, list]) -> tuple[str, str]:
    """The evaluated split (test, else validation) and the few-shot split (fewshot_split, else
    training, validation, test: lm-eval's ``Task.fewshot_docs`` fallback)."""
    for name in _SPLIT_FIELDS:
        split = config.get(name)
        if split is not None and str(split) not in splits:
            raise TaskError(path, name, f"split '{split}' is not in dataset_kwargs.data_files "
                            f"(which has {', '.join(splits)})")
    eval_split = config.get("test_split") or config.get("validation_split")
    if eval_split is None:
        raise TaskError(path, "test_split", "set test_split (or validation_split) to the split "
                        "to evaluate")
    fewshot = next(config[k] for k in ("fewshot_split", "training_split", "validation_split",
                                       "test_split") if config.get(k) is not None)
    return str(eval_split), str(fewshot)


def _compile(path: Path, name: str, value: Any, columns: set[str]) -> _Field:
    """lm-eval's rule: a string naming a column reads it; any other string is a Jinja template.
    A plain string that is neither (no ``{{``/``{%``) is almost surely a misspelt column, so it
    is an error here rather than lm-eval's silent constant."""
    if not isinstance(value, str):
        # YAML literals lm-eval accepts: a choice index or list target, a list/dict of choices.
        literal_types = {"doc_to_target": (int, list), "doc_to_choice": (list, dict)}.get(name, ())
        if isinstance(value, bool) or not isinstance(value, literal_types):
            raise TaskError(path, name, f"expected a column name or a Jinja template, got {value!r}")
        return _Field(name, "literal", list(value.values()) if isinstance(value, dict) else value)
    if value in columns:
        return _Field(name, "column", value)
    if value == "" or "{{" in value or "{%" in value:
        return _Field(name, "template", value, _jinja_env().from_string(value))
    raise TaskError(path, name, f"{value!r} is not a column of the data ({', '.join(sorted(columns))}) "
                    "nor a Jinja template ({{column}})")


def _description(path: Path, value: Any, columns: set[str]) -> _Field | None:
    """lm-eval's ``resolve_field``: a column, else a template (plain text renders as itself)."""
    if not isinstance(value, str):
        raise TaskError(path, "description", f"expected a string, got {value!r}")
    if not value:
        return None
    if value in columns:
        return _Field("description", "column", value)
    return _Field("description", "template", value, _jinja_env().from_string(value))


_ENV = None


def _jinja_env():
    """lm-eval's Environment (StrictUndefined, keep_trailing_newline, regex_replace filter),
    sandboxed because task files may come from anywhere."""
    global _ENV
    if _ENV is None:
        try:
            from jinja2 import StrictUndefined
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as err:
            raise ImportError("task templates need jinja2: pip install 'jinja2>=3.1.6'") from err
        _ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        _ENV.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(
            pattern, repl, s, count=count)
    return _ENV


def _render(spec: _Field, doc: dict[str, Any], path: Path) -> str:
    from jinja2 import TemplateError, UndefinedError
    try:
        return spec.template.render(**doc)
    except UndefinedError as err:
        missing = re.search(r"'([^']+)' is undefined", str(err))
        what = (f"references column '{missing.group(1)}', which the data does not have "
                f"(columns: {', '.join(doc)})") if missing else f"failed: {err}"
        raise TaskError(path, spec.name, f"template {what}") from err
    except TemplateError as err:
        raise TaskError(path, spec.name, f"template failed: {err}") from err


def _string(path: Path, config: dict[str, Any], name: str, default: str | None) -> str | None:
    value = config.get(name, default)
    if value is not None and not isinstance(value, str):
        raise TaskError(path, name, f"expected a string, got {value!r}")
    return value


def _check_num_fewshot(value: Any, path: Path | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problem = f"expected an integer >= 0, got {value!r}"
        if path is None:
            raise ValueError(f"num_fewshot: {problem}")
        raise TaskError(path, "num_fewshot", problem)
    return value


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit: expected a number of documents >= 1, got {limit!r}")
    return limit


def _metrics(path: Path, value: Any, output_type: str) -> list[MetricSpec]:
    if value is None:
        return [MetricSpec(name) for name in DEFAULT_METRICS[output_type]]
    if not isinstance(value, list) or not value:
        raise TaskError(path, "metric_list", "expected a non-empty list of {metric: name, ...}")
    specs = []
    for i, entry in enumerate(value):
        where = f"metric_list[{i}]"
        if not isinstance(entry, dict) or "metric" not in entry:
            raise TaskError(path, where, f"expected a mapping with 'metric', got {entry!r}")
        metric = entry["metric"]
        if metric not in KNOWN_METRICS:
            raise TaskError(path, f"{where}.metric",
                            f"unknown metric {metric!r}; known: {', '.join(KNOWN_METRICS)}")
        aggregation = entry.get("aggregation")
        if aggregation is not None and not isinstance(aggregation, str):
            raise TaskError(path, f"{where}.aggregation", f"expected a name, got {aggregation!r}")
        higher = entry.get("higher_is_better")
        if higher is not None and not isinstance(higher, bool):
            raise TaskError(path, f"{where}.higher_is_better", f"expected true/false, got {higher!r}")
        kwargs = _metric_options(path, where, metric, {k: v for k, v in entry.items() if k not in _METRIC_KEYS})
        specs.append(MetricSpec(metric, aggregation, higher, kwargs))
    return specs


def _metric_options(path: Path, where: str, metric: str, options: dict[str, Any]) -> dict[str, Any]:
    """A metric's options, checked against what it takes; bertscore's model directory resolved
    from the task file's folder."""
    allowed = METRIC_OPTIONS.get(metric, frozenset())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TaskError(path, f"{where}.{unknown[0]}", f"metric {metric!r} takes "
                        + (", ".join(sorted(allowed)) if allowed else "no options"))
    if metric == "bertscore":
        if "model" not in options:
            raise TaskError(path, f"{where}.model", "bertscore needs a local encoder model directory")
        if not isinstance(options["model"], str):
            raise TaskError(path, f"{where}.model", f"expected a directory name, got {options['model']!r}")
        model_dir = path.parent / options["model"]  # absolute names stay absolute
        if not (model_dir / "config.json").is_file():
            raise TaskError(path, f"{where}.model", f"{model_dir} is not a model directory (no config.json)")
        options = {**options, "model": str(model_dir)}
    return options


def _generation_kwargs(path: Path, value: Any, output_type: str,
                       fewshot_delimiter: str) -> dict[str, Any] | None:
    """lm-eval's TaskConfig.__post_init__: temperature as a float, ``until`` defaulting to the
    few-shot delimiter, and greedy ``default_gen_kwargs`` when generate_until gives none."""
    if value is None:
        if output_type != "generate_until":
            return None
        return {"temperature": 0.0, "do_sample": False, "max_gen_toks": DEFAULT_MAX_GEN_TOKS,
                "until": [fewshot_delimiter]}
    if not isinstance(value, dict):
        raise TaskError(path, "generation_kwargs", f"expected a mapping, got {value!r}")
    unknown = set(value) - _GENERATION_KEYS
    if unknown:
        raise TaskError(path, f"generation_kwargs.{sorted(unknown)[0]}",
                        f"unknown key; known: {', '.join(sorted(_GENERATION_KEYS))}")
    if output_type != "generate_until":
        logger.warning("%s: generation_kwargs is ignored for output_type %s", path, output_type)
    kwargs = dict(value)
    until = kwargs.get("until", [fewshot_delimiter])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise TaskError(path, "generation_kwargs.until", f"expected strings, got {until!r}")
    kwargs["until"] = until
    if "temperature" in kwargs:
        kwargs["temperature"] = float(kwargs["temperature"])
    max_gen_toks = kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise TaskError(path, "generation_kwargs.max_gen_toks",
                        f"expected an integer >= 1, got {max_gen_toks!r}")
    return kwargs


def _check_fewshot_pool(task: Task) -> None:
    """lm-eval only drops the evaluated doc from its own examples when fewshot_split names the
    test split; a fallback onto the evaluated split would let a doc be its own example."""
    if task.fewshot_split == task.eval_split and not task.exclude_doc_from_fewshot:
        raise TaskError(task.path, "fewshot_split", f"few-shot examples would come from the "
                        f"evaluated split '{task.eval_split}'; set fewshot_split: "
                        f"{task.eval_split} explicitly so each document is left out of its own "
                        "examples, as lm-eval does")


def _check_first_doc(task: Task) -> None:
    """Render every field on the first document (lm-eval's "Test One Doc") so a bad template
    fails at load time, before any model work."""
    doc = task.docs[0]
    task._prompt_text(doc)
    target = task.doc_to_target(doc)
    if task.doc_to_choice_field is not None:
        task.doc_to_choice(doc)
    if task.output_type in ("loglikelihood", "loglikelihood_rolling"):
        task._target_text(doc, "doc_to_target")
    elif target not in (None, ""):
        task._answer_text(doc, target)
    if task.description_field is not None:
        task._resolve(task.description_field, doc)
