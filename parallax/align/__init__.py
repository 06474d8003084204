"""Preference tuning: TRL's DPO-family losses (``dpo_loss``: sigmoid/ipo/hinge; reference-free
``simpo_loss``, ``orpo_loss``), chunked per-sequence log-probabilities (``sequence_logps``),
preference data (``load_preference_data``, ``collate_pairs``) and the training objective
(``PreferenceObjective``) that ``parallax align`` (``AlignConfig``) runs in the train loop.

    losses, chosen_rewards, rejected_rewards = px.align.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    logps = px.align.sequence_logps(model.hidden_states(ids), model.lm_head.weight, targets)   # (B,)
    batch = px.align.collate_pairs(pairs, pad_id)                 # 2B sequences, chosen first, one forward
    loss, stats = px.align.PreferenceObjective("dpo", beta=0.1)(model, batch)   # reference: LoRA disabled
"""

from parallax.align.batch import PreferenceBatch, collate_pairs
from parallax.align.data import PreferencePair, PreferenceSplits, load_preference_data, load_preference_pairs
from parallax.align.logps import sequence_logps
from parallax.align.losses import DPO_LOSS_TYPES, dpo_loss, orpo_loss, simpo_loss
from parallax.align.objective import METHODS, PreferenceObjective

__all__ = ["DPO_LOSS_TYPES", "METHODS", "PreferenceBatch", "PreferenceObjective", "PreferencePair",
           "PreferenceSplits", "collate_pairs", "dpo_loss", "load_preference_data", "load_preference_pairs",
           "orpo_loss", "sequence_logps", "simpo_loss"]
