"""lm-evaluation-harness backend: lm-eval's own tasks scored by parallax (model name ``parallax``).

    import lm_eval, parallax.eval.lm_eval  # registers the model "parallax"
    lm_eval.simple_evaluate(model="parallax", model_args="checkpoint=out,batch_size=16", tasks=["hellaswag"])

    python -m parallax.eval.lm_eval --model parallax --model_args hf=DIR,dtype=bfloat16 --tasks arc_easy

lm-eval 0.4 finds models only in its registry (it has no plugin entry points), so the model exists
once this module is imported; ``python -m parallax.eval.lm_eval ARGS`` is lm-eval's own command line
(``lm_eval ARGS``) with the model registered. Model arguments (``--model_args k=v,...``):

* ``checkpoint=PATH`` (a ``parallax train`` checkpoint, its run directory or checkpoints/ folder)
  or ``hf=DIR`` (a Hugging Face model directory): exactly one;
* ``adapter=DIR``: a PEFT-format adapter (LoRA or prefix) on that base (alone: the base its
  ``adapter_config.json`` names);
* ``tokenizer=DIR``: default the checkpoint run's tokenizer, or the ``hf`` directory's;
* ``batch_size`` (default 8), ``max_length`` (default the model's context), ``device``
  (``cpu``, ``cuda``, ``cuda:N`` or ``auto``, the default), ``dtype`` (``float32``, ``bfloat16``,
  ``float16``; default the weights' own).

Scoring is ``parallax.eval.lm.ParallaxLM``'s: lm-eval's ``hf`` semantics with parallax's batching.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

try:
    import lm_eval.models  # noqa: F401  (lm-eval registers its own models only into an empty registry)
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # lm-eval is an optional extra
    raise ImportError("parallax.eval.lm_eval needs lm-evaluation-harness: pip install 'parallax[lm-eval]'") from exc

from parallax.data.chat import DEFAULT_CHAT_TEMPLATE
from parallax.eval.lm import ParallaxLM
from parallax.train.model_source import load_trained

__all__ = ["ParallaxEvalLM", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ParallaxEvalLM(LM):
    """lm-eval's ``LM`` over ``ParallaxLM``; arguments as the module docstring lists.

    ``max_batch_size`` is accepted because lm-eval passes it to every model; it bounds
    ``batch_size=auto``, which this backend does not offer.
    """

    def __init__(self, checkpoint: str | None = None, hf: str | None = None, tokenizer: str | None = None,
                 adapter: str | None = None, batch_size: int | str | None = 8, max_length: int | None = None, device: str | None = None,
                 dtype: str | None = None, max_batch_size: int | None = None) -> None:
        super().__init__()
        if (checkpoint is None) == (hf is None) and not (adapter is not None and checkpoint is None and hf is None):
            raise ValueError("parallax model_args: give exactly one of checkpoint=PATH (a parallax train checkpoint) "
                             f"or hf=DIR (a Hugging Face model directory), optionally with adapter=DIR; got "
                             f"checkpoint={checkpoint!r}, hf={hf!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"parallax model_args: dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"parallax model_args: max_length must be a positive integer; got {max_length!r}")
        self._device = _resolve_device(device)
        model, tok, self._source = load_trained(checkpoint, hf, adapter, tokenizer)
        if model.config.vocab_size < tok.vocab_size:
            raise ValueError(f"{self._source}: the model's vocab_size ({model.config.vocab_size}) is smaller than the "
                             f"vocabulary of the tokenizer {tok.source} ({tok.vocab_size} ids)")
        model = model.to(self._device, DTYPES[dtype]) if dtype else model.to(self._device)
        self.scorer = ParallaxLM(model, tok, batch_size=_batch_size(batch_size), max_length=max_length)
        self._chat_template_name: str | None = None

    @property
    def tokenizer(self) -> Any:
        return self.scorer.tokenizer

    # -- lm-eval's three request types: Instance.args are (context, continuation), (text,), (context, kwargs)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        return self._answer("loglikelihood", requests, self.scorer.loglikelihood([req.args for req in requests]))

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        texts = [req.args[0] for req in requests]
        return self._answer("loglikelihood_rolling", requests, self.scorer.loglikelihood_rolling(texts))

    def generate_until(self, requests: list[Any]) -> list[str]:
        return self._answer("generate_until", requests, self.scorer.generate_until([req.args for req in requests]))

    def _answer(self, kind: str, requests: list[Any], results: list[Any]) -> list[Any]:
        for req, result in zip(requests, results):  # lm-eval's --use_cache partial cache, as its hf backend
            self.cache_hook.add_partial(kind, req.args, result)
        return results

    # -- chat templates (lm-eval's --apply_chat_template) ---------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's source, a name lm-eval puts in its request-cache file names."""
        return str(self.tokenizer.source).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template text ``apply_chat_template`` uses: the tokenizer's default one (True), the
        one named ``chat_template``, or None (False: no template)."""
        if chat_template is False or chat_template is None:
            return None
        templates = self.tokenizer.chat_templates
        if isinstance(chat_template, str):
            if chat_template not in templates:
                raise ValueError(f"apply_chat_template={chat_template!r}: the tokenizer {self.tokenizer.source} has "
                                 f"no such chat template (it has: {', '.join(sorted(templates)) or 'none'})")
            self._chat_template_name = chat_template
            return templates[chat_template].text
        return templates["default"].text if "default" in templates else DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``chat_history``. Without ``add_generation_prompt`` the last
        (assistant) message stays open for the continuation, as transformers'
        ``continue_final_message`` (what lm-eval's hf backend asks for)."""
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, chat_template=self._chat_template_name)
        return text if add_generation_prompt else _continue_final_message(text, chat_history[-1]["content"])


def _continue_final_message(rendered: str, final: str) -> str:
    """``rendered`` cut right after the last message's content (transformers' rule: the template
    may strip the message; trailing spaces are kept when the template kept them)."""
    if final.strip() not in rendered:
        raise ValueError("apply_chat_template(add_generation_prompt=False): the chat template does not write the "
                         f"final message {final!r} verbatim, so it cannot be continued")
    start = rendered.rindex(final.strip())
    if rendered[start:start + len(final.lstrip())] == final.lstrip():
        return rendered[:start + len(final.lstrip())]
    return rendered[:start + len(final.strip())]


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not (device == "cpu" or device.split(":")[0] == "cuda"):
        raise ValueError(f"parallax model_args: device must be cpu, cuda, cuda:N or auto; got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"parallax model_args: device={device} but torch.cuda.is_available() is False")
    return torch.device(device)


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes the CLI's --batch_size as a string, and None when unset; 'auto' is refused."""
    if value is None:
        return 8
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"parallax model_args: batch_size must be a positive integer (no 'auto'); got {value!r}")
    return value


def main() -> None:
    """``lm_eval``'s command line with the ``parallax`` model registered."""
    # under ``python -m`` this file runs as __main__, which does not register; the module does
    importlib.import_module("parallax.eval.lm_eval")

    cli_evaluate()


if __name__ == "__main__":
    main()
else:
    register_model("parallax")(ParallaxEvalLM)
