"""CERL, Counterfactual Erasure RL (arXiv 2606.05201): reward a committed state that suffices.

What the paper says (abstract; no official code): generations are hidden thoughts H followed
by a committed answer/state A. Under the same prefix, a keep path (x + H + A) and an erasure
path (x + A, H erased) are evaluated, and the reward is given only when the erasure path is
still correct: the state the model commits must carry what later turns need (persistent-state
sufficiency). Baselines: correctness-only RL and long-answer SFT.

What is ours (reconstruction, docs/cerl.md):
- Format and contexts: ``training.lm_rl.committed`` (``<think>`` / ``<state>`` / ``Answer:``);
  keep and erase contexts are built from the *sampled tokens* of each completion and differ
  exactly by the thoughts span.
- "Still correct" is tested with a follow-up question every committed-format problem carries
  (``Problem.meta["followup"]``), appended to both paths; each path is continued greedily
  (``followup_tokens`` budget, no tools) and verified exactly. Greedy, because the probe is a
  measurement of the committed state, not a sample to learn from.
- Reward of a sample (0/1), with c = the verifier on the completion's final answer (which
  also requires the committed format), e / k = the follow-up verdict on the erasure / keep path:
      variant "erasure_only"    (default): r = c * e
      variant "erasure_x_keep":            r = c * e * k
  A malformed completion (no thoughts span, no state or no answer) gets 0 and no probe.
  ``erasure_x_keep`` also asks the answer to be right when the thoughts are there, which rules
  out a state that "helps" only by contradicting the thoughts.
- Plug-in: groups, advantages and masks are plain GRPO's (``Method``); only the reward
  changes, and the advantages sit on the original completion tokens (the probe continuations
  are never trained on). Probe tokens count in ``num_generated_tokens`` (compute spent).
- ``batch.correct`` stays the verifier's verdict on the main answer, so the trainer's
  accuracy is comparable with the other methods; the CERL reward is ``batch.rewards``.

Shapes: P problems per step, G = ``ctx.group_size``, B = P * G samples.
"""
from __future__ import annotations

from typing import Any

import torch

from training.lm_rl.committed import parse_committed, require_followup
from training.lm_rl.erasure import FOLLOWUP_TOKENS, erasure_statistics, evaluate_erasure, probe_followups
from training.lm_rl.methods import register_method
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext
from training.lm_rl.tasks import Problem

VARIANTS = ("erasure_only", "erasure_x_keep")


def cerl_reward(
    problem: Problem, completion: str, erase_followup: str, keep_followup: str = "", variant: str = "erasure_only"
) -> float:
    """The CERL reward of one sample from texts (see the module docstring); never raises on model text.

    completion: the sampled completion; erase_followup / keep_followup: the follow-up answers
    generated on the erasure / keep path.
    """
    if variant not in VARIANTS:
        raise ValueError(f"CERL variant must be one of {VARIANTS}, got {variant!r}")
    family = require_followup(problem)
    if parse_committed(completion) is None or not family.verify(problem, completion):
        return 0.0
    if not family.verify_followup(problem, erase_followup):
        return 0.0
    if variant == "erasure_x_keep" and not family.verify_followup(problem, keep_followup):
        return 0.0
    return 1.0


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"cerl option {name} must be an int >= {minimum}, got {value!r}")


@register_method("cerl")
class CERL(Method):
    """GRPO groups rewarded by the erasure path's follow-up answer.

    variant: "erasure_only" (r = answer correct AND erasure-path follow-up correct) or
        "erasure_x_keep" (additionally the keep-path follow-up correct).
    followup_tokens: budget of each greedy follow-up continuation (int >= 1).
    eval_problems: held-out problems ``evaluate`` runs the erasure protocol on (int >= 0).
    """

    name = "cerl"
    default_loss = "grpo"

    def __init__(
        self, variant: str = "erasure_only", followup_tokens: int = FOLLOWUP_TOKENS, eval_problems: int = 32,
        **unknown: Any,
    ) -> None:
        # Options arrive from the CLI as free-form KEY=VALUE pairs: a misspelt key must be a
        # clear ValueError, not a TypeError from the call.
        if unknown:
            raise ValueError(
                f"unknown cerl option(s) {sorted(unknown)}; valid options: variant, followup_tokens, eval_problems"
            )
        if variant not in VARIANTS:
            raise ValueError(f"cerl option variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        _check_count("followup_tokens", followup_tokens, 1)
        _check_count("eval_problems", eval_problems, 0)
        self.variant = variant
        self.followup_tokens = followup_tokens
        self.eval_problems = eval_problems

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """G samples per problem; each well-formed sample probed on its keep and erase paths.

        Returns B = P * G rows; ``rewards`` the CERL reward, ``correct`` the main answer's
        verdict, info "erase_correct" / "keep_correct" / "wellformed" (B,) bool.
        """
        for problem in problems:
            require_followup(problem)  # a clear error for tasks without follow-ups
        batch = super().build_groups(ctx, problems)
        rows = range(batch.size)
        completions = [batch.completion_ids[r][batch.completion_mask[r]].tolist() for r in rows]
        probe = probe_followups(
            ctx.model, ctx.tokenizer, [p.tolist() for p in batch.prompt_ids], completions, batch.texts,
            batch.problems, self.followup_tokens,
        )
        device = batch.rewards.device
        erase = torch.tensor(probe.erase_correct, dtype=torch.bool, device=device)
        keep = torch.tensor(probe.keep_correct, dtype=torch.bool, device=device)
        wellformed = torch.tensor(probe.wellformed, dtype=torch.bool, device=device)
        answer = batch.correct.bool()
        reward = answer & wellformed & erase
        if self.variant == "erasure_x_keep":
            reward = reward & keep
        batch.rewards = reward.to(torch.float32)
        batch.num_generated_tokens += probe.generated_tokens
        batch.info = {"erase_correct": erase, "keep_correct": keep, "wellformed": wellformed}
        stats = erasure_statistics(probe.keep_correct, probe.erase_correct)
        batch.metrics = {
            "acc_keep": stats["acc_keep"],
            "acc_erased": stats["acc_erased"],
            "flip_rate": stats["flip_rate"],
            "wellformed": float(wellformed.float().mean()),
            "reward": float(batch.rewards.mean()),
            "probe_tokens": float(probe.generated_tokens),
        }
        return batch

    @torch.no_grad()
    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """The erasure protocol (greedy) on the first ``eval_problems`` held-out problems."""
        if not problems or self.eval_problems == 0:
            return {}
        stats = evaluate_erasure(
            ctx.model, ctx.tokenizer, problems[: self.eval_problems], ctx.sampling.max_new_tokens,
            self.followup_tokens,
        )
        return {f"cerl/{key}": float(stats[key])
                for key in ("acc_keep", "acc_erased", "flip_rate", "reverse_flip_rate", "malformed_rate")}
