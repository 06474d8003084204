"""Preference tuning: TRL's DPO-family losses (``dpo_loss``: sigmoid/ipo/hinge; reference-free
``simpo_loss``, ``orpo_loss``) and chunked per-sequence log-probabilities (``sequence_logps``).

    losses, chosen_rewards, rejected_rewards = px.align.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    logps = px.align.sequence_logps(model.hidden_states(ids), model.lm_head.weight, targets)   # (B,)
"""

from parallax.align.logps import sequence_logps
from parallax.align.losses import DPO_LOSS_TYPES, dpo_loss, orpo_loss, simpo_loss

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "orpo_loss", "sequence_logps", "simpo_loss"]
