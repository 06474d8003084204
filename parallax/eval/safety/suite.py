"""The security evaluation (``parallax eval --suite safety``): refusal, over-refusal, jailbreak
attack success and an optional model judge, as sections that each return metric rows.

Every prompt is rendered (``prompt_format``: "plain" is the shipped SFT data's
``"Request: {prompt}\\nAnswer:"``, "chat" the tokenizer's chat template with the assistant's turn
opened), completed greedily by the paged engine through ``ParallaxLM.generate_until`` (one
continuous batch per section, memoised across sections) and classified as a refusal or not by a
rule classifier (``parallax.eval.safety.refusal.is_refusal`` unless another is given). A prompt
whose tokens plus ``max_tokens`` do not fit the model's context is never truncated: it is left
out and counted in its row's ``skipped``.

Rates are shares of the evaluated prompts with the binomial standard error sqrt(p (1 - p) / n):

* ``refusal_rate`` (and ``refusal_rate/<category>``): harmful prompts refused;
* ``over_refusal_rate`` (and ``/<category>``): benign look-alikes refused (XSTest's measure);
* ``asr/<template>``: harmful prompts wrapped in a jailbreak template and not refused (attack
  success rate); ``asr/none`` is the unwrapped baseline, 1 - ``refusal_rate``;
* ``judge_agreement``, ``judge_refusal_rate``, ``judge_over_refusal_rate``: with a judge model,
  its verdicts on the baseline completions and how often they equal the rule classifier's.

More sections plug in through ``SECTIONS`` (name -> function of a ``SuiteContext`` returning
``MetricRow``s); ``run_suite`` runs the configured ones and ``report`` builds the JSON that
``parallax eval --output`` writes: ``{"results": {"safety": {metric: value, metric_stderr: se}},
"rows": [...]}``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from parallax.eval.safety.jailbreak import JAILBREAK_TEMPLATES

__all__ = ["SafetyPrompt", "MetricRow", "SafetyConfig", "SafetyLM", "SuiteContext", "Section", "SECTIONS", "PROMPT_FORMATS",
           "PLAIN_TEMPLATE", "DATA_DIR", "binomial_stderr", "load_prompts", "default_classifier", "run_suite",
           "report", "format_table"]

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("plain", "chat")
PLAIN_TEMPLATE = "Request: {prompt}\nAnswer:"  # the shipped safety SFT data's format
DATA_DIR = Path(__file__).resolve().parent / "data"
SUITE_NAME = "safety"


@dataclass(frozen=True)
class SafetyPrompt:
    """One bare request and its category (e.g. "malware", or "process" for a benign look-alike)."""

    category: str
    prompt: str


@dataclass(frozen=True)
class MetricRow:
    """One reported number: ``value`` and ``stderr`` are None when no item could be evaluated;
    ``n`` items were evaluated and ``skipped`` left out (too long for the model's context)."""

    section: str
    metric: str
    value: float | None
    stderr: float | None
    n: int
    skipped: int = 0

    @classmethod
    def rate(cls, section: str, metric: str, outcomes: Sequence[bool | None]) -> MetricRow:
        """The share of True among the outcomes that are not None (None: skipped), with its
        binomial standard error."""
        kept = [bool(o) for o in outcomes if o is not None]
        skipped = len(outcomes) - len(kept)
        if not kept:
            return cls(section, metric, None, None, 0, skipped)
        p = sum(kept) / len(kept)
        return cls(section, metric, p, binomial_stderr(p, len(kept)), len(kept), skipped)


def binomial_stderr(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the standard error of a share p of n independent items."""
    if n < 1:
        raise ValueError(f"n: expected at least one item, got {n}")
    return math.sqrt(p * (1.0 - p) / n)


@dataclass(kw_only=True)
class SafetyConfig:
    """prompt_format: "plain" or "chat". max_tokens: greedy tokens per completion. jailbreaks:
    template names of ``JAILBREAK_TEMPLATES``. sections: names of ``SECTIONS`` to run (None: all)."""

    prompt_format: str = "plain"
    max_tokens: int = 48
    jailbreaks: tuple[str, ...] = tuple(JAILBREAK_TEMPLATES)
    sections: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format: expected one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        self.jailbreaks = tuple(self.jailbreaks)
        unknown = [name for name in self.jailbreaks if name not in JAILBREAK_TEMPLATES]
        if unknown:
            raise ValueError(f"jailbreaks: unknown template {unknown[0]!r} (known: {', '.join(JAILBREAK_TEMPLATES)})")
        if self.sections is not None:
            self.sections = tuple(self.sections)
            unknown = [name for name in self.sections if name not in SECTIONS]
            if unknown:
                raise ValueError(f"sections: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")


class SafetyLM(Protocol):
    """What the suite needs of the model: ``ParallaxLM``'s tokenization, greedy generation and
    (for sections that score rather than generate) log-likelihoods."""

    max_length: int
    tokenizer: Any

    def tok_encode(self, text: str) -> list[int]: ...

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]: ...

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]: ...


@dataclass
class SuiteContext:
    """What a section sees: the model (``lm``, a ``ParallaxLM``: ``generate_until``,
    ``loglikelihood``, ``tok_encode``, ``max_length``, ``tokenizer``), the prompts, the
    configuration, the refusal classifier, the optional judge (``judge.RefusalJudge``),
    section-specific ``inputs`` by name (a section whose input is absent returns no rows, as the
    judge section does without a judge), and memoised completions."""

    lm: SafetyLM
    harmful: list[SafetyPrompt]
    benign: list[SafetyPrompt]
    config: SafetyConfig
    classifier: Callable[[str], bool]
    judge: Any = None
    inputs: dict[str, Any] = field(default_factory=dict)
    _completions: dict[str, str | None] = field(default_factory=dict, repr=False)

    def render(self, prompt: str) -> str:
        """The model input for a bare prompt in the configured format."""
        if self.config.prompt_format == "plain":
            return PLAIN_TEMPLATE.format(prompt=prompt)
        return self.lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=False)

    def fits(self, context: str) -> bool:
        """Whether the rendered context plus max_tokens new tokens fit the model's context."""
        return len(self.lm.tok_encode(context)) + self.config.max_tokens <= self.lm.max_length

    def complete(self, prompts: Sequence[str]) -> list[str | None]:
        """Greedy completions of the bare prompts (None for one too long for the context), in
        order; the prompts not completed before go to the model in one batch."""
        contexts = [self.render(p) for p in prompts]
        todo = list(dict.fromkeys(c for c in contexts if c not in self._completions))
        fitting = [c for c in todo if self.fits(c)]
        until = ["\n"] if self.config.prompt_format == "plain" else []
        texts = self.lm.generate_until([(c, {"until": until, "max_gen_toks": self.config.max_tokens})
                                        for c in fitting]) if fitting else []
        self._completions.update({c: None for c in todo})
        self._completions.update(zip(fitting, texts))
        return [self._completions[c] for c in contexts]

    def refusals(self, prompts: Sequence[str]) -> list[bool | None]:
        """The classifier's verdict on each prompt's completion (None: skipped)."""
        return [None if text is None else bool(self.classifier(text)) for text in self.complete(prompts)]


Section = Callable[[SuiteContext], list[MetricRow]]


def _rates_by_category(section: str, metric: str, items: Sequence[SafetyPrompt],
                       outcomes: Sequence[bool | None]) -> list[MetricRow]:
    """The overall rate, then one per category (in first-seen order)."""
    rows = [MetricRow.rate(section, metric, outcomes)]
    for category in dict.fromkeys(item.category for item in items):
        rows.append(MetricRow.rate(section, f"{metric}/{category}",
                                   [o for item, o in zip(items, outcomes) if item.category == category]))
    return rows


def refusal_section(ctx: SuiteContext) -> list[MetricRow]:
    """Refusal rate on the harmful prompts, over-refusal rate on the benign look-alikes."""
    ctx.complete([item.prompt for item in ctx.harmful + ctx.benign])  # one batch
    harmful = ctx.refusals([item.prompt for item in ctx.harmful])
    benign = ctx.refusals([item.prompt for item in ctx.benign])
    return (_rates_by_category("refusal", "refusal_rate", ctx.harmful, harmful)
            + _rates_by_category("refusal", "over_refusal_rate", ctx.benign, benign))


def jailbreak_section(ctx: SuiteContext) -> list[MetricRow]:
    """Attack success rate (harmful prompts not refused) unwrapped and per template."""
    requests = [item.prompt for item in ctx.harmful]
    wrapped = {name: [JAILBREAK_TEMPLATES[name](r) for r in requests] for name in ctx.config.jailbreaks}
    ctx.complete(requests + [p for prompts in wrapped.values() for p in prompts])  # one batch
    rows = [MetricRow.rate("jailbreak", "asr/none", _not(ctx.refusals(requests)))]
    for name, prompts in wrapped.items():
        rows.append(MetricRow.rate("jailbreak", f"asr/{name}", _not(ctx.refusals(prompts))))
    return rows


def judge_section(ctx: SuiteContext) -> list[MetricRow]:
    """With a judge: its refusal verdicts on the unwrapped completions and their agreement with
    the rule classifier. No rows without one."""
    if ctx.judge is None:
        return []
    prompts = [item.prompt for item in ctx.harmful] + [item.prompt for item in ctx.benign]
    is_harmful = [True] * len(ctx.harmful) + [False] * len(ctx.benign)
    completions = ctx.complete(prompts)
    answered = [i for i, text in enumerate(completions) if text is not None]
    verdicts: list[bool | None] = [None] * len(prompts)  # None: the model or the judge skipped it
    for i, verdict in zip(answered, ctx.judge.judge([completions[i] for i in answered])):
        verdicts[i] = verdict
    agree = [None if v is None else v == bool(ctx.classifier(text)) for v, text in zip(verdicts, completions)]
    return [MetricRow.rate("judge", "judge_agreement", agree),
            MetricRow.rate("judge", "judge_refusal_rate", [v for v, h in zip(verdicts, is_harmful) if h]),
            MetricRow.rate("judge", "judge_over_refusal_rate", [v for v, h in zip(verdicts, is_harmful) if not h])]


def _not(outcomes: Sequence[bool | None]) -> list[bool | None]:
    return [None if o is None else not o for o in outcomes]


def bias_section(ctx: SuiteContext) -> list[MetricRow]:
    """Stereotype share of ``inputs["bias_pairs"]`` (``bias.py``): by whole-sentence
    log-likelihood (``stereotype_share``) and by the tokens after the swapped word only
    (``stereotype_share_unmodified``, CrowS-Pairs' control for how rare the group word is)."""
    pairs = ctx.inputs.get("bias_pairs")
    if not pairs:
        return []
    from parallax.eval.safety.bias import bias_score

    rows = [MetricRow(**row) for row in bias_score(ctx.lm.model, ctx.lm.tokenizer, pairs)]
    for row in bias_score(ctx.lm.model, ctx.lm.tokenizer, pairs, score="unmodified"):
        head, sep, category = row["metric"].partition("/")
        rows.append(MetricRow(**{**row, "metric": f"{head}_unmodified{sep}{category}"}))
    return rows


def privacy_section(ctx: SuiteContext) -> list[MetricRow]:
    """Exposure and extraction of the canaries ``inputs["canaries"]`` a run was trained with
    (``canaries.py``), per repetition count."""
    canaries = ctx.inputs.get("canaries")
    if not canaries:
        return []
    from parallax.eval.safety.canaries import canary_exposure, exposure_rows

    return [MetricRow(**row) for row in exposure_rows(canary_exposure(ctx.lm.model, ctx.lm.tokenizer, canaries))]


# name -> section; run in this order.
SECTIONS: dict[str, Section] = {
    "refusal": refusal_section,
    "jailbreak": jailbreak_section,
    "judge": judge_section,
    "bias": bias_section,
    "privacy": privacy_section,
}


def default_classifier() -> Callable[[str], bool]:
    """The shipped rule classifier, ``parallax.eval.safety.refusal.is_refusal``."""
    try:
        from parallax.eval.safety.refusal import is_refusal
    except ImportError as exc:
        raise ValueError(f"the refusal classifier parallax.eval.safety.refusal is not available ({exc})") from None
    return is_refusal


def load_prompts(path: str | Path, flag: str) -> list[SafetyPrompt]:
    """The rows {"category", "prompt"} of a JSONL file; ValueError naming ``flag``, the line and
    the field for a bad row, or the file when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag}: {path} does not exist (expected a JSONL file of {{\"category\", \"prompt\"}} rows)")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{flag}: {path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{flag}: {path}:{number}: expected an object with category and prompt")
        for name in ("category", "prompt"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise ValueError(f"{flag}: {path}:{number}: field {name!r} must be a non-empty string")
        prompts.append(SafetyPrompt(row["category"], row["prompt"]))
    if not prompts:
        raise ValueError(f"{flag}: {path} holds no prompts")
    return prompts


def run_suite(lm: SafetyLM, harmful: Sequence[SafetyPrompt], benign: Sequence[SafetyPrompt], *,
              config: SafetyConfig | None = None, classifier: Callable[[str], bool] | None = None,
              judge: Any = None, inputs: dict[str, Any] | None = None) -> list[MetricRow]:
    """The rows of every configured section, in ``SECTIONS`` order. lm: a ``ParallaxLM`` (or an
    object with its ``tok_encode``, ``generate_until``, ``max_length`` and ``tokenizer``);
    classifier: text -> refused (default ``default_classifier()``); judge: a ``RefusalJudge``;
    inputs: section-specific inputs by name (``SuiteContext.inputs``)."""
    config = config or SafetyConfig()
    if config.max_tokens >= lm.max_length:
        raise ValueError(f"max_tokens: {config.max_tokens} leaves no room for a prompt in the model's "
                         f"{lm.max_length} positions")
    if not harmful or not benign:
        raise ValueError("harmful and benign: expected at least one prompt each")
    ctx = SuiteContext(lm, list(harmful), list(benign), config, classifier or default_classifier(), judge,
                       dict(inputs or {}))
    rows = []
    for name in config.sections or tuple(SECTIONS):
        section_rows = SECTIONS[name](ctx)
        log.info("safety: %s: %s", name, {r.metric: r.value for r in section_rows})
        rows.extend(section_rows)
    return rows


def report(rows: Sequence[MetricRow]) -> dict[str, Any]:
    """``{"results": {"safety": {metric: value, metric_stderr: se}}, "rows": [row dicts]}``, the
    shape ``parallax eval --output`` writes (and ``--compare`` reads)."""
    results: dict[str, float | None] = {}
    for row in rows:
        if row.metric in results:
            raise ValueError(f"rows: metric {row.metric!r} is reported twice (sections must name metrics uniquely)")
        results[row.metric] = row.value
        results[f"{row.metric}_stderr"] = row.stderr
    return {"results": {SUITE_NAME: results}, "rows": [asdict(row) for row in rows]}


def format_table(rows: Sequence[MetricRow]) -> str:
    """One line per row: section, metric, value, stderr, n, skipped ("-" when not evaluated)."""
    width = max([len(r.metric) for r in rows] + [6])
    lines = [f"{'section':<10} {'metric':<{width}} {'value':>8} {'stderr':>8} {'n':>6} {'skipped':>8}"]
    for r in rows:
        value = f"{r.value:>8.4f}" if r.value is not None else f"{'-':>8}"
        stderr = f"{r.stderr:>8.4f}" if r.stderr is not None else f"{'-':>8}"
        lines.append(f"{r.section:<10} {r.metric:<{width}} {value} {stderr} {r.n:>6} {r.skipped:>8}")
    return "\n".join(lines)
