"""``PreferenceObjective``: one preference-tuning loss on a ``PreferenceBatch``, as TRL logs it.

The policy's log-probabilities come from one forward over the chosen and rejected sequences
together, as per-target cross-entropies from the model's fused linear + cross-entropy
(``model(..., reduction="none")``: the logits never exist), summed per sequence. The reference's
(DPO, IPO, hinge) come from the batch when precomputed (full fine-tuning) or else from the same
forward with the adapters disabled (``model.disable_adapter()``): no second model in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallax.align.batch import PreferenceBatch
from parallax.align.losses import dpo_loss, orpo_loss, simpo_loss

__all__ = ["METHODS", "REFERENCE_METHODS", "PreferenceObjective", "sequence_sums"]

REFERENCE_METHODS = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge"}
METHODS = (*REFERENCE_METHODS, "simpo", "orpo")


def sequence_sums(model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed log-probabilities of each sequence's completion and (2B,) its token counts."""
    nll = model(*batch.model_args(), reduction="none")  # (R, T) fp32, 0 outside the completions
    n = 2 * batch.num_pairs
    counted = (batch.targets >= 0) & (batch.sequence >= 0)
    index = batch.sequence[counted]
    logps = torch.zeros(n, device=nll.device, dtype=torch.float32).index_add(0, index, -nll[counted])
    counts = torch.zeros(n, device=nll.device, dtype=torch.float32).index_add(
        0, index, torch.ones_like(index, dtype=torch.float32))
    return logps, counts


@torch.no_grad()
def reference_sums(model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """(2B,) summed log-probabilities under the reference: the model itself with its adapters
    disabled, without dropout (TRL's default). A model without LoRA adapters has no reference
    inside it: its reference log-probabilities must be precomputed (``batch.reference_logps``)."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the model has no LoRA adapters to disable for the reference log-probabilities: "
                         "precompute them before training (full fine-tuning) or use a reference-free method")
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            return sequence_sums(model, batch)[0]
    finally:
        model.train(training)


@dataclass
class PreferenceObjective:
    """``method``: dpo (sigmoid), ipo, hinge (need a reference), simpo, orpo (reference-free);
    ``beta`` > 0; ``label_smoothing`` in [0, 0.5) (dpo, simpo); ``simpo_gamma``: SimPO's
    gamma / beta ratio."""

    method: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < float("inf"):
            raise ValueError(f"beta must be a positive finite number; got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5); got {self.label_smoothing!r}")
        if self.label_smoothing and self.method not in ("dpo", "simpo"):
            raise ValueError(f"label_smoothing applies to dpo and simpo only; got method {self.method!r}")

    @property
    def needs_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    def __call__(self, model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean loss over the B pairs, statistics: each the SUM over the pairs, detached, with
        TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
        logps/chosen, logps/rejected)."""
        reference = None
        if self.needs_reference:
            reference = batch.reference_logps if batch.reference_logps is not None else reference_sums(model, batch)
        logps, counts = sequence_sums(model, batch)
        B = batch.num_pairs
        chosen, rejected = logps[:B], logps[B:]
        if self.needs_reference:
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, reference[:B], reference[B:], beta=self.beta,
                loss_type=REFERENCE_METHODS[self.method], label_smoothing=self.label_smoothing)
        else:
            average = logps / counts
            if self.method == "simpo":
                losses, chosen_rewards, rejected_rewards = simpo_loss(
                    average[:B], average[B:], beta=self.beta, gamma_beta_ratio=self.simpo_gamma,
                    label_smoothing=self.label_smoothing)
            else:
                losses, chosen_rewards, rejected_rewards = orpo_loss(average[:B], average[B:], -average[:B],
                                                                     beta=self.beta)
        stats = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return losses.mean(), stats
