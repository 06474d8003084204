"""px.eval metrics against their references: the official SQuAD v1.1 script's functions
(re-implemented below), sacrebleu, rouge-score, and lm-eval's formulas worked out by hand."""

import math
import random
import re
import string
import subprocess
import sys
from collections import Counter

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

import parallax as px


# --------------------------------------------------------------------------- SQuAD v1.1 reference
# The official evaluate-v1.1.py functions, re-implemented step by step.

def _squad_normalize(s):
    lowered = s.lower()
    exclude = set(string.punctuation)
    no_punc = "".join(ch for ch in lowered if ch not in exclude)
    no_articles = re.sub(r"\b(a|an|the)\b", " ", no_punc)
    return " ".join(no_articles.split())


def _squad_f1(prediction, ground_truth):
    prediction_tokens = _squad_normalize(prediction).split()
    ground_truth_tokens = _squad_normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _squad_em(prediction, ground_truth):
    return _squad_normalize(prediction) == _squad_normalize(ground_truth)


def _squad_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


SQUAD_FIXTURE = [
    ("The Eiffel Tower!", ["Eiffel tower", "the tower in Paris"]),
    ("  an APPLE, a day...  ", ["apple day"]),
    ("Paris, France", ["Paris", "France, Paris", "Lyon"]),
    ("Café Müller", ["café müller."]),
    ("ÉCOLE normale", ["école Normale supérieure"]),
    ("", ["anything at all"]),
    ("the", ["a"]),                       # both empty after normalisation
    ("a an the", ["!!!", "the answer"]),
    ("1,000 people", ["1000 people", "about a thousand"]),
    ("the the cat cat", ["the cat"]),     # repeated tokens: Counter overlap, not set overlap
    ("theatre", ["the atre"]),            # articles only as whole words
    ("rock-n-roll", ["rock n roll", "rocknroll"]),
]


@pytest.mark.parametrize("prediction,golds", SQUAD_FIXTURE)
def test_exact_match_and_f1_equal_official_squad_v11(prediction, golds):
    assert px.eval.exact_match(prediction, golds) == float(
        _squad_max_over_ground_truths(_squad_em, prediction, golds))
    assert px.eval.f1(prediction, golds) == _squad_max_over_ground_truths(_squad_f1, prediction, golds)


def test_squad_known_values():
    assert px.eval.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert px.eval.f1("Paris, France", ["Lyon", "Paris"]) == pytest.approx(2 / 3)
    # v1.1: both sides empty after normalisation is an exact match but scores F1 0.
    assert px.eval.exact_match("the", "a") == 1.0
    assert px.eval.f1("the", "a") == 0.0
    assert px.eval.f1("", ["x"]) == 0.0
    assert px.eval.f1("the the cat cat", "the cat") == pytest.approx(2 / 3)


_WORDS = st.sampled_from(["the", "A", "an", "The", "cat", "Cat.", "sat", "!", ",", "é", "Ünïcode", "", "  ", "\t",
                          "an-", "theatre", "1,000", "¿qué?"])
_TEXT = st.one_of(st.lists(_WORDS, max_size=8).map(" ".join), st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(prediction=_TEXT, golds=st.lists(_TEXT, min_size=1, max_size=3))
def test_squad_metrics_match_reference_on_random_strings(prediction, golds):
    assert px.eval.normalize_answer(prediction) == _squad_normalize(prediction)
    assert px.eval.exact_match(prediction, golds) == float(_squad_max_over_ground_truths(_squad_em, prediction, golds))
    assert px.eval.f1(prediction, golds) == _squad_max_over_ground_truths(_squad_f1, prediction, golds)


# --------------------------------------------------------------------------- corpus metrics

PREDICTIONS = [
    "the cat is sitting on the mat today",
    "a quick brown fox jumps over a lazy dog",
    "we will meet again next week in the city",
]
REFERENCES = [  # two per prediction, deliberately unlike each other so a wrong transposition shows
    ["the cat sat on the mat today", "today a cat is sitting on a mat"],
    ["the quick brown fox jumped over the lazy dog", "a fast fox leaps over a sleepy dog"],
    ["we shall meet again in the city next week", "see you next week in town"],
]
# sacrebleu's layout written out by hand: stream k holds the k-th reference of every prediction.
REFERENCE_STREAMS = [
    ["the cat sat on the mat today", "the quick brown fox jumped over the lazy dog",
     "we shall meet again in the city next week"],
    ["today a cat is sitting on a mat", "a fast fox leaps over a sleepy dog", "see you next week in town"],
]


@pytest.mark.parametrize("name", ["bleu", "chrf", "ter"])
def test_corpus_metrics_equal_sacrebleu_with_several_references(name):
    ours = getattr(px.eval, name)(PREDICTIONS, REFERENCES)
    theirs = getattr(sacrebleu, f"corpus_{name}")(PREDICTIONS, REFERENCE_STREAMS).score
    assert ours == theirs
    single = getattr(px.eval, name)(PREDICTIONS, [refs[0] for refs in REFERENCES])
    assert single == getattr(sacrebleu, f"corpus_{name}")(PREDICTIONS, REFERENCE_STREAMS[:1]).score


def test_bleu_with_a_variable_number_of_references():
    references = [REFERENCES[0], REFERENCES[1][:1], REFERENCES[2]]
    streams = [REFERENCE_STREAMS[0], [REFERENCE_STREAMS[1][0], None, REFERENCE_STREAMS[1][2]]]
    assert px.eval.bleu(PREDICTIONS, references) == sacrebleu.corpus_bleu(PREDICTIONS, streams).score


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score_best_reference_mean(use_stemmer):
    types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    expected = {}
    for rouge_type in types:
        per_item = [max(scorer.score(ref, pred)[rouge_type].fmeasure for ref in refs)
                    for pred, refs in zip(PREDICTIONS, REFERENCES)]
        expected[rouge_type] = sum(per_item) / len(per_item)
    ours = px.eval.rouge(PREDICTIONS, REFERENCES, types=types, use_stemmer=use_stemmer)
    assert ours.keys() == expected.keys()
    for rouge_type in types:
        assert ours[rouge_type] == pytest.approx(expected[rouge_type], rel=1e-12, abs=0)


def test_missing_optional_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'parallax[eval]'")):
        px.eval.bleu(PREDICTIONS, REFERENCES)
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'parallax[eval]'")):
        px.eval.rouge(PREDICTIONS, REFERENCES)


def test_importing_parallax_eval_does_not_import_the_optional_libraries():
    code = ("import sys, parallax.eval; "
            "print(sorted(m for m in ('sacrebleu', 'rouge_score', 'yaml', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "sacrebleu" not in out and "rouge_score" not in out


# --------------------------------------------------------------------------- lm-eval per-item metrics

def test_acc_acc_norm_acc_bytes_by_hand():
    lls = [-5.0, -6.0, -7.0]
    choices = ["a", "bbbbbbbb", "cc"]
    assert px.eval.acc(lls, 0) == 1.0                     # argmax of -5, -6, -7
    assert px.eval.acc_norm(lls, choices, 1) == 1.0       # -5/1, -6/8 = -0.75, -7/2
    assert px.eval.acc_norm(lls, choices, 0) == 0.0
    assert px.eval.acc(lls, [2, 0]) == 1.0                # several gold indices: any of them
    # characters vs UTF-8 bytes: "é" is 1 character but 2 bytes.
    lls, choices = [-3.0, -4.0], ["é", "ab"]
    assert px.eval.acc_norm(lls, choices, 1) == 1.0       # -3/1 vs -4/2
    assert px.eval.acc_bytes(lls, choices, 0) == 1.0      # -3/2 vs -4/2
    assert px.eval.acc([-1.0, -1.0], 0) == 1.0            # ties: the first choice, as np.argmax


def test_perplexity_aggregations_by_hand():
    assert px.eval.perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
    pairs = [(-4.0, 2), (-2.0, 4)]                         # sum ll -6 over 6 words/bytes
    assert px.eval.word_perplexity(pairs) == pytest.approx(math.e)
    assert px.eval.byte_perplexity(pairs) == pytest.approx(math.e)
    assert px.eval.bits_per_byte(pairs) == pytest.approx(1 / math.log(2))
    assert px.eval.count_words("hello  world\nfoo") == 3
    assert px.eval.count_words(" lead") == 2               # lm-eval's re.split counts the empty lead
    assert px.eval.count_bytes("héllo") == 6
    assert px.eval.mean([1.0, 0.0, 0.0, 1.0]) == 0.5


# --------------------------------------------------------------------------- standard errors

def _lm_eval_bootstrap_replicates(fn, xs, iters):
    """lm-eval's single-process bootstrap loop: chunk i drawn from random.Random(i)."""
    chunk = min(1000, iters)
    replicates = []
    for i in range(iters // chunk):
        rnd = random.Random(i)
        replicates.extend(fn(rnd.choices(xs, k=len(xs))) for _ in range(chunk))
    return replicates


def test_bootstrap_stderr_reproducible_and_lm_eval_draws():
    items = [float(v) for v in random.Random(7).choices([0, 1], weights=[7, 3], k=80)]
    first = px.eval.bootstrap_stderr(px.eval.mean, items, iters=2000, seed=0)
    assert first == px.eval.bootstrap_stderr(px.eval.mean, items, iters=2000, seed=0)
    assert first != px.eval.bootstrap_stderr(px.eval.mean, items, iters=2000, seed=1)
    replicates = _lm_eval_bootstrap_replicates(px.eval.mean, items, 2000)
    center = sum(replicates) / len(replicates)
    expected = math.sqrt(sum((r - center) ** 2 for r in replicates) / (len(replicates) - 1))
    assert first == pytest.approx(expected, rel=1e-12)


def test_bootstrap_stderr_of_a_mean_is_close_to_the_closed_form():
    items = [float(v) for v in random.Random(3).choices([0, 1], k=200)]
    closed = px.eval.mean_stderr(items)
    n = len(items)
    sample_sd = math.sqrt(sum((x - sum(items) / n) ** 2 for x in items) / (n - 1))
    assert closed == pytest.approx(sample_sd / math.sqrt(n))
    assert px.eval.bootstrap_stderr(px.eval.mean, items, iters=1000, seed=0) == pytest.approx(closed, rel=0.1)


def test_aggregate_stderr_picks_closed_form_for_mean_and_bootstrap_otherwise():
    items = [-1.0, -2.5, -0.5, -3.0, -1.5]
    assert px.eval.aggregate_stderr(px.eval.mean, items) == px.eval.mean_stderr(items)
    assert px.eval.aggregate_stderr(px.eval.perplexity, items, iters=200, seed=4) == \
        px.eval.bootstrap_stderr(px.eval.perplexity, items, iters=200, seed=4)
    pairs = list(zip(PREDICTIONS, REFERENCES))
    stderr = px.eval.bootstrap_stderr(lambda xs: px.eval.bleu(*zip(*xs)), pairs, iters=20, seed=0)
    assert stderr > 0


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,error,argument", [
    (lambda: px.eval.exact_match("x", []), ValueError, "gold_answers"),
    (lambda: px.eval.f1(None, "x"), TypeError, "prediction"),
    (lambda: px.eval.f1("x", [1]), TypeError, "gold_answers"),
    (lambda: px.eval.bleu(["a", "b"], [["a"]]), ValueError, "references"),
    (lambda: px.eval.chrf([], []), ValueError, "predictions"),
    (lambda: px.eval.ter(["a", "b"], ["a", []]), ValueError, r"references\[1\]"),
    (lambda: px.eval.rouge(["a"], ["a"], types=()), ValueError, "types"),
    (lambda: px.eval.acc([], 0), ValueError, "loglikelihoods"),
    (lambda: px.eval.acc([-1.0], 3), ValueError, "gold"),
    (lambda: px.eval.acc_norm([-1.0, -2.0], ["a"], 0), ValueError, "choices"),
    (lambda: px.eval.acc_bytes([-1.0, -2.0], ["a", ""], 0), ValueError, "choices"),
    (lambda: px.eval.perplexity([]), ValueError, "items"),
    (lambda: px.eval.bits_per_byte([(-1.0, 0)]), ValueError, "items"),
    (lambda: px.eval.mean_stderr([1.0]), ValueError, "items"),
    (lambda: px.eval.bootstrap_stderr(px.eval.mean, [1.0, 2.0], iters=1), ValueError, "iters"),
    (lambda: px.eval.bootstrap_stderr(px.eval.mean, []), ValueError, "items"),
])
def test_bad_input_names_the_argument(call, error, argument):
    with pytest.raises(error, match=argument):
        call()
