"""The plug-in contract of the GRPO core: a method is (a) a group constructor, (b) an
advantage function returning A[B, T] and (c) a mask function returning M[B, T].

``Method`` implements plain GRPO for all three; a paper's method overrides the pieces it
changes and keeps the rest. The trainer (ours, or the TRL adapter) owns the model update:
it calls ``build_groups`` once per step, then ``advantages`` and ``mask``, and feeds them to
the shared clipped-surrogate loss (``core.policy_loss_for``) with the configured preset.

Shapes: P prompts per step, B samples in the built batch (B = P * G for plain GRPO, more or
fewer when a method adds corrected or repaired samples), T the longest completion.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from training.lm_rl.core import LossConfig, outcome_advantages_for
from training.lm_rl.rollout import Rollout, SamplingConfig, generate
from training.lm_rl.tasks import Problem

# (completions, problems) -> (reward (B,), correctness (B,)), both float32 on the CPU.
ScoreFn = Callable[[list[str], list[Problem]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RolloutContext:
    """What a group constructor may use: the current policy, its sampler and the verifier.

    ``sample`` and ``score`` are the only ways a method touches the model and the rewards,
    so one method runs unchanged under our trainer and under the TRL adapter.
    """

    model: torch.nn.Module
    tokenizer: Any
    sampling: SamplingConfig
    generator: torch.Generator
    group_size: int
    score: ScoreFn
    encode_prompt: Callable[[str], list[int]]

    def sample(
        self,
        prompts: list[list[int]],
        num_samples_per_prompt: int,
        prefixes: list[list[int]] | None = None,
        max_new_tokens: int | None = None,
    ) -> Rollout:
        """Sample completions of token-id prompts with the run's sampling settings.

        prefixes: forced completion tokens per sample (see ``rollout.generate``).
        max_new_tokens: a smaller budget for this call (e.g. one segment of EqLen).
        """
        config = self.sampling
        if max_new_tokens is not None and max_new_tokens != config.max_new_tokens:
            config = SamplingConfig(
                max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                stop_strings=config.stop_strings, seed=config.seed,
            )
        return generate(
            self.model, self.tokenizer, prompts, config,
            num_samples_per_prompt=num_samples_per_prompt, prefixes=prefixes, generator=self.generator,
        )


@dataclass
class GroupBatch:
    """The samples one training step learns from (row i of every (B, ...) field is one sample).

    ``old_logp`` is the sampling-time untempered log-prob (``Rollout.logp_raw``): GRPO's
    pi_old. ``info`` carries per-sample data a method's advantage or mask function needs
    (e.g. which layer a sample belongs to); ``metrics`` carries the step's method metrics
    (logged under ``method/``).
    """

    problems: list[Problem]  # B, the problem each sample answers (for rewards and logging)
    prompt_ids: list[torch.Tensor]  # B tensors (L_i,) long: the context the completion follows
    completion_ids: torch.Tensor  # (B, T) long, right-padded
    completion_mask: torch.Tensor  # (B, T) bool, valid completion tokens
    forced_mask: torch.Tensor  # (B, T) bool, tokens that were forced, not sampled
    old_logp: torch.Tensor  # (B, T) float32, 0 where completion_mask is False
    texts: list[str]  # B decoded completions
    group_ids: torch.Tensor  # (B,) long: samples compared with each other share an id
    rewards: torch.Tensor  # (B,) float32
    correct: torch.Tensor  # (B,) float32 in {0, 1}: the verifier's verdict
    num_generated_tokens: int  # tokens sampled to build the batch (the compute budget)
    finish_reason: list[str]  # B of "eos" | "stop" | "length"
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # (B,) bool: samples drawn as the policy's own answers to the step's problems. Rows a
    # method adds on top (MGRPO corrections, repaired trajectories) are False, so the
    # trainer's reward and accuracy describe the policy, not the method's extra rows.
    primary: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.primary is None:
            self.primary = torch.ones(len(self.texts), dtype=torch.bool, device=self.rewards.device)

    @property
    def size(self) -> int:
        return len(self.texts)

    @classmethod
    def from_rollout(
        cls, rollout: Rollout, problems: list[Problem], rewards: torch.Tensor, correct: torch.Tensor
    ) -> GroupBatch:
        device = rollout.completion_ids.device
        return cls(
            problems=list(problems),
            prompt_ids=list(rollout.prompt_ids),
            completion_ids=rollout.completion_ids,
            completion_mask=rollout.completion_mask,
            forced_mask=rollout.forced_mask,
            old_logp=rollout.logp_raw,
            texts=list(rollout.texts),
            group_ids=rollout.group_ids,
            rewards=rewards.to(device),
            correct=correct.to(device),
            num_generated_tokens=rollout.num_generated_tokens,
            finish_reason=list(rollout.finish_reason),
        )


def concat_batches(batches: list[GroupBatch]) -> GroupBatch:
    """Stack batches row-wise, right-padding completions to the longest T.

    Group ids are kept as given: callers that merge independent batches offset them first.
    ``info`` entries that are tensors with a leading B dimension or lists of length B are
    concatenated (2-D tensors are per-token, (B, T), and padded with 0 / False like the
    completions); metrics are merged (later batches win on equal keys).
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    width = max(b.completion_ids.shape[1] for b in batches)

    def pad(tensor: torch.Tensor, value: Any) -> torch.Tensor:
        extra = width - tensor.shape[1]
        return torch.nn.functional.pad(tensor, (0, extra), value=value) if extra else tensor

    info: dict[str, Any] = {}
    for key in batches[0].info:
        values = [b.info[key] for b in batches]
        if isinstance(values[0], torch.Tensor) and values[0].dim() == 2:
            # Per-token entries (B, T) follow the completions' padding to the common width.
            info[key] = torch.cat([pad(v, 0) for v in values])
        elif isinstance(values[0], torch.Tensor):
            info[key] = torch.cat(values)
        else:
            info[key] = [item for value in values for item in value]
    metrics: dict[str, float] = {}
    for b in batches:
        metrics.update(b.metrics)
    return GroupBatch(
        problems=[p for b in batches for p in b.problems],
        prompt_ids=[p for b in batches for p in b.prompt_ids],
        completion_ids=torch.cat([pad(b.completion_ids, 0) for b in batches]),
        completion_mask=torch.cat([pad(b.completion_mask, False) for b in batches]),
        forced_mask=torch.cat([pad(b.forced_mask, False) for b in batches]),
        old_logp=torch.cat([pad(b.old_logp, 0.0) for b in batches]),
        texts=[t for b in batches for t in b.texts],
        group_ids=torch.cat([b.group_ids for b in batches]),
        rewards=torch.cat([b.rewards for b in batches]),
        correct=torch.cat([b.correct for b in batches]),
        num_generated_tokens=sum(b.num_generated_tokens for b in batches),
        finish_reason=[r for b in batches for r in b.finish_reason],
        info=info,
        metrics=metrics,
        primary=torch.cat([b.primary for b in batches]),
    )


class Method:
    """Plain GRPO-family method; subclasses override the pieces their paper changes.

    ``name`` is the registry key; ``default_loss`` the loss preset used unless the user picks
    another (``--loss``). A method with state that must survive a resume (running
    statistics, diagnostics) returns it from ``state_dict`` as tensors / plain Python data.
    """

    name = "grpo"
    default_loss = "grpo"

    def loss_overrides(self) -> dict[str, Any]:
        """LossConfig fields the method sets on top of the chosen preset (e.g. TGC's
        group-constant normaliser); none by default."""
        return {}

    def max_completion_length(self, max_new_tokens: int) -> int:
        """Longest completion (forced + sampled tokens) this method builds for a sampling budget;
        Dr. GRPO's constant normaliser. Methods that force prefixes override it."""
        return max_new_tokens

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """(a) ``ctx.group_size`` samples per problem, one group per problem."""
        prompts = [ctx.encode_prompt(p.prompt) for p in problems]
        rollout = ctx.sample(prompts, ctx.group_size)
        expanded = [p for p in problems for _ in range(ctx.group_size)]  # group-major
        rewards, correct = ctx.score(rollout.texts, expanded)
        return GroupBatch.from_rollout(rollout, expanded, rewards, correct)

    def advantages(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """(b) A[B, T]: the group-relative outcome advantage on every completion token."""
        return outcome_advantages_for(loss, batch.rewards, batch.group_ids, batch.completion_mask).advantages

    def mask(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """(c) M[B, T]: sampled completion tokens; zero-variance groups dropped if configured."""
        sampled = batch.completion_mask & ~batch.forced_mask
        return outcome_advantages_for(loss, batch.rewards, batch.group_ids, sampled).mask

    @torch.no_grad()
    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """Method-specific held-out metrics (beyond greedy accuracy); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")
