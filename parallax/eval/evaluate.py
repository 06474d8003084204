"""``evaluate``: run task files on a parallax model and score them with lm-eval's definitions.

Each task's requests (``Task.build_requests``) go to ``ParallaxLM`` grouped by type, so every
log-likelihood request of a task is one batched, deduplicated scoring pass and every generation
one continuous batch in the paged engine. Per-document scores follow lm-eval's
``ConfigurableTask.process_results``; aggregates and their standard errors follow
``lm_eval/api/metrics.py`` (closed form for means, seeded bootstrap otherwise).

Metric names in ``metric_list`` and what they compute:

* ``acc`` / ``acc_norm`` / ``acc_bytes`` (multiple_choice): argmax of the choices' log-likelihoods,
  raw / divided by the choice's length in characters / in UTF-8 bytes; ``acc`` for
  ``loglikelihood`` tasks is whether the continuation is the greedy one.
* ``perplexity`` (loglikelihood), ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``
  (loglikelihood_rolling, counted on ``doc_to_target``).
* ``exact_match`` (generate_until): lm-eval's (Hugging Face ``evaluate``'s) string equality,
  with the metric's ``ignore_case``, ``ignore_punctuation``, ``ignore_numbers`` and
  ``regexes_to_ignore`` options; ``f1``: SQuAD v1.1 token F1 (best over the gold answers),
  ``squad_exact_match``: SQuAD v1.1 normalised exact match.
* ``bleu`` / ``chrf`` / ``ter`` (sacrebleu corpus scores), ``rouge1`` / ``rouge2`` / ``rougeL``
  (rouge-score F-measure, mean over documents), ``bertscore`` (bert-score F1, mean over
  documents; options ``model`` (a local encoder directory, relative to the task file),
  ``num_layers``, ``idf``, ``batch_size``).
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from parallax.eval import metrics as M
from parallax.eval.lm import ParallaxLM
from parallax.eval.tasks import Task, load_task

__all__ = ["evaluate", "evaluate_task"]

log = logging.getLogger(__name__)

# the metrics each output type can compute
APPLICABLE: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match", "f1", "squad_exact_match", "bleu", "chrf", "ter", "rouge1", "rouge2", "rougeL", "bertscore"),
}


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str | Path | Task], *, num_fewshot: int | None = None,
             limit: int | None = None, batch_size: int = 8, seed: int = 1234,
             bootstrap_iters: int = 1000, progress: bool = False) -> dict[str, Any]:
    """Scores of ``model`` on each task: ``{"results": {task: {metric: value, metric_stderr: se}},
    "n_samples": {task: documents}}``.

    tasks: task YAML files (or loaded ``Task``s). num_fewshot overrides each task's; limit
    evaluates the first N documents; seed draws the few-shot examples (lm-eval's default 1234);
    progress: tqdm bars over each task's requests.
    """
    lm = model if isinstance(model, ParallaxLM) else ParallaxLM(model, tokenizer, batch_size=batch_size,
                                                                  progress=progress)
    results, counts = {}, {}
    for spec in tasks:
        task = spec if isinstance(spec, Task) else load_task(spec)
        if task.name in results:
            raise ValueError(f"tasks: {task.name!r} is given twice")
        results[task.name], counts[task.name] = evaluate_task(lm, task, num_fewshot=num_fewshot, limit=limit,
                                                              seed=seed, bootstrap_iters=bootstrap_iters)
    return {"results": results, "n_samples": counts}


def evaluate_task(lm: ParallaxLM, task: Task, *, num_fewshot: int | None = None, limit: int | None = None,
                  seed: int = 1234, bootstrap_iters: int = 1000) -> tuple[dict[str, float], int]:
    """({metric: value, metric_stderr: se}, number of documents) of one task."""
    for spec in task.metric_list:  # before any model work
        if spec.metric not in APPLICABLE[task.output_type]:
            raise ValueError(f"{task.path}: metric {spec.metric!r} does not apply to output_type "
                             f"{task.output_type!r} (it takes {', '.join(APPLICABLE[task.output_type])})")
    requests = task.build_requests(limit=limit, num_fewshot=num_fewshot, seed=seed)
    log.info("eval: %s: %d requests", task.name, len(requests))
    outputs = _run(lm, requests)
    per_doc: dict[int, list] = {}
    for request, output in zip(requests, outputs):
        per_doc.setdefault(request.doc_index, []).append(output)
    docs = [task.docs[i] for i in sorted(per_doc)]
    scores: dict[str, float] = {}
    for spec in task.metric_list:
        values = [_per_document(spec.metric, task, doc, per_doc[i], spec.kwargs)
                  for i, doc in zip(sorted(per_doc), docs)]
        if spec.metric == "bertscore":  # one batched pass of the encoder over every document
            values = M.bertscore([p for p, _ in values], [r for _, r in values], **spec.kwargs)["f1"]
        aggregate = _AGGREGATES[spec.metric]
        scores[spec.metric] = float(aggregate(values))
        scores[f"{spec.metric}_stderr"] = float(M.aggregate_stderr(aggregate, values, iters=bootstrap_iters))
    log.info("eval: %s: %s", task.name, {k: round(v, 4) for k, v in scores.items()})
    return scores, len(docs)


def _run(lm: ParallaxLM, requests: list) -> list:
    """Every request's output, in order: (loglikelihood, greedy), a rolling loglikelihood, or text."""
    outputs: list = [None] * len(requests)
    by_type: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_type.setdefault(r.request_type, []).append(i)
    calls = {"loglikelihood": lambda args: lm.loglikelihood([a for a in args]),
             "loglikelihood_rolling": lambda args: lm.loglikelihood_rolling([a[0] for a in args]),
             "generate_until": lambda args: lm.generate_until([a for a in args])}
    for kind, indices in by_type.items():
        for i, out in zip(indices, calls[kind]([requests[i].arguments for i in indices])):
            outputs[i] = out
    return outputs


# -- per-document values -----------------------------------------------------------------------


def _gold_index(task: Task, doc: dict, choices: list[str]) -> int | list[int]:
    gold = task.doc_to_target(doc)
    if isinstance(gold, str):
        return choices.index(gold)  # lm-eval: a string target names the choice
    return gold


def _per_document(metric: str, task: Task, doc: dict, outputs: list, kwargs: dict[str, Any]) -> Any:
    kind = task.output_type
    if kind == "multiple_choice":
        choices = task.doc_to_choice(doc)
        lls = [ll for ll, _ in outputs]
        gold = _gold_index(task, doc, choices)
        if metric == "acc":
            return M.acc(lls, gold)
        if metric == "acc_norm":
            return M.acc_norm(lls, choices, gold)
        if metric == "acc_bytes":
            return M.acc_bytes(lls, choices, gold)
    elif kind == "loglikelihood":
        (ll, greedy), = outputs
        if metric == "perplexity":
            return ll
        if metric == "acc":
            return float(greedy)
    elif kind == "loglikelihood_rolling":
        (ll,) = outputs
        text = task.doc_to_target(doc)
        if metric == "word_perplexity":
            return (ll, M.count_words(text))
        if metric in ("byte_perplexity", "bits_per_byte"):
            return (ll, M.count_bytes(text))
    else:
        (prediction,) = outputs
        gold = task.doc_to_target(doc)
        golds = [gold] if isinstance(gold, str) else [str(g) for g in gold]
        if metric == "exact_match":
            return max(_hf_exact_match(prediction, g, **kwargs) for g in golds)
        if metric == "f1":
            return M.f1(prediction, golds)
        if metric == "squad_exact_match":
            return M.exact_match(prediction, golds)
        if metric in ("bleu", "chrf", "ter", "rouge1", "rouge2", "rougeL", "bertscore"):
            return (prediction, golds)
    raise AssertionError(f"{metric} for {kind} passed APPLICABLE")  # evaluate_task checked it


def _hf_exact_match(prediction: str, reference: str, *, regexes_to_ignore: Sequence[str] | None = None,
                    ignore_case: bool = False, ignore_punctuation: bool = False, ignore_numbers: bool = False) -> float:
    """lm-eval's ``exact_match_hf_evaluate`` for one pair."""
    for pattern in regexes_to_ignore or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for chars, skip in ((string.punctuation, ignore_punctuation), (string.digits, ignore_numbers)):
        if skip:
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def _corpus(fn: Callable[[list[str], list[list[str]]], float]) -> Callable[[list], float]:
    return lambda items: fn([p for p, _ in items], [r for _, r in items])


_AGGREGATES: dict[str, Callable[[list], float]] = {
    "acc": M.mean, "acc_norm": M.mean, "acc_bytes": M.mean, "exact_match": M.mean, "f1": M.mean,
    "squad_exact_match": M.mean, "perplexity": M.perplexity, "word_perplexity": M.weighted_perplexity,
    "byte_perplexity": M.weighted_perplexity, "bits_per_byte": M.bits_per_byte,
    "bertscore": M.mean, "bleu": _corpus(M.bleu), "chrf": _corpus(M.chrf), "ter": _corpus(M.ter),
    **{name: _corpus(lambda p, r, name=name: M.rouge(p, r, types=(name,))[name])
       for name in ("rouge1", "rouge2", "rougeL")},
}
