"""Internalizing outcome supervision into process supervision (arXiv 2605.05226).

What the paper says (abstract and introduction; no official code): under outcome-only
reward the model identifies, corrects and reuses its own failed trajectories. It locates the
first wrong step of a failed sample (by self-verification or by comparison with successful
siblings), regenerates from the prefix before that step until the answer is correct, and
trains with A = 0 on the shared prefix, a negative advantage on the failed suffix and a
positive one on the corrected suffix; corrected trajectories are reused as extra group
members.

What is ours (reconstruction):
- Steps are lines. A step ends with a token whose decoded text ends in a newline
  (``step_starts``); the task scratchpads write one operation per line and end with an
  ``Answer: x`` line. A step's content is its decoded text without trailing newlines, so a
  final line followed by eos compares equal to the same line followed by more text.
- Localisation compares with successful siblings only; self-verification is not done
  (a policy trained from scratch cannot judge its own steps). The first wrong step of a
  failed sample f is step k* = max over successful siblings c of LCP(f, c), the number of
  leading steps f shares with c (``first_wrong_step``). Taking the longest common step
  prefix with ONE sibling, rather than matching each step index against any sibling, makes
  the prefix before k* a prefix of a verified-correct trajectory, so the regeneration
  starts from a state the policy was seen to solve from. When all of f's steps are a prefix
  of a success (f was cut short), no step is wrong and the failure is not located.
- Repair: up to ``max_attempts`` rounds; in each, every located failure not yet repaired
  gets one continuation of its forced prefix (its tokens before step k*) at the full
  sampling budget, and the verifier decides. Failed attempts count in
  ``num_generated_tokens`` (compute spent) but are not trained on.
- Advantages. A_i is the loss preset's group-relative outcome advantage computed over the
  ORIGINAL G samples of the group only; mean_g and s_g are that group's reward mean and
  scale (std_g + eps under std scaling, 1 otherwise), and p_f the first token of step k*:

      located failure f:          A[f, t] = 0 for t < p_f,   A_f (< 0) for t >= p_f
      corrected sample c of f:    A[c, t] = 0 for t < p_f (its forced prefix, also masked),
                                  A_c = (r_c - mean_g) / s_g for t >= p_f
      every other sample i:       A[i, t] = A_i

  A_c is the credit a correct sample earns in its group (for 0/1 rewards and the mean
  baseline, exactly a successful sibling's A_i). The alternative |A_f| = mean_g / s_g would
  shrink towards 0 as successes get rarer, just when a repair carries the most information.
  The prefix zeros apply whether or not the repair succeeded: the evidence that the prefix
  is sound is the successful sibling sharing it. They stay in the loss mask with A = 0 (the
  paper's "A = 0", not a mask), so they still count in the normaliser and the KL term.
- Corrected samples are extra members that do not enter the group statistics: they are
  chosen by the verifier (rejection sampling from a chosen prefix), not drawn from the
  policy for the prompt, so putting them in the mean and std would bias the baseline upward
  and shrink every original sample's advantage. They get A_c directly.
  ``reuse_corrected=False`` keeps the repairs for the metrics and trains on the originals.
- Groups with no success: plain outcome advantages (0 for a 0/1 reward).

Shapes: P problems per step, G = ``ctx.group_size``; the batch holds the P * G original
samples (group-major) followed by one row per repaired failure. T is the longest completion.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from training.lm_rl.core import LossConfig, group_mean_std, grpo_advantages, outcome_advantages_for
from training.lm_rl.methods import register_method
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext, concat_batches
from training.lm_rl.tasks import Problem

# info keys of a batch built by Internalize.build_groups, each (B,).
EXTRA = "extra"  # bool: a corrected sample (outside the group statistics)
SUFFIX_START = "suffix_start"  # long: first token that carries the sample's advantage
SOURCE = "source"  # long: for a corrected sample, the row of the failure it repairs; else -1


def step_starts(token_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """Token positions where the steps (lines) of a completion begin.

    token_ids: the completion's valid tokens. A step ends after a token whose decoded text
    ends with a newline. Returns [0, ...] ascending, every entry < len(token_ids); [] for
    an empty completion.
    """
    ends_line: dict[int, bool] = {}  # decode each distinct id once
    starts = [0] if len(token_ids) else []
    for position, token in enumerate(token_ids[:-1]):
        if token not in ends_line:
            ends_line[token] = tokenizer.decode([token], skip_special_tokens=True).endswith("\n")
        if ends_line[token]:
            starts.append(position + 1)
    return starts


def step_texts(token_ids: Sequence[int], tokenizer: Any) -> tuple[list[int], list[str]]:
    """(step_starts, the content of each step: decoded text without trailing newlines)."""
    starts = step_starts(token_ids, tokenizer)
    ends = starts[1:] + [len(token_ids)]
    texts = [
        tokenizer.decode(list(token_ids[start:end]), skip_special_tokens=True).rstrip("\n")
        for start, end in zip(starts, ends)
    ]
    return starts, texts


class StepLocation(NamedTuple):
    """Where a failed completion goes wrong: its step index and that step's first token."""

    step: int
    position: int


def first_wrong_step(
    failed: Sequence[int], successes: Sequence[Sequence[int]], tokenizer: Any
) -> StepLocation | None:
    """First step of ``failed`` past its longest step prefix shared with any success.

    failed: the failed completion's valid token ids; successes: those of its successful
    siblings. Returns None when there is no success or every step of ``failed`` is a prefix
    of a success (nothing wrong to locate). See the module docstring for why the longest
    common prefix with one sibling is used.
    """
    if not successes:
        return None
    starts, steps = step_texts(failed, tokenizer)
    shared = 0
    for success in successes:
        _, reference = step_texts(success, tokenizer)
        common = 0
        while common < min(len(steps), len(reference)) and steps[common] == reference[common]:
            common += 1
        shared = max(shared, common)
    if shared >= len(steps):
        return None
    return StepLocation(step=shared, position=starts[shared])


def select_rows(batch: GroupBatch, rows: list[int]) -> GroupBatch:
    """The given rows of a batch (same T); tensor and list ``info`` entries are indexed too."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.completion_ids.device)
    info = {
        key: value[index] if isinstance(value, torch.Tensor) else [value[r] for r in rows]
        for key, value in batch.info.items()
    }
    return GroupBatch(
        problems=[batch.problems[r] for r in rows],
        prompt_ids=[batch.prompt_ids[r] for r in rows],
        completion_ids=batch.completion_ids[index],
        completion_mask=batch.completion_mask[index],
        forced_mask=batch.forced_mask[index],
        old_logp=batch.old_logp[index],
        texts=[batch.texts[r] for r in rows],
        group_ids=batch.group_ids[index],
        rewards=batch.rewards[index],
        correct=batch.correct[index],
        num_generated_tokens=batch.num_generated_tokens,
        finish_reason=[batch.finish_reason[r] for r in rows],
        info=info,
        metrics=dict(batch.metrics),
        primary=batch.primary[index],
    )


def valid_tokens(batch: GroupBatch, row: int) -> list[int]:
    """Completion token ids of one row without padding (forced prefix included)."""
    return batch.completion_ids[row][batch.completion_mask[row]].tolist()


@dataclass
class RepairOutcome:
    """What locating and repairing the failures of a batch of plain groups found."""

    failures_seen: int  # failed samples with at least one successful sibling
    located: dict[int, int]  # failed row -> token position of its first wrong step
    corrected: GroupBatch | None  # one row per repaired failure, info[SOURCE] = the failed row
    generated_tokens: int  # tokens sampled by every repair attempt, successful or not

    @property
    def failures_repaired(self) -> int:
        return 0 if self.corrected is None else self.corrected.size

    @property
    def repair_rate(self) -> float:
        """Repaired / seen failures (0.0 when none was seen)."""
        return self.failures_repaired / self.failures_seen if self.failures_seen else 0.0


def locate_and_repair(ctx: RolloutContext, batch: GroupBatch, max_attempts: int) -> RepairOutcome:
    """Locate the first wrong step of each failure with a successful sibling and regenerate
    from the prefix before it, up to ``max_attempts`` rounds (see the module docstring).

    batch: plain groups (every row sampled from its prompt, ``correct`` the verdict).
    """
    correct = batch.correct.bool().tolist()
    group_of = batch.group_ids.tolist()
    successes: dict[int, list[list[int]]] = {}
    for row, ok in enumerate(correct):
        if ok:
            successes.setdefault(group_of[row], []).append(valid_tokens(batch, row))
    seen = 0
    located: dict[int, int] = {}
    for row, ok in enumerate(correct):
        siblings = successes.get(group_of[row])
        if ok or not siblings:
            continue
        seen += 1
        where = first_wrong_step(valid_tokens(batch, row), siblings, ctx.tokenizer)
        if where is not None:
            located[row] = where.position

    pending = list(located)
    parts: list[GroupBatch] = []
    generated = 0
    for _ in range(max_attempts):
        if not pending:
            break
        problems = [batch.problems[row] for row in pending]
        rollout = ctx.sample(
            [batch.prompt_ids[row].tolist() for row in pending], 1,
            prefixes=[valid_tokens(batch, row)[: located[row]] for row in pending],
        )
        rewards, verdict = ctx.score(rollout.texts, problems)
        generated += rollout.num_generated_tokens
        attempt = GroupBatch.from_rollout(rollout, problems, rewards, verdict)
        fixed = [k for k, ok in enumerate(verdict.bool().tolist()) if ok]
        if fixed:
            part = select_rows(attempt, fixed)
            sources = torch.tensor([pending[k] for k in fixed], dtype=torch.long, device=batch.group_ids.device)
            part.group_ids = batch.group_ids[sources]
            part.info = {SOURCE: sources}
            parts.append(part)
        fixed_rows = {pending[k] for k in fixed}
        pending = [row for row in pending if row not in fixed_rows]
    return RepairOutcome(
        failures_seen=seen,
        located=located,
        corrected=concat_batches(parts) if parts else None,
        generated_tokens=generated,
    )


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"internalize option {name} must be an int >= {minimum}, got {value!r}")


@register_method("internalize")
class Internalize(Method):
    """Locate, repair and reuse failed samples; process-level advantages from outcome rewards.

    max_attempts: repair rounds per located failure (int >= 1).
    reuse_corrected: add repaired samples to the batch as extra group members (bool).
    eval_groups: held-out problems whose groups ``evaluate`` repairs (int >= 0; 0 skips it).
    """

    name = "internalize"
    default_loss = "grpo"

    def __init__(
        self, max_attempts: int = 2, reuse_corrected: bool = True, eval_groups: int = 8, **unknown: Any
    ) -> None:
        # Options arrive from the CLI as free-form KEY=VALUE pairs: a misspelt key must be a
        # clear ValueError, not a TypeError from the call.
        if unknown:
            raise ValueError(
                f"unknown internalize option(s) {sorted(unknown)}; valid options: "
                "max_attempts, reuse_corrected, eval_groups"
            )
        _check_count("max_attempts", max_attempts, 1)
        _check_count("eval_groups", eval_groups, 0)
        if not isinstance(reuse_corrected, bool):
            raise ValueError(f"internalize option reuse_corrected must be true or false, got {reuse_corrected!r}")
        self.max_attempts = max_attempts
        self.reuse_corrected = reuse_corrected
        self.eval_groups = eval_groups

    def max_completion_length(self, max_new_tokens: int) -> int:
        # A forced prefix is a proper prefix of a failed sample (at most max_new_tokens - 1
        # tokens), followed by a full sampling budget.
        return 2 * max_new_tokens - 1

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """G samples per problem, then the repairs of their located failures.

        Returns B = P * G (+ repaired failures when ``reuse_corrected``) rows with info
        EXTRA (B,) bool, SUFFIX_START (B,) long and SOURCE (B,) long (module constants).
        """
        base = super().build_groups(ctx, problems)
        outcome = locate_and_repair(ctx, base, self.max_attempts)
        device = base.group_ids.device
        suffix_start = torch.zeros(base.size, dtype=torch.long, device=device)
        for row, position in outcome.located.items():
            suffix_start[row] = position
        base.info = {
            EXTRA: torch.zeros(base.size, dtype=torch.bool, device=device),
            SUFFIX_START: suffix_start,
            SOURCE: torch.full((base.size,), -1, dtype=torch.long, device=device),
        }
        batch = base
        if self.reuse_corrected and outcome.corrected is not None:
            extra = outcome.corrected
            extra.info = {
                EXTRA: torch.ones(extra.size, dtype=torch.bool, device=device),
                # The forced prefix is exactly the failure's tokens before its wrong step.
                SUFFIX_START: extra.forced_mask.sum(dim=1),
                SOURCE: extra.info[SOURCE],
            }
            extra.primary = torch.zeros(extra.size, dtype=torch.bool, device=device)  # chosen by the verifier
            batch = concat_batches([base, extra])
        batch.num_generated_tokens = base.num_generated_tokens + outcome.generated_tokens
        located = len(outcome.located)
        batch.metrics = {
            "group_accuracy": float(base.correct.mean()),
            "failures_seen": float(outcome.failures_seen),
            "failures_located": float(located),
            "failures_repaired": float(outcome.failures_repaired),
            "repair_rate": outcome.repair_rate,
            "prefix_len_mean": sum(outcome.located.values()) / located if located else 0.0,
            "corrected_samples": float(batch.size - base.size),
            "repair_tokens": float(outcome.generated_tokens),
        }
        return batch

    def _parts(self, batch: GroupBatch, loss: LossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample advantage values (B,), loss mask M (B, T) and suffix starts (B,)."""
        missing = [key for key in (EXTRA, SUFFIX_START, SOURCE) if key not in batch.info]
        if missing:
            raise ValueError(
                f"internalize needs batch.info keys {missing}: build the batch with Internalize.build_groups"
            )
        extra = batch.info[EXTRA].bool()  # (B,)
        original = ~extra
        rewards, group_ids = batch.rewards, batch.group_ids
        sampled = batch.completion_mask & ~batch.forced_mask  # (B, T)
        values = torch.zeros_like(rewards)
        mask = sampled.clone()
        values[original] = grpo_advantages(
            rewards[original], group_ids[original], scale=loss.scale_rewards, eps=loss.advantage_eps,
            baseline=loss.baseline,
        )
        mask[original] = outcome_advantages_for(loss, rewards[original], group_ids[original], sampled[original]).mask
        if extra.any():
            source = batch.info[SOURCE][extra]  # (E,)
            if (source < 0).any() or extra[source.clamp(min=0)].any():
                raise ValueError(f"info[{SOURCE!r}] of a corrected sample must be the row of an original sample")
            mean = torch.zeros_like(rewards)
            std = torch.zeros_like(rewards)
            mean[original], std[original] = group_mean_std(rewards[original], group_ids[original])
            # An extra sample's baseline is the mean of all original samples of its group.
            centred = rewards[extra] - mean[source]
            values[extra] = centred / (std[source] + loss.advantage_eps) if loss.scale_rewards == "std" else centred
        return values, mask, batch.info[SUFFIX_START]

    def advantages(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """A[B, T]: the sample's value from its suffix start on, 0 before it and on padding."""
        values, _, suffix_start = self._parts(batch, loss)
        positions = torch.arange(batch.completion_ids.shape[1], device=values.device)  # (T,)
        on_suffix = batch.completion_mask & (positions[None, :] >= suffix_start[:, None])  # (B, T)
        # Zero-variance groups (the rows "drop" mode masks out) already have value 0.
        return values[:, None] * on_suffix.to(values.dtype)

    def mask(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """M[B, T]: sampled tokens; zero-variance groups of original samples dropped if configured."""
        return self._parts(batch, loss)[1]

    @torch.no_grad()
    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """Held-out repair rate: sample groups for the first ``eval_groups`` problems, then
        locate and repair their failures as in training. The counts are reported next to the
        rate, so a 0.0 from seeing no failure can be told apart from a measured 0."""
        if not problems or self.eval_groups == 0:
            return {}
        base = super().build_groups(ctx, problems[: self.eval_groups])
        outcome = locate_and_repair(ctx, base, self.max_attempts)
        return {
            "internalize/repair_rate": outcome.repair_rate,
            "internalize/failures_seen": float(outcome.failures_seen),
            "internalize/failures_located": float(len(outcome.located)),
            "internalize/failures_repaired": float(outcome.failures_repaired),
        }
