"""Evaluation: metrics with lm-evaluation-harness's and the official SQuAD v1.1 script's definitions.

    px.eval.exact_match("The Eiffel Tower!", ["eiffel tower"])        # 1.0
    px.eval.f1("in Paris, France", ["Paris"])                          # 0.5
    px.eval.acc_norm([-4.2, -9.1], ["yes", "certainly"], gold=1)      # 1.0
    px.eval.bleu(["the cat sat"], [["the cat sat down", "a cat sat"]])  # sacrebleu corpus BLEU
"""

from parallax.eval.metrics import (
    acc,
    acc_bytes,
    acc_norm,
    aggregate_stderr,
    bits_per_byte,
    bleu,
    bootstrap_stderr,
    byte_perplexity,
    chrf,
    count_bytes,
    count_words,
    exact_match,
    f1,
    mean,
    mean_stderr,
    normalize_answer,
    perplexity,
    rouge,
    ter,
    weighted_perplexity,
    word_perplexity,
)

__all__ = [
    "acc", "acc_bytes", "acc_norm", "aggregate_stderr", "bits_per_byte", "bleu", "bootstrap_stderr",
    "byte_perplexity", "chrf", "count_bytes", "count_words", "exact_match", "f1", "mean", "mean_stderr",
    "normalize_answer", "perplexity", "rouge", "ter", "weighted_perplexity", "word_perplexity",
]
