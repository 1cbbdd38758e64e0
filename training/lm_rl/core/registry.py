"""Loss configuration and the one registry of named GRPO-family presets.

``LossConfig`` holds every knob of the shared core (advantage scaling, zero-variance mode,
ratio level, clipping, aggregation, KL) and rejects incompatible combinations when it is
built. Presets are small functions, each citing its paper and returning the fields it sets,
registered by name with ``register_preset``; ``get_preset(name, **overrides)`` builds and
validates one.
``outcome_advantages_for`` and ``policy_loss_for`` apply a config to the pure functions in
``advantages`` and ``losses``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from training.lm_rl.core.advantages import (
    BASELINES,
    REWARD_SCALES,
    ZERO_VARIANCE_MODES,
    Baseline,
    OutcomeAdvantages,
    RewardScale,
    ZeroVarianceMode,
    outcome_advantages,
)
from training.lm_rl.core.losses import AGGREGATIONS, RATIO_LEVELS, Aggregation, RatioLevel, policy_loss


@dataclass(frozen=True)
class LossConfig:
    """Configuration of the GRPO core: how advantages are scaled and how the loss is built."""

    scale_rewards: RewardScale = field(
        default="std",
        metadata={"help": "'std': divide centred group rewards by the group std (GRPO); 'none': do not (Dr. GRPO)."},
    )
    baseline: Baseline = field(
        default="mean",
        metadata={"help": "'mean': centre on the group mean (GRPO); 'leave_one_out': on the others' mean (RLOO)."},
    )
    advantage_eps: float = field(
        default=1e-4, metadata={"help": "Added to the group std before dividing (TRL uses 1e-4). Must be > 0."}
    )
    zero_variance: ZeroVarianceMode = field(
        default="keep",
        metadata={
            "help": "Groups whose rewards are all equal: 'keep' (advantage 0, tokens still count in the "
            "normaliser) or 'drop' (masked out of loss and normaliser, DAPO dynamic sampling's effect)."
        },
    )
    ratio_level: RatioLevel = field(
        default="token",
        metadata={
            "help": "'token': per-token ratio pi/pi_old (GRPO); 'sequence': length-normalised sequence ratio (GSPO)."
        },
    )
    clip_low: float = field(
        default=0.2, metadata={"help": "Lower clip range: ratios below 1 - clip_low are clipped. In [0, 1)."}
    )
    clip_high: float = field(
        default=0.2,
        metadata={"help": "Upper clip range: ratios above 1 + clip_high are clipped (DAPO clip-higher: 0.28)."},
    )
    aggregation: Aggregation = field(
        default="seq_mean_token_mean",
        metadata={
            "help": "'seq_mean_token_mean' (TRL 'grpo'), 'constant' (TRL 'dr_grpo', needs max_completion_length) "
            "or 'token_mean' (TRL 'dapo')."
        },
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Generation budget in tokens; the constant normaliser of 'constant' aggregation."},
    )
    beta: float = field(
        default=0.0, metadata={"help": "Weight of the k3 KL to the reference policy; > 0 needs use_reference=True."}
    )
    use_reference: bool = field(
        default=False, metadata={"help": "Whether a frozen reference policy provides ref_logp for the KL term."}
    )

    def __post_init__(self) -> None:
        choices = {
            "scale_rewards": REWARD_SCALES,
            "baseline": BASELINES,
            "zero_variance": ZERO_VARIANCE_MODES,
            "ratio_level": RATIO_LEVELS,
            "aggregation": AGGREGATIONS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {value!r}")
        if self.advantage_eps <= 0:
            raise ValueError(f"LossConfig.advantage_eps must be > 0, got {self.advantage_eps}")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"LossConfig.clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ValueError(f"LossConfig.clip_high must be >= 0, got {self.clip_high}")
        if self.beta < 0:
            raise ValueError(f"LossConfig.beta must be >= 0, got {self.beta}")
        if self.beta > 0 and not self.use_reference:
            raise ValueError(
                f"LossConfig.beta={self.beta} > 0 needs a reference policy: set use_reference=True or beta=0.0"
            )
        if self.max_completion_length is not None and self.max_completion_length <= 0:
            raise ValueError(f"LossConfig.max_completion_length must be > 0, got {self.max_completion_length}")
        if self.aggregation == "constant" and self.max_completion_length is None:
            raise ValueError(
                "LossConfig.max_completion_length is None but aggregation='constant' divides by it: "
                "set max_completion_length to the generation budget"
            )


PresetFields = dict[str, object]
PresetFactory = Callable[[], PresetFields]
_PRESETS: dict[str, PresetFactory] = {}


def register_preset(name: str) -> Callable[[PresetFactory], PresetFactory]:
    """Register a preset: a zero-argument function returning the LossConfig fields it sets."""

    def decorator(factory: PresetFactory) -> PresetFactory:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        _PRESETS[name] = factory
        return factory

    return decorator


def preset_names() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str, **overrides: object) -> LossConfig:
    """Build and validate the preset ``name``, with any LossConfig field overridden.

    Example: ``get_preset("dr_grpo", max_completion_length=256)``.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; available: {', '.join(preset_names())}")
    unknown = sorted(set(overrides) - set(LossConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown LossConfig field(s) {unknown} in overrides for preset {name!r}")
    return LossConfig(**{**_PRESETS[name](), **overrides})  # type: ignore[arg-type]


@register_preset("grpo")
def grpo() -> PresetFields:
    """GRPO: Shao et al. 2024, "DeepSeekMath", Sec. 4.1 — std-scaled group advantages, token
    ratios, symmetric clip 0.2, per-sequence token mean then batch mean (TRL loss_type="grpo")."""
    return {}


@register_preset("dr_grpo")
def dr_grpo() -> PresetFields:
    """Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
    Sec. 3.2 — no std division and a constant normaliser B * max_completion_length (TRL
    loss_type="dr_grpo"). max_completion_length is the caller's generation budget: pass it
    to get_preset."""
    return {"scale_rewards": "none", "aggregation": "constant"}


@register_preset("dapo")
def dapo() -> PresetFields:
    """DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" —
    clip-higher (0.2 / 0.28, Sec. 3.1), dynamic sampling as dropping zero-variance groups
    (Sec. 3.2), token-level loss over the batch (Sec. 3.3, TRL loss_type="dapo"), no KL."""
    return {"clip_low": 0.2, "clip_high": 0.28, "zero_variance": "drop", "aggregation": "token_mean"}


@register_preset("gspo")
def gspo() -> PresetFields:
    """GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization", Eq. 7 — sequence-level,
    length-normalised ratio; clip ranges 3e-4 / 4e-4 and beta 0 as in its Sec. 5.1, with the
    per-sequence mean aggregation TRL recommends for it (loss_type="grpo")."""
    return {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4}


@register_preset("rloo")
def rloo() -> PresetFields:
    """RLOO: Ahmadian et al. 2024, "Back to Basics", Sec. 3.3 — leave-one-out baseline, no std
    division; the per-token clipped surrogate and per-sequence mean of the shared core."""
    return {"baseline": "leave_one_out", "scale_rewards": "none"}


def outcome_advantages_for(
    config: LossConfig, rewards: torch.Tensor, group_ids: torch.Tensor, completion_mask: torch.Tensor
) -> OutcomeAdvantages:
    """``outcome_advantages`` with the config's scaling, eps and zero-variance mode.

    rewards: (B,); group_ids: (B,); completion_mask: (B, T). Returns A (B, T) and M (B, T).
    """
    return outcome_advantages(
        rewards,
        group_ids,
        completion_mask,
        scale=config.scale_rewards,
        eps=config.advantage_eps,
        zero_variance=config.zero_variance,
        baseline=config.baseline,
    )


def policy_loss_for(
    config: LossConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``policy_loss`` with the config's clipping, ratio level, aggregation and KL.

    logp, old_logp, advantages, mask, ref_logp: (B, T). Returns (loss scalar, stats).
    """
    if config.use_reference and ref_logp is None:
        raise ValueError("LossConfig.use_reference=True but ref_logp was not given")
    return policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        ratio_level=config.ratio_level,
        aggregation=config.aggregation,
        max_completion_length=config.max_completion_length,
        beta=config.beta,
        ref_logp=ref_logp,
    )
