"""Evaluation metrics with lm-evaluation-harness's and the official SQuAD v1.1 script's definitions.

Three kinds of function live here:

- per-item scores: ``exact_match``/``f1`` (SQuAD v1.1), ``acc``/``acc_norm``/``acc_bytes``
  (multiple choice from the log-likelihood of each choice);
- aggregates over a list of items: ``mean``, ``perplexity``, ``weighted_perplexity``
  (``word_perplexity``, ``byte_perplexity``), ``bits_per_byte``, and the corpus metrics ``bleu``,
  ``chrf``, ``ter`` (``sacrebleu``) and ``rouge`` (``rouge-score``), and ``bertscore``
  (``bert-score``, per item, with a local model directory);
- standard errors: ``mean_stderr`` (closed form, for ``mean``) and ``bootstrap_stderr`` (every
  other aggregate); ``aggregate_stderr`` picks between them as lm-eval's ``stderr_for_metric`` does.

Scales: per-item scores, ``mean`` and ``rouge`` are in [0, 1]; ``bleu``, ``chrf`` and ``ter`` are
sacrebleu's 0-100 scores, as lm-eval reports them.

``sacrebleu``, ``rouge-score`` and ``bert-score`` are optional (``pip install 'parallax[eval]'``) and
imported only when their metric is called.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "normalize_answer", "exact_match", "f1",
    "acc", "acc_norm", "acc_bytes",
    "mean", "perplexity", "weighted_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
    "count_words", "count_bytes",
    "bleu", "chrf", "ter", "rouge", "bertscore",
    "mean_stderr", "bootstrap_stderr", "aggregate_stderr",
]

_EVAL_EXTRA_HINT = "pip install 'parallax[eval]'"


# --------------------------------------------------------------------------- SQuAD v1.1 EM / F1

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the,
    collapse whitespace (in that order, as the official script does)."""
    lowered = text.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    without_articles = _ARTICLES.sub(" ", without_punctuation)
    return " ".join(without_articles.split())


def _gold_list(gold_answers: str | Sequence[str]) -> list[str]:
    golds = [gold_answers] if isinstance(gold_answers, str) else list(gold_answers)
    if not golds:
        raise ValueError("gold_answers: expected a string or a non-empty list of strings, got an empty list")
    if not all(isinstance(gold, str) for gold in golds):
        raise TypeError(f"gold_answers: expected strings, got {[type(g).__name__ for g in golds]}")
    return golds


def _check_prediction(prediction: str) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction: expected a string, got {type(prediction).__name__}")


def _token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    # v1.1 semantics: no overlap (including both sides empty) scores 0, unlike SQuAD v2's 1.
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold_answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0 (SQuAD v1.1)."""
    _check_prediction(prediction)
    normalized = normalize_answer(prediction)
    return max(float(normalized == normalize_answer(gold)) for gold in _gold_list(gold_answers))


def f1(prediction: str, gold_answers: str | Sequence[str]) -> float:
    """Token-level F1 of the normalised prediction, best over the gold answers (SQuAD v1.1)."""
    _check_prediction(prediction)
    return max(_token_f1(prediction, gold) for gold in _gold_list(gold_answers))


# --------------------------------------------------------------------------- multiple choice

def _argmax_in_gold(scores: np.ndarray, gold: int | Sequence[int], num_choices: int) -> float:
    golds = [gold] if isinstance(gold, (int, np.integer)) else list(gold)
    if not golds or not all(0 <= int(g) < num_choices for g in golds):
        raise ValueError(f"gold: expected choice indices in [0, {num_choices}), got {gold!r}")
    # np.argmax takes the first of tied maxima, as lm-eval's process_results does.
    return 1.0 if int(np.argmax(scores)) in {int(g) for g in golds} else 0.0


def _loglikelihood_array(loglikelihoods: Sequence[float]) -> np.ndarray:
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    if lls.ndim != 1 or lls.size == 0:
        raise ValueError(f"loglikelihoods: expected a non-empty list of floats, got shape {lls.shape}")
    return lls


def _choice_lengths(choices: Sequence[str], num_choices: int, length: Callable[[str], int]) -> np.ndarray:
    if isinstance(choices, str) or len(choices) != num_choices:
        raise ValueError(f"choices: expected {num_choices} strings (one per log-likelihood), got {choices!r}")
    lengths = np.array([float(length(choice)) for choice in choices])
    if (lengths == 0).any():
        raise ValueError(f"choices: empty choice strings cannot be length-normalised: {choices!r}")
    return lengths


def acc(loglikelihoods: Sequence[float], gold: int | Sequence[int]) -> float:
    """1.0 when the choice with the highest log-likelihood is (one of) the gold index(es).

    Matches lm-eval's ``ConfigurableTask.process_results`` for ``multiple_choice``: ``pred = np.argmax(lls)``.
    """
    lls = _loglikelihood_array(loglikelihoods)
    return _argmax_in_gold(lls, gold, lls.size)


def acc_norm(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]) -> float:
    """``acc`` on log-likelihoods divided by each choice's length in characters.

    Matches lm-eval's ``process_results``: ``completion_len = [float(len(c)) for c in choices]``,
    ``pred_norm = np.argmax(lls / completion_len)``.
    """
    lls = _loglikelihood_array(loglikelihoods)
    return _argmax_in_gold(lls / _choice_lengths(choices, lls.size, len), gold, lls.size)


def acc_bytes(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]) -> float:
    """``acc`` on log-likelihoods divided by each choice's length in UTF-8 bytes (lm-eval's ``acc_bytes``)."""
    lls = _loglikelihood_array(loglikelihoods)
    return _argmax_in_gold(lls / _choice_lengths(choices, lls.size, count_bytes), gold, lls.size)


# --------------------------------------------------------------------------- aggregates

def _check_items(items: Sequence[Any], minimum: int = 1) -> None:
    if len(items) < minimum:
        raise ValueError(f"items: expected at least {minimum} item(s), got {len(items)}")


def mean(items: Sequence[float]) -> float:
    """Arithmetic mean (lm-eval's ``mean`` aggregation, used by acc, acc_norm, exact_match, f1)."""
    _check_items(items)
    return sum(items) / len(items)


def perplexity(items: Sequence[float]) -> float:
    """exp(-mean log-likelihood) over items (lm-eval's ``perplexity`` aggregation, ``loglikelihood`` tasks)."""
    return math.exp(-mean(items))


def _weighted_mean(items: Sequence[tuple[float, float]]) -> float:
    _check_items(items)
    loglikelihoods, weights = zip(*items)
    total_weight = sum(weights)
    if total_weight <= 0:
        raise ValueError(f"items: expected (loglikelihood, count) pairs with a positive total count, got {total_weight}")
    return sum(loglikelihoods) / total_weight


def weighted_perplexity(items: Sequence[tuple[float, float]]) -> float:
    """exp(-sum(log-likelihood) / sum(count)) over (log-likelihood, count) pairs.

    lm-eval's ``weighted_perplexity`` (``word_perplexity`` with count = ``count_words(doc)``,
    ``byte_perplexity`` with count = ``count_bytes(doc)``).
    """
    return math.exp(-_weighted_mean(items))


word_perplexity = weighted_perplexity
byte_perplexity = weighted_perplexity


def bits_per_byte(items: Sequence[tuple[float, float]]) -> float:
    """-sum(log-likelihood) / sum(bytes) / ln 2 over (log-likelihood, count_bytes(doc)) pairs (lm-eval's)."""
    return -_weighted_mean(items) / math.log(2)


def count_words(doc: str) -> int:
    """Words as lm-eval counts them for ``word_perplexity``: ``len(re.split(r"\\s+", doc))``."""
    return len(re.split(r"\s+", doc))


def count_bytes(doc: str) -> int:
    """UTF-8 bytes, as lm-eval counts them for ``byte_perplexity`` and ``bits_per_byte``."""
    return len(doc.encode("utf-8"))


# --------------------------------------------------------------------------- corpus metrics

def _reference_lists(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Validate and return one non-empty list of reference strings per prediction."""
    if isinstance(predictions, str) or not all(isinstance(p, str) for p in predictions):
        raise TypeError("predictions: expected a list of strings")
    if len(predictions) == 0:
        raise ValueError("predictions: expected at least one prediction, got an empty list")
    if isinstance(references, str) or len(references) != len(predictions):
        raise ValueError(f"references: expected one entry per prediction ({len(predictions)}), got "
                         f"{'a string' if isinstance(references, str) else len(references)}")
    per_item = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    for index, refs in enumerate(per_item):
        if not refs or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"references[{index}]: expected a string or a non-empty list of strings, got {refs!r}")
    return per_item


def _sacrebleu_streams(per_item: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-prediction reference lists into sacrebleu's reference streams.

    sacrebleu wants ``refs[k][i]`` = k-th reference of prediction i; items with fewer references
    are padded with None, which sacrebleu skips (variable number of references per segment).
    """
    num_streams = max(len(refs) for refs in per_item)
    return [[refs[k] if k < len(refs) else None for refs in per_item] for k in range(num_streams)]


def _import_sacrebleu():
    try:
        import sacrebleu
    except ImportError as error:
        raise ImportError(f"bleu/chrf/ter need sacrebleu: {_EVAL_EXTRA_HINT}") from error
    return sacrebleu


def _corpus_score(name: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    streams = _sacrebleu_streams(_reference_lists(predictions, references))
    corpus_fn = getattr(_import_sacrebleu(), f"corpus_{name}")
    return float(corpus_fn(list(predictions), streams).score)


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (default settings, 0-100), as lm-eval's ``bleu`` aggregation.

    ``references[i]`` is the reference (or list of references) of ``predictions[i]``.
    """
    return _corpus_score("bleu", predictions, references)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu's corpus chrF (default settings, 0-100); references as in ``bleu``."""
    return _corpus_score("chrf", predictions, references)


def ter(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu's corpus TER (default settings, 0-100, lower is better); references as in ``bleu``."""
    return _corpus_score("ter", predictions, references)


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL"), use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE F-measures from ``rouge-score``, averaged over items, in [0, 1].

    Each item scores against its best reference (``RougeScorer.score_multi``: the reference with the
    highest F-measure, per type), as lm-eval's tasks take the max over references. ``use_stemmer``
    defaults to False, ``RougeScorer``'s own default and what lm-eval's tasks use.
    """
    per_item = _reference_lists(predictions, references)
    if isinstance(types, str) or not types:
        raise ValueError(f"types: expected a non-empty list such as ('rouge1', 'rougeL'), got {types!r}")
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError(f"rouge needs rouge-score: {_EVAL_EXTRA_HINT}") from error
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(types, 0.0)
    for prediction, refs in zip(predictions, per_item):
        scores = scorer.score_multi(refs, prediction)
        for rouge_type in types:
            totals[rouge_type] += scores[rouge_type].fmeasure
    return {rouge_type: total / len(per_item) for rouge_type, total in totals.items()}


def bertscore(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, model: str | Path,
              num_layers: int | None = None, idf: bool = False, batch_size: int = 64,
              device: str | None = None) -> dict[str, list[float]]:
    """BERTScore (Zhang et al. 2020) of each prediction through ``bert-score``:
    ``{"precision": [...], "recall": [...], "f1": [...]}``, one value per prediction, in [-1, 1].

    model: a local Hugging Face encoder directory (config, weights, tokenizer); nothing is
    downloaded. num_layers: the hidden layer whose token embeddings are matched (default: the
    model's last). idf: weight tokens by inverse document frequency over the references. With
    several references a prediction takes its best one (``BERTScorer.score``'s rule). No baseline
    rescaling: bert-score's baselines are per published model, not per local directory.
    """
    per_item = _reference_lists(predictions, references)
    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise ValueError(f"model: expected a local Hugging Face model directory with config.json, got {str(model)!r}")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0):
        raise ValueError(f"num_layers: expected a layer index >= 0, got {num_layers!r}")
    try:
        from bert_score import BERTScorer
    except ImportError as error:
        raise ImportError(f"bertscore needs bert-score: {_EVAL_EXTRA_HINT}") from error
    config = json.loads((directory / "config.json").read_text())
    if num_layers is None:
        num_layers = int(config["num_hidden_layers"])
    scorer = BERTScorer(model_type=str(directory), num_layers=num_layers, batch_size=batch_size, idf=idf,
                        idf_sents=[ref for refs in per_item for ref in refs] if idf else None,
                        device=device)
    # bert-score truncates at the tokenizer's model_max_length, which a directory whose tokenizer
    # config does not set it leaves at 1e30 (an OverflowError in the tokenizer): cap it at the
    # encoder's positions.
    positions = config.get("max_position_embeddings")
    if positions and scorer._tokenizer.model_max_length > positions:
        scorer._tokenizer.model_max_length = positions
    precision, recall, f1_score = scorer.score(list(predictions), per_item, batch_size=batch_size)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1_score.tolist()}


# --------------------------------------------------------------------------- standard errors

def _sample_stdev(values: Sequence[float]) -> float:
    center = sum(values) / len(values)
    return math.sqrt(sum((v - center) ** 2 for v in values) / (len(values) - 1))


def mean_stderr(items: Sequence[float]) -> float:
    """Closed-form standard error of ``mean``: sample stdev / sqrt(n) (lm-eval's ``mean_stderr``)."""
    _check_items(items, minimum=2)
    return _sample_stdev(items) / math.sqrt(len(items))


_BOOTSTRAP_CHUNK = 1000


def bootstrap_stderr(metric_fn: Callable[[Sequence[Any]], float], items: Sequence[Any],
                     iters: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of ``metric_fn(items)``: resample ``items`` with replacement
    ``iters`` times, recompute the aggregate, return the sample stdev of the replicates.

    Draws as lm-eval's ``bootstrap_stderr`` does: chunks of 1000 replicates, chunk ``c`` from
    ``random.Random(seed + c)`` with ``rng.choices(items, k=len(items))``; with ``seed=0`` and
    ``iters`` a multiple of 1000 (or below 1000) the replicates are lm-eval's. For corpus metrics
    make items the (prediction, references) pairs, e.g.
    ``bootstrap_stderr(lambda xs: bleu(*zip(*xs)), list(zip(predictions, references)))``.
    """
    _check_items(items)
    if iters < 2:
        raise ValueError(f"iters: expected at least 2 bootstrap resamples, got {iters}")
    population = list(items)
    replicates: list[float] = []
    for chunk_index in range(math.ceil(iters / _BOOTSTRAP_CHUNK)):
        rng = random.Random(seed + chunk_index)
        draws = min(_BOOTSTRAP_CHUNK, iters - len(replicates))
        replicates.extend(metric_fn(rng.choices(population, k=len(population))) for _ in range(draws))
    return _sample_stdev(replicates)


def aggregate_stderr(aggregation: Callable[[Sequence[Any]], float], items: Sequence[Any],
                     iters: int = 1000, seed: int = 0) -> float:
    """Standard error of ``aggregation(items)``, chosen as lm-eval's ``stderr_for_metric`` does:
    the closed form ``mean_stderr`` for ``mean`` (acc, acc_norm, acc_bytes, exact_match, f1, rouge
    per item), a bootstrap for every other aggregate (perplexity, bleu, chrf, ter, ...).

    lm-eval reports no stderr for ``weighted_perplexity`` and ``bits_per_byte``; parallax bootstraps them.
    """
    if aggregation is mean:
        return mean_stderr(items)
    return bootstrap_stderr(aggregation, items, iters=iters, seed=seed)
