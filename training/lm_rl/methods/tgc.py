"""TGC: Token Gradient Cancellation (arXiv 2604.13088 v1), as transforms of the GRPO core.

The paper's claim (abstract and introduction; no official code): an intra-group objective
must keep gradient exchangeability, so that gradients cancel on weak-credit, high-frequency
tokens; without it training pays a "learning tax", the probability of solutions drifts and
entropy collapses. Our reconstruction (docs/papers/lm-rl.md, method 4):

An identical (context, token) pair occurring in k responses of one group receives the
gradient ``sum_i c_i A_i grad log pi(token | context)``: ``grad log pi`` is the same vector
for all k, so the sum cancels for every such pair iff the per-response weights ``c_i`` are
equal and ``sum_i A_i = 0`` over the group. What breaks it, and the transform that restores it:

- Per-response ``1/|o_i|`` normalisation (GRPO's ``seq_mean_token_mean``) gives
  ``c_i = 1/(B |o_i|)``: replaced by a group-constant normaliser, aggregation
  ``"constant"`` (``c_i = 1/(B * max_completion_length)``, the same for every response).
- Advantages that do not sum to 0: ``zero_sum_advantages`` centres each group's rewards
  and scales them by one factor per group only (GRPO's std, RLOO's n/(n-1), or none).
  The core's outcome advantages already satisfy this in exact arithmetic for every preset
  (mean or leave-one-out baseline, group-constant scale, 0 for zero-variance groups);
  in float32 the rounding of the mean and of the std division leaves group sums up to
  ~5e-6 (groups of 7 uniform rewards), so they are recomputed in float64 and re-centred
  before the cast back, leaving only the final rounding of each element (~1e-7).
- Per-response ratios and clipping: ``ratio="sequence"`` uses GSPO's length-normalised
  sequence ratio ``s_i``, whose gradient ``s_i/|o_i| sum_t grad log pi_t`` times the
  ``|o_i|`` tokens it covers under the constant normaliser gives ``c_i = s_i / (B L)``:
  equal for all i at the on-policy point ``s_i = 1`` (one update per batch, as in our
  trainer). ``ratio="token"`` keeps per-token ratios, which are equal for identical
  (context, token) pairs because pi and pi_old see the same context. The clip range is made
  symmetric (``clip_low == clip_high == clip``); PPO's ``min`` still treats A > 0 and A < 0
  differently once a ratio leaves the range, so exact cancellation is guaranteed while the
  ratios stay inside it, which includes the on-policy update.

Diagnostics (``training.lm_rl.diagnostics``, shared with every method): the drift of the
mean log-prob of frequent tokens on a fixed probe set built from the initial policy's
completions on held-out prompts, and the policy's next-token entropy on the same contexts;
per step, the Monte-Carlo entropy estimate of the sampled tokens. The probe and its initial
reading live in ``state_dict``, so a resumed run reports the same drift.
"""
from __future__ import annotations

from typing import Any

import torch

from training.lm_rl.core import LossConfig, grpo_advantages, group_mean_std, to_token_advantages
from training.lm_rl.diagnostics import FrequentTokenProbe, sampled_entropy_estimate
from training.lm_rl.methods import register_method
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext
from training.lm_rl.tasks import Problem, make_split

RATIOS: tuple[str, ...] = ("sequence", "token")


def zero_sum_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, loss: LossConfig) -> torch.Tensor:
    """Per-sample advantages that sum to 0 within every group.

    rewards: (B,) float; group_ids: (B,) int. The config's baseline ("mean" or
    "leave_one_out") and scale ("std" or "none") are both a group-constant multiple of the
    centred rewards, so the group sum is 0 in exact arithmetic; computing in float64 and
    subtracting the group mean of the result once more removes the rounding residual.
    Returns (B,) in the rewards' dtype.
    """
    wide = rewards.double()
    advantages = grpo_advantages(
        wide, group_ids, scale=loss.scale_rewards, eps=loss.advantage_eps, baseline=loss.baseline
    )  # (B,)
    residual, _ = group_mean_std(advantages, group_ids)  # (B,) each group's mean advantage
    return (advantages - residual).to(rewards.dtype)


@register_method("tgc")
class TGC(Method):
    """GRPO with the loss transforms that keep token gradients exchangeable within a group.

    Options: ``ratio`` ("sequence" | "token", default "sequence"), ``clip`` (the symmetric
    clip range, default 0.2), and the probe of the diagnostics: ``probe_prompts`` held-out
    prompts (default 16), ``probe_top_k`` frequent tokens (default 8), ``probe_seed``
    (default 0) for the held-out draw and the probe's sampling.
    """

    name = "tgc"
    default_loss = "grpo"

    def __init__(
        self,
        ratio: str = "sequence",
        clip: float = 0.2,
        probe_prompts: int = 16,
        probe_top_k: int = 8,
        probe_seed: int = 0,
    ) -> None:
        if ratio not in RATIOS:
            raise ValueError(f"tgc option ratio must be one of {RATIOS}, got {ratio!r}")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < 1:
            raise ValueError(f"tgc option clip must be a number in [0, 1), got {clip!r}")
        for option, value, lowest in (("probe_prompts", probe_prompts, 1), ("probe_top_k", probe_top_k, 1),
                                      ("probe_seed", probe_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"tgc option {option} must be an int >= {lowest}, got {value!r}")
        self.ratio = ratio
        self.clip = float(clip)
        self.probe_prompts = probe_prompts
        self.probe_top_k = probe_top_k
        self.probe_seed = probe_seed
        self.probe: FrequentTokenProbe | None = None

    def loss_overrides(self) -> dict[str, Any]:
        """Group-constant normaliser, the chosen ratio level and a symmetric clip range."""
        return {
            "aggregation": "constant",
            "ratio_level": self.ratio,
            "clip_low": self.clip,
            "clip_high": self.clip,
        }

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """(a) Plain groups; the first call also fixes the probe set while the policy is
        still the initial one (every trainer builds groups before its first update)."""
        if self.probe is None:
            held_out = make_split(
                problems[0].task, "test", self.probe_prompts, problems[0].difficulty, seed=self.probe_seed
            )
            self._build_probe(ctx, held_out)
        batch = super().build_groups(ctx, problems)
        sampled = batch.completion_mask & ~batch.forced_mask  # (B, T)
        batch.metrics["sampled_token_entropy"] = sampled_entropy_estimate(batch.old_logp, sampled)
        return batch

    def _build_probe(self, ctx: RolloutContext, problems: list[Problem]) -> None:
        # Its own generator, so fixing the probe does not move the training sample stream.
        device = next(ctx.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.probe_seed)
        self.probe = FrequentTokenProbe.build(
            ctx.model, ctx.tokenizer, [ctx.encode_prompt(p.prompt) for p in problems],
            ctx.sampling, self.probe_top_k, generator,
        )

    def advantages(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """(b) A[B, T]: zero-sum group advantages on every token of the loss mask."""
        per_sample = zero_sum_advantages(batch.rewards, batch.group_ids, loss)  # (B,)
        return to_token_advantages(per_sample, self.mask(batch, loss))

    @torch.no_grad()
    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """Frequent-token log-prob drift and entropy on the probe set.

        A probe not yet built (evaluation before any training step) is built here from
        ``problems``, so the current policy is its initial one and the drift is 0.
        """
        if self.probe is None:
            if not problems:
                return {}
            self._build_probe(ctx, problems[: self.probe_prompts])
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        now, drift = self.probe.drift(ctx.model, pad_id)
        return {
            "tgc/frequent_token_logp": now.frequent_token_logp,
            "tgc/frequent_token_logp_drift": drift.frequent_token_logp,
            "tgc/entropy": now.entropy,
            "tgc/entropy_drift": drift.entropy,
        }

    def state_dict(self) -> dict[str, Any]:
        return {} if self.probe is None else {"probe": self.probe.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"probe"}:
            raise ValueError(f"tgc state holds only 'probe', got keys {sorted(state)}")
        self.probe = FrequentTokenProbe.from_state_dict(state["probe"]) if "probe" in state else None
