"""``px.compress.prune``: unstructured (magnitude, Wanda), 2:4 semi-structured and structured
pruning of a model, in place. Validation and dispatch; the methods live in ``unstructured``,
``semi_structured`` and ``structured``."""

from __future__ import annotations

from torch import nn

from parallax.compress.activations import input_sq_norms
from parallax.compress.common import FilterFn, check_calibration, target_linears
from parallax.compress.semi_structured import prune_2_4
from parallax.compress.structured import TARGETS, prune_structured
from parallax.compress.unstructured import prune_unstructured, weight_scores
from parallax.validate import is_real

__all__ = ["prune", "METHODS", "SCOPES"]

METHODS = ("magnitude", "wanda", "2:4", "structured")
SCOPES = ("layer", "global")


def prune(model: nn.Module, sparsity: float = 0.5, method: str = "magnitude", calib=None, *,
          filter_fn: FilterFn | None = None, scope: str = "layer", accelerate: bool = False,
          targets: tuple[str, ...] = ("mlp",), round_to: int = 8, batch_size: int = 8) -> nn.Module:
    """Prune ``model`` in place and return it.

    sparsity: fraction in (0, 1) of the weights zeroed ("magnitude", "wanda"), of the MLP channels
        and key/value head groups removed ("structured"); "2:4" is 0.5 by definition.
    method: "magnitude" (|W|), "wanda" (|W| * ||X||, needs ``calib``), "2:4" (2 of every 4
        consecutive inputs kept, by |W|, or by the Wanda score when ``calib`` is given), or
        "structured" (channels removed, the model and ``model.config`` shrink; needs ``calib``).
    calib: (N, T) token ids (``px.compress.calibration_tokens``), fed to the model in batches of
        ``batch_size`` sequences.
    filter_fn(module, fqn) -> bool: which linears the unstructured and 2:4 methods act on (every
        nn.Linear but the LM head by default); "structured" acts on every block alike.
    scope: "layer" or "global" ranking for "magnitude" / "wanda" (see ``unstructured``).
    accelerate: "2:4" only: store the weights as ``torch.sparse.to_sparse_semi_structured``
        tensors (CUDA sm80+, fp16/bf16); otherwise the masked dense weight stays.
    targets: "structured" only: what is removed, ("mlp",), ("heads",) or ("mlp", "heads")
        (heads: the Llama family).
    round_to: "structured" only: the MLP keeps a multiple of it channels.
    """
    check_arguments(model, sparsity, method, scope, accelerate, targets, round_to, batch_size)
    if method == "structured":
        if filter_fn is not None:
            raise ValueError("filter_fn: method 'structured' prunes every block alike (one config describes the "
                             "result); it takes no filter_fn")
        prune_structured(model, sparsity, check_calibration(calib, method), targets=tuple(targets),
                         round_to=round_to, batch_size=batch_size)
        return model
    if method == "magnitude" and calib is not None:
        raise ValueError("calib: method 'magnitude' uses no calibration data (did you mean method='wanda'?)")
    if method == "wanda" or calib is not None:  # "2:4" scores by Wanda's |W| * ||X|| when given data
        calib = check_calibration(calib, method)
    linears = dict(target_linears(model, filter_fn))
    if not linears:
        raise ValueError("filter_fn: no nn.Linear of the model is left to prune")
    sq_norms = {} if calib is None else input_sq_norms(model, linears, calib, batch_size=batch_size)
    scores = {fqn: weight_scores(linear, sq_norms.get(fqn)) for fqn, linear in linears.items()}
    if method == "2:4":
        prune_2_4(linears, scores, accelerate=accelerate)
    else:
        prune_unstructured(linears, sparsity, scores, scope=scope, per_row=method == "wanda")
    return model


def check_arguments(model, sparsity, method, scope, accelerate, targets, round_to, batch_size) -> None:
    """ValueError naming the first bad argument of ``prune``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not is_real(sparsity) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}")
    if method == "2:4" and sparsity != 0.5:
        raise ValueError(f"sparsity: method '2:4' keeps 2 of every 4 weights, so sparsity must be 0.5 or "
                         f"omitted, got {sparsity!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    if scope == "global" and method not in ("magnitude", "wanda"):
        raise ValueError(f"scope: 'global' ranks weights for 'magnitude' and 'wanda' only, not {method!r}")
    if not isinstance(accelerate, bool) or (accelerate and method != "2:4"):
        raise ValueError(f"accelerate must be True only with method '2:4', got {accelerate!r} with {method!r}")
    if isinstance(targets, str) or not targets or not set(targets) <= set(TARGETS):
        raise ValueError(f"targets must be a non-empty tuple of {list(TARGETS)}, got {targets!r}")
    for name, value in (("round_to", round_to), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
