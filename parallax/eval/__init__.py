"""Evaluation: task files with lm-evaluation-harness's vocabulary, scored on any parallax model
with lm-eval's definitions (``evaluate``, ``ParallaxLM``), and the metrics (lm-eval's and the
official SQuAD v1.1 script's).

    px.eval.evaluate(model, tokenizer, tasks=["path/task.yaml"])     # {"results": {task: {metric: value}}}

    px.eval.exact_match("The Eiffel Tower!", ["eiffel tower"])        # 1.0
    px.eval.f1("in Paris, France", ["Paris"])                          # 0.5
    px.eval.acc_norm([-4.2, -9.1], ["yes", "certainly"], gold=1)      # 1.0
    px.eval.bleu(["the cat sat"], [["the cat sat down", "a cat sat"]])  # sacrebleu corpus BLEU
    px.eval.bertscore(["the cat sat"], ["a cat sat"], model="encoder_dir")  # {"precision", "recall", "f1"}
"""

from parallax.eval.evaluate import evaluate
from parallax.eval.lm import ParallaxLM
from parallax.eval.metrics import (
    acc,
    acc_bytes,
    acc_norm,
    aggregate_stderr,
    bertscore,
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
from parallax.eval.tasks import Task, TaskError, load_task

__all__ = [
    "evaluate", "ParallaxLM", "Task", "TaskError", "load_task", "acc", "acc_bytes", "acc_norm", "aggregate_stderr",
    "bertscore", "bits_per_byte", "bleu", "bootstrap_stderr",
    "byte_perplexity", "chrf", "count_bytes", "count_words", "exact_match", "f1", "mean", "mean_stderr",
    "normalize_answer", "perplexity", "rouge", "ter", "weighted_perplexity", "word_perplexity",
]
