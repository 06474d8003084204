"""Preference losses with TRL's formulas (``DPOTrainer.dpo_loss``, ``CPOTrainer`` for SimPO,
``ORPOTrainer.odds_ratio_loss``), on per-sequence log-probabilities (B,).

``dpo_loss`` takes summed log-probabilities of the chosen/rejected completions under the policy
and the reference; ``simpo_loss`` and ``orpo_loss`` are reference-free and take average
(length-normalised) log-probabilities. Each returns (losses (B,), chosen_rewards (B,),
rejected_rewards (B,)); rewards are detached, as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "simpo_loss", "orpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _check(beta: float, label_smoothing: float, *logps: torch.Tensor) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number; got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing!r}")
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"log-probabilities must all have shape (B,); got {sorted(shapes)}")


def _smoothed_sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """-log sigma(beta x) (1 - eps) - log sigma(-beta x) eps: the conservative DPO of Mitchell (2023)."""
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family losses (B,) on summed log-probabilities (B,) each, with TRL's definitions:
    x = (pi_c - pi_r) - (ref_c - ref_r);
    ``sigmoid`` (DPO, Rafailov et al. 2023; ``label_smoothing`` gives cDPO), ``ipo`` ((x - 1 / (2 beta))^2,
    Azar et al. 2023), ``hinge`` (relu(1 - beta x), SLiC). Rewards: beta (pi - ref), detached."""
    _check(beta, label_smoothing, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
           reference_rejected_logps)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    if loss_type != "sigmoid" and label_smoothing:
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only; got {loss_type!r}")
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(logits, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024), reference-free, as TRL's CPOTrainer(loss_type="simpo"): on average
    log-probabilities, x = pi_c - pi_r - gamma / beta, losses as DPO's sigmoid. Rewards: beta pi."""
    _check(beta, label_smoothing, chosen_avg_logps, rejected_avg_logps)
    logits = chosen_avg_logps - rejected_avg_logps - gamma_beta_ratio
    losses = _smoothed_sigmoid(logits, beta, label_smoothing)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024), as TRL's ORPOTrainer: the chosen completion's NLL (B,) minus beta
    log sigma(log odds(chosen) - log odds(rejected)), odds from average log-probabilities p:
    log(p / (1 - p)) = logp - log1p(-exp(logp)). Rewards: beta pi."""
    _check(beta, 0.0, chosen_avg_logps, rejected_avg_logps, chosen_nll)
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        torch.log1p(-torch.exp(chosen_avg_logps)) - torch.log1p(-torch.exp(rejected_avg_logps)))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()
