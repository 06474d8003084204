"""What the LoRA benchmarks against TRL (``finetune``, ``align``) share: the random-initialised
``transformers`` Llama with a BPE tokenizer, the one PEFT adapter every provider starts from,
passages of the built-in corpus with their continuations, peak-memory sampling, TRL step timing,
and running each provider in a fresh process."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LORA_ALPHA",
    "LORA_R",
    "LR",
    "Case",
    "PeakMemory",
    "StepClock",
    "add_versions",
    "check_providers",
    "clipped_step",
    "continuation_rows",
    "in_fresh_process",
    "make_adapter_dir",
    "make_model_dir",
    "quiet_hugging_face",
    "timing_callback",
    "train_quietly",
    "trainer_arguments",
]

LORA_R, LORA_ALPHA = 16, 32
LR = 2e-4


@dataclass(frozen=True)
class Case:
    """The model and data of one run; ``seq`` is the most positions per example (and per packed bin)."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    examples: int
    warmup: int
    steps: int


def make_model_dir(root: Path, case: Case) -> Path:
    """A random-initialised Llama with a BPE tokenizer trained on the built-in corpus, saved as a
    ``transformers`` directory."""
    import transformers

    from parallax.data import builtin_documents, load_tokenizer
    from parallax.data.train_tokenizer import train_tokenizer

    path = root / "model"
    train_tokenizer(builtin_documents()[:200], case.vocab, path)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=load_tokenizer(path).vocab_size, hidden_size=case.width, intermediate_size=case.intermediate,
        num_hidden_layers=case.layers, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
        max_position_embeddings=case.seq, tie_word_embeddings=False))
    hf.save_pretrained(path)
    return path


def make_adapter_dir(root: Path, model_dir: Path) -> Path:
    """PEFT's initial LoRA adapter for the model (A Kaiming-uniform, B zero), shared by all providers."""
    import peft
    import transformers

    path = root / "adapter"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    peft.get_peft_model(hf, config).save_pretrained(path)
    return path


def continuation_rows(tokenizer: Any, seq: int, count: int) -> list[dict[str, str]]:
    """``count`` prompt/completion rows of varied lengths (a few to ``seq`` tokens) from the
    built-in corpus: a passage of 1-6 sentences, then its next 1-4 sentences as the completion
    (at seq 512; proportionally fewer for shorter sequences)."""
    from parallax.data import builtin_documents

    rng = random.Random(0)
    docs = [[s.strip() + "." for s in d.split(". ") if 20 < len(s.strip()) < 200] for d in builtin_documents()]
    docs = [d for d in docs if len(d) >= 4]
    scale = seq / 512  # fewer sentences for shorter sequences, so that several examples share a bin
    rows = []
    while len(rows) < count:
        doc = rng.choice(docs)
        start = rng.randrange(len(doc) - 1)
        n_prompt, n_completion = rng.randint(1, max(2, round(6 * scale))), rng.randint(1, max(1, round(4 * scale)))
        prompt = "Continue the passage:\n" + " ".join(doc[start:start + n_prompt]) + "\nContinuation:"
        completion = " " + " ".join(doc[start + n_prompt:start + n_prompt + n_completion])
        if completion.strip() and len(tokenizer.encode(prompt + completion)) + 2 <= seq:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


class PeakMemory:
    """Peak memory while training, over the amount at ``start``: the process's resident set
    size sampled every 5 ms by a thread on CPU, ``torch.cuda.max_memory_allocated`` on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._peak = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        import psutil

        process = psutil.Process()
        self._base = self._peak = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Bytes of the peak over the start."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        import psutil

        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        return self._peak - self._base


class StepClock:
    """Seconds from the end of one step to the end of the next (CUDA synchronised first)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def clipped_step(loss: torch.Tensor, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Backward, the gradient norm clipped at 1.0 (TRL's ``max_grad_norm``), the optimizer step,
    the gradients freed: the parallax side of what a TRL trainer step does."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainer_arguments(device: torch.device) -> dict[str, Any]:
    """The ``TrainingArguments`` every TRL provider shares: the parallax side's AdamW settings
    (constant lr, no warm-up, no weight decay, clipping at 1.0), fp32, the loss logged every step,
    no checkpoints, reports, progress bars or data loader workers."""
    return {"learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "bf16": False, "fp16": False, "logging_steps": 1, "save_strategy": "no",
            "report_to": [], "use_cpu": device.type == "cpu", "dataloader_num_workers": 0,
            "dataloader_pin_memory": False, "disable_tqdm": True, "seed": 0}


def quiet_hugging_face() -> None:
    """No progress bars or info logs from datasets and transformers (they would interleave with the benchmark's)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def train_quietly(trainer: Any) -> None:
    """``trainer.train()`` without the per-step log lines of its PrinterCallback."""
    import transformers

    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()


def timing_callback(log: Any, device: torch.device) -> Any:
    """A TrainerCallback appending each TRL step's seconds (``StepClock``) to ``log.seconds`` and
    setting ``log.peak_bytes`` to the peak memory of the training loop."""
    import transformers

    class TimingCallback(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.memory = PeakMemory(device)
            self.memory.start()
            self.clock = StepClock(device)

        def on_step_end(self, args, state, control, **kwargs):
            log.seconds.append(self.clock.lap())

        def on_train_end(self, args, state, control, **kwargs):
            log.peak_bytes = self.memory.stop()

    return TimingCallback()


def _measure(run: Callable[[Any], Any], spec: Any, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return dataclasses.asdict(run(spec))


def in_fresh_process(run: Callable[[Any], Any], spec: Any, threads: int) -> dict[str, Any]:
    """``run(spec)`` (a module-level function returning a dataclass) in a new spawned process with
    ``threads`` torch threads, so that its peak memory is its own; the dataclass as a dict."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure, run, spec, threads).result()


def check_providers(option: str | None, known: Sequence[str], benchmark: str) -> list[str]:
    """The providers named by ``--providers`` (all of ``known`` when None); TRL's packages must be
    installed when a TRL provider is among them."""
    names = [n.strip() for n in (option or ",".join(known)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--providers: unknown provider(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if any(n.startswith("TRL") for n in names):
        missing = [m for m in ("trl", "peft", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(f"bench {benchmark} compares against TRL: pip install 'parallax[bench]' "
                               f"(missing: {', '.join(missing)})")
    return names


def add_versions(ctx: Any) -> None:
    """Record the versions of the Hugging Face packages measured against."""
    for package in ("trl", "peft", "datasets", "transformers"):
        if importlib.util.find_spec(package):
            ctx.add_version(package, importlib.import_module(package).__version__)
