"""Group-relative outcome advantages: the advantage half of the GRPO core.

Implements
- GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, outcome supervision):
  ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` for sample ``i`` of group ``g``.
  ``std_g`` is the unbiased (Bessel-corrected) standard deviation, as in TRL's
  ``GRPOTrainer`` (``advantages / (std_rewards + 1e-4)``).
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", Sec. 3.2): the same
  centring without the std division (``scale="none"``).
- RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
  for Learning from Human Feedback in LLMs", Sec. 3.3), ``baseline="leave_one_out"``: each
  sample's baseline is the mean reward of the OTHER samples of its group,
  ``A_i = r_i - (sum_g(r) - r_i) / (n_g - 1) = n_g / (n_g - 1) * (r_i - mean_g(r))``.
- Zero-variance groups (every sample of a prompt got the same reward, including
  single-sample groups) carry no learning signal. ``"keep"`` leaves them in the batch with
  advantage 0, so their tokens still count in the loss normaliser; ``"drop"`` masks the
  whole group out, which is the effect of DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2)
  on the loss: those samples are simply not in the batch.

Groups are given by ``group_ids`` (samples of one prompt share an id) and may differ in size.
Everything here is a pure tensor function; a method plugs in by building its own A[B, T]
and M[B, T] and handing them to ``losses.policy_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

RewardScale = Literal["std", "none"]
Baseline = Literal["mean", "leave_one_out"]
ZeroVarianceMode = Literal["keep", "drop"]

REWARD_SCALES: tuple[str, ...] = ("std", "none")
BASELINES: tuple[str, ...] = ("mean", "leave_one_out")
ZERO_VARIANCE_MODES: tuple[str, ...] = ("keep", "drop")


def _check_group_inputs(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have the shape of rewards {tuple(rewards.shape)}, got {tuple(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")


def group_mean_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std of its group's rewards.

    rewards: (B,) float; group_ids: (B,) int, any values, groups of any size.
    Returns (mean (B,), std (B,)); a single-sample group has std 0 (not NaN).
    """
    _check_group_inputs(rewards, group_ids)
    _, index = torch.unique(group_ids, return_inverse=True)  # index: (B,) in [0, G)
    num_groups = int(index.max().item()) + 1 if index.numel() else 0
    counts = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    counts.index_add_(0, index, torch.ones_like(rewards))
    sums = torch.zeros_like(counts).index_add_(0, index, rewards)
    mean = (sums / counts)[index]  # (B,)
    squared = torch.zeros_like(counts).index_add_(0, index, (rewards - mean) ** 2)
    # Bessel correction; a singleton's squared deviation is 0, so 0 / 1 keeps its std at 0.
    std = torch.sqrt(squared / (counts - 1).clamp(min=1))[index]  # (B,)
    return mean, std


def zero_variance_samples(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True for samples whose group has no reward spread (incl. singleton groups)."""
    _, std = group_mean_std(rewards, group_ids)
    return torch.isclose(std, torch.zeros_like(std))


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scale: RewardScale = "std",
    eps: float = 1e-4,
    baseline: Baseline = "mean",
) -> torch.Tensor:
    """Group-relative outcome advantage per sample.

    GRPO (DeepSeekMath): (r - mean_g) / (std_g + eps). Dr. GRPO: scale="none", r - mean_g.
    RLOO: baseline="leave_one_out", scale="none": n_g / (n_g - 1) * (r - mean_g).
    rewards: (B,) float; group_ids: (B,) int. Returns advantages: (B,). A zero-variance
    group (and a singleton group) gets exactly 0 in every mode, never NaN.
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    mean, std = group_mean_std(rewards, group_ids)
    centred = rewards - mean  # (B,)
    if baseline == "leave_one_out":
        _, index = torch.unique(group_ids, return_inverse=True)
        counts = torch.zeros(int(index.max()) + 1, dtype=rewards.dtype, device=rewards.device)
        counts = counts.index_add_(0, index, torch.ones_like(rewards))[index]  # (B,) group sizes
        # r_i minus the mean of the other n - 1 rewards; a singleton has no others: 0.
        centred = torch.where(counts > 1, centred * counts / (counts - 1).clamp(min=1), torch.zeros_like(centred))
    if scale == "none":
        return centred
    return centred / (std + eps)


def to_token_advantages(advantages: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample advantage to every valid completion token.

    advantages: (B,); completion_mask: (B, T) bool or {0, 1}. Returns (B, T), 0 on padding.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must have shape (B,), got {tuple(advantages.shape)}")
    if completion_mask.dim() != 2 or completion_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"completion_mask must have shape (B={advantages.shape[0]}, T), got {tuple(completion_mask.shape)}"
        )
    return advantages[:, None] * completion_mask.to(advantages.dtype)


@dataclass(frozen=True)
class OutcomeAdvantages:
    """Result of ``outcome_advantages``: the (b) and (c) pieces of a plain GRPO-style method."""

    advantages: torch.Tensor  # (B, T), 0 wherever mask is 0
    mask: torch.Tensor  # (B, T) bool: tokens that enter the loss and its normaliser
    num_zero_variance_groups: int  # groups with no reward spread (kept or dropped)
    num_dropped_groups: int  # groups masked out ("drop" mode), else 0


def outcome_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    scale: RewardScale = "std",
    eps: float = 1e-4,
    zero_variance: ZeroVarianceMode = "keep",
    baseline: Baseline = "mean",
) -> OutcomeAdvantages:
    """Token-level outcome advantages and loss mask with the zero-variance mode applied.

    rewards: (B,); group_ids: (B,); completion_mask: (B, T). Returns advantages (B, T) and
    mask (B, T). "keep": zero-variance groups keep advantage 0 and count in the normaliser;
    "drop": their rows of the mask are all False (DAPO dynamic sampling's effect).
    """
    if zero_variance not in ZERO_VARIANCE_MODES:
        raise ValueError(f"zero_variance must be one of {ZERO_VARIANCE_MODES}, got {zero_variance!r}")
    per_sample = grpo_advantages(rewards, group_ids, scale=scale, eps=eps, baseline=baseline)  # (B,)
    flat = zero_variance_samples(rewards, group_ids)  # (B,)
    num_flat_groups = int(torch.unique(group_ids[flat]).numel())
    mask = completion_mask.bool()  # (B, T)
    num_dropped = 0
    if zero_variance == "drop":
        mask = mask & ~flat[:, None]
        num_dropped = num_flat_groups
    return OutcomeAdvantages(
        advantages=to_token_advantages(per_sample, mask),
        mask=mask,
        num_zero_variance_groups=num_flat_groups,
        num_dropped_groups=num_dropped,
    )
