"""GRPO core shared by every LM RL method here: group-relative advantages A[B, T], loss
masks M[B, T], the clipped-surrogate loss with GRPO / Dr. GRPO / DAPO aggregation and GSPO
sequence ratios, and the registry of named presets. Pure tensor code, no model."""
from training.lm_rl.core.advantages import (
    OutcomeAdvantages,
    group_mean_std,
    grpo_advantages,
    outcome_advantages,
    to_token_advantages,
    zero_variance_samples,
)
from training.lm_rl.core.losses import aggregate, clipped_surrogate, importance_ratio, kl_k3, policy_loss
from training.lm_rl.core.registry import (
    LossConfig,
    get_preset,
    outcome_advantages_for,
    policy_loss_for,
    preset_names,
    register_preset,
)

__all__ = [
    "LossConfig",
    "OutcomeAdvantages",
    "aggregate",
    "clipped_surrogate",
    "get_preset",
    "group_mean_std",
    "grpo_advantages",
    "importance_ratio",
    "kl_k3",
    "outcome_advantages",
    "outcome_advantages_for",
    "policy_loss",
    "policy_loss_for",
    "preset_names",
    "register_preset",
    "to_token_advantages",
    "zero_variance_samples",
]
