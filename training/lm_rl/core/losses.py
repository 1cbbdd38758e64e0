"""The shared clipped-surrogate loss of the GRPO core (one loss for every method).

Per token (PPO clip, as used by GRPO, Shao et al. 2024, DeepSeekMath Eq. 3):

    L_it = -min(w_it * A_it, clip(w_it, 1 - clip_low, 1 + clip_high) * A_it) + beta * KL_it

- ``w_it`` at ``ratio_level="token"``: pi_theta / pi_old of token t.
  At ``ratio_level="sequence"`` (GSPO, Zheng et al. 2025, Eq. 7):
  ``s_i = exp(mean over valid t of (log pi_theta - log pi_old))``, used for every token of i.
- Clip-higher (DAPO, Yu et al. 2025, Sec. 3.1): ``clip_high > clip_low`` (0.28 vs 0.2).
- ``KL_it`` is the k3 estimator of KL(pi_theta || pi_ref) (DeepSeekMath Eq. 4):
  ``exp(ref - logp) - (ref - logp) - 1``, added inside the same aggregation.

Aggregation, matching ``GRPOTrainer._compute_loss`` in Hugging Face TRL
(trl/trainer/grpo_trainer.py, read at commit f2cd577), with M the loss mask:

- ``"seq_mean_token_mean"`` = TRL ``loss_type="grpo"``:
  ``((L * M).sum(-1) / M.sum(-1).clamp(min=1)).mean()``
- ``"constant"`` = TRL ``loss_type="dr_grpo"`` (Liu et al. 2025):
  ``(L * M).sum() / (L.size(0) * max_completion_length)``
- ``"token_mean"`` = TRL ``loss_type="dapo"`` (one process, no gradient accumulation, where
  ``num_items_in_batch`` is the number of loss tokens): ``(L * M).sum() / M.sum().clamp(min=1)``

One deliberate difference: a row with no valid token (e.g. a group dropped as zero-variance)
is not counted as a sequence in the first two normalisers, as if it had never been in the
batch (DAPO's dynamic sampling). When every row has a valid token this is TRL's B exactly.

Only ``logp`` carries gradient: ``old_logp``, ``ref_logp`` and ``advantages`` are constants of
the update and are detached here.
"""
from __future__ import annotations

from typing import Literal

import torch

RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["seq_mean_token_mean", "constant", "token_mean"]

RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
AGGREGATIONS: tuple[str, ...] = ("seq_mean_token_mean", "constant", "token_mean")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1.

    logp, ref_logp: (B, T). Returns (B, T), >= 0, exactly 0 where ref_logp == logp.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def importance_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, ratio_level: RatioLevel = "token"
) -> torch.Tensor:
    """pi_theta / pi_old per token (GRPO) or per sequence broadcast to its tokens (GSPO).

    logp, old_logp: (B, T); mask: (B, T) bool. Returns ratio: (B, T); 1 on masked tokens.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    # where() keeps padding (possibly -inf log-probs) out of both the value and the gradient.
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))  # (B, T)
    if ratio_level == "sequence":
        lengths = mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        log_ratio = (log_ratio.sum(-1, keepdim=True) / lengths).expand_as(logp)  # (B, T)
    return torch.exp(log_ratio)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """Per-token PPO-clip loss -min(w A, clip(w, 1 - clip_low, 1 + clip_high) A).

    ratio, advantages: (B, T). Returns (B, T), unmasked.
    """
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) over the valid tokens of mask (B, T) to a scalar.

    See the module docstring for the three formulas and their TRL names.
    """
    mask = mask.bool()
    weights = mask.to(per_token.dtype)
    masked_sum = per_token.masked_fill(~mask, 0.0)  # (B, T)
    num_sequences = (weights.sum(-1) > 0).sum().clamp(min=1)  # rows that are part of the batch
    if aggregation == "seq_mean_token_mean":
        per_sequence = masked_sum.sum(-1) / weights.sum(-1).clamp(min=1)  # (B,)
        return per_sequence.sum() / num_sequences
    if aggregation == "constant":
        if max_completion_length is None:
            raise ValueError("aggregation='constant' needs max_completion_length (Dr. GRPO's normaliser)")
        return masked_sum.sum() / (num_sequences * max_completion_length)
    if aggregation == "token_mean":
        return masked_sum.sum() / weights.sum().clamp(min=1)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shape = tensors["logp"].shape
    if len(shape) != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(shape)}, got {tuple(tensor.shape)}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio_level: RatioLevel = "token",
    aggregation: Aggregation = "seq_mean_token_mean",
    max_completion_length: int | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + beta * KL(k3), aggregated as GRPO / Dr. GRPO / DAPO.

    logp: (B, T) log pi_theta of the sampled tokens (carries gradient);
    old_logp: (B, T) log pi_old; advantages: (B, T) per-token A (a (B,) advantage goes
    through ``to_token_advantages`` first); mask: (B, T) bool or {0, 1}, the tokens that
    enter the loss; ref_logp: (B, T) log pi_ref, required when beta > 0.
    Returns (loss scalar, stats) with stats keys ``clip_fraction`` (share of valid tokens
    whose ratio is clipped in the direction of their advantage, TRL's region clip ratio),
    ``ratio_mean`` and ``kl_mean`` (means over valid tokens; kl_mean is 0 without ref_logp)
    and ``num_tokens`` (valid tokens counted).
    """
    _check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference policy's log-probs)")
    if max_completion_length is not None and logp.shape[1] > max_completion_length:
        raise ValueError(
            f"completions have T={logp.shape[1]} tokens, more than max_completion_length={max_completion_length}"
        )
    mask = mask.bool()
    advantages = advantages.detach()

    ratio = importance_ratio(logp, old_logp, mask, ratio_level)  # (B, T)
    per_token = clipped_surrogate(ratio, advantages, clip_low, clip_high)  # (B, T)
    kl = None
    if ref_logp is not None:
        # Padding is zeroed before exp() so that -inf log-probs there cannot reach the gradient.
        zeros = torch.zeros_like(logp)
        kl = kl_k3(torch.where(mask, logp, zeros), torch.where(mask, ref_logp.detach(), zeros))  # (B, T)
        if beta > 0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_completion_length)

    with torch.no_grad():
        weights = mask.to(logp.dtype)
        num_tokens = weights.sum()
        denom = num_tokens.clamp(min=1)
        clipped = ((ratio < 1 - clip_low) & (advantages < 0)) | ((ratio > 1 + clip_high) & (advantages > 0))
        stats = {
            "clip_fraction": float((clipped.to(logp.dtype) * weights).sum() / denom),
            "ratio_mean": float((ratio * weights).sum() / denom),
            "kl_mean": float((kl * weights).sum() / denom) if kl is not None else 0.0,
            "num_tokens": float(num_tokens),
        }
    return loss, stats
