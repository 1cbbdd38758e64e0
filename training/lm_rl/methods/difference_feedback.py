"""Difference Feedback (arXiv 2603.27482): token-level key positions from repaired failures.

What the paper says (abstract; no official code): outcome-only GRPO gives sparse credit in
multi-step (visual) reasoning. Difference Feedback repairs erroneous trajectories, aligns
each failed trajectory with its repair and marks the positions that had to change as key
positions; their advantages are weighted, A_t = A * (1 + alpha * m_t) (or the loss is masked
to them), and the repaired trajectory may join the batch as a positive sample. It plugs
into any GRPO-like trainer; claimed +3% on MMStar and MathVista at matched compute.

What is ours (reconstruction, docs/difference_feedback.md):
- Failure point of a failed sample f (``failure_point``): the first token after the longest
  token prefix f shares with a successful sibling of its group; with no successful sibling,
  the start of f's final ``Answer:`` line (``fallback="answer"``, the default) or the start
  of the response (``fallback="response"``); position 0 when f has no answer line.
- Repair: f's tokens before the failure point are forced and the policy samples the rest
  under the prompt plus a hint line carrying the reference answer (``hinted_prompt``), up to
  ``max_attempts`` rounds; the verifier must accept the result. Repair tokens count in
  ``num_generated_tokens``, so a matched token budget charges them to the method.
- Alignment (``key_positions``): after the common prefix of f and its repair r, difflib's
  ``SequenceMatcher`` (no autojunk) aligns the remainders of the token-id sequences. Tokens
  of a ``replace`` or ``delete`` opcode are key on f; of a ``replace`` or ``insert`` opcode
  on r. An insertion has no failed token of its own, so the failed token emitted where the
  missing tokens belong is marked (and symmetrically for a deletion on r): that is the
  decision that went wrong (e.g. stopping a list one item early). Equal blocks after the
  first divergence are not key (``span="changed"``); ``span="suffix"`` marks every token
  from the first divergence on instead. Identical sequences have no key position.
- Advantages: the loss preset's group-relative outcome advantage A_i (every row, so the
  zero-variance mode and the scaling of the preset apply), then A_i,t = A_i (1 + alpha m_t).
  ``mode="mask"`` keeps A_i and restricts the loss mask of rows with key positions to those
  positions (the paper's mask-only variant).
- Repaired positives (``add_positive=True``): the repaired trajectory is trained as an extra
  member of its group, marked non-primary in GroupBatch, under the ORIGINAL prompt: its
  prompt ids are the failed sample's (no hint), and its ``old_logp`` is recomputed
  teacher-forced under that prompt, so pi_old is the policy on the context being trained.
  Its forced prefix (the failed sample's own tokens) stays out of the loss. It enters the
  group statistics: a group where every sample failed then has a spread (the repairs are
  the only successes), which is where outcome-only GRPO gets no signal at all. Without
  positives, only failures of mixed groups are repaired (elsewhere A_i = 0 and a repair
  could not change the loss).
- ``max_repairs_per_group`` bounds the repair compute per group (the first failures of the
  group in sampling order, which is random).

The hint is a line of text, so a policy must have learned to use it; the VLM warm start
(training.lm_rl.vlm.sft) shows hinted prompts in a share of its examples.

Shapes: P problems per step, G = ``ctx.group_size``; the batch holds the P * G original
samples (group-major) then one row per repaired failure (when ``add_positive``).
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from training.lm_rl.core import LossConfig, outcome_advantages_for
from training.lm_rl.methods import register_method
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext, concat_batches
from training.lm_rl.methods.internalize import select_rows, step_texts, valid_tokens
from training.lm_rl.rollout import sequence_logprobs
from training.lm_rl.tasks import ANSWER_PREFIX, Problem

HINT_TEMPLATE = "Hint: the answer is {answer}."
MODES = ("weight", "mask")
SPANS = ("changed", "suffix")
FALLBACKS = ("answer", "response")

# info keys of a batch built by DifferenceFeedback.build_groups.
KEY_MASK = "key_mask"  # (B, T) float32 in {0, 1}: m_t
SOURCE = "source"  # (B,) long: for a repaired positive, the row of the failure it repairs; else -1
FAILURE_POINT = "failure_point"  # (B,) long: the repair's start in a repaired failed row; else -1


def hinted_prompt(problem: Problem) -> str:
    """The prompt a repair samples under: the problem's prompt plus a hint line with its answer."""
    return f"{problem.prompt}\n{HINT_TEMPLATE.format(answer=problem.answer)}"


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens a and b share."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def answer_line_start(token_ids: Sequence[int], tokenizer: Any) -> int | None:
    """Token position where the last line starting with ``Answer:`` begins; None when none does."""
    starts, lines = step_texts(token_ids, tokenizer)
    found = None
    for start, line in zip(starts, lines):
        if line.lstrip().startswith(ANSWER_PREFIX):
            found = start
    return found


def failure_point(
    failed: Sequence[int], successes: Sequence[Sequence[int]], tokenizer: Any, fallback: str = "answer"
) -> tuple[int, str]:
    """(token position, how it was found) where the repair of ``failed`` starts.

    how: "sibling" (first token after the longest prefix shared with a success), "answer"
    (start of the final answer line) or "start" (position 0). The position is always a
    valid index of ``failed`` (< len(failed)) unless failed is empty (then 0), so at least
    one failed token is re-sampled.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    last = max(len(failed) - 1, 0)
    if successes:
        shared = max(common_prefix_length(failed, success) for success in successes)
        return min(shared, last), "sibling"
    if fallback == "answer":
        start = answer_line_start(failed, tokenizer)
        if start is not None:
            return min(start, last), "answer"
    return 0, "start"


def key_positions(
    failed: Sequence[int], repaired: Sequence[int], span: str = "changed"
) -> tuple[list[int], list[int]]:
    """Key-position masks (0/1 per token) of a failed sequence and its repair.

    See the module docstring: alignment from the first divergence with difflib opcodes;
    identical sequences give all zeros.
    """
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    failed, repaired = list(failed), list(repaired)
    m_failed = [0] * len(failed)
    m_repaired = [0] * len(repaired)
    start = common_prefix_length(failed, repaired)
    if start == len(failed) and start == len(repaired):
        return m_failed, m_repaired

    def mark(mask: list[int], lo: int, hi: int) -> None:
        for k in range(lo, min(hi, len(mask))):
            mask[k] = 1

    def mark_point(mask: list[int], at: int) -> None:
        # A gap on this side: mark its token where the other side's tokens belong.
        if mask:
            mask[min(at, len(mask) - 1)] = 1

    if span == "suffix":
        mark(m_failed, start, len(failed))
        mark(m_repaired, start, len(repaired))
        if start == len(failed):
            mark_point(m_failed, start)
        if start == len(repaired):
            mark_point(m_repaired, start)
        return m_failed, m_repaired
    matcher = difflib.SequenceMatcher(a=failed[start:], b=repaired[start:], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if tag in ("replace", "delete"):
            mark(m_failed, start + i1, start + i2)
        if tag in ("replace", "insert"):
            mark(m_repaired, start + j1, start + j2)
        if tag == "insert":
            mark_point(m_failed, start + i1)
        if tag == "delete":
            mark_point(m_repaired, start + j1)
    return m_failed, m_repaired


def weighted_advantages(advantages: torch.Tensor, key_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """A_t = A_t * (1 + alpha * m_t); advantages and key_mask (B, T)."""
    if advantages.shape != key_mask.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and key_mask {tuple(key_mask.shape)} must have the same shape"
        )
    return advantages * (1.0 + alpha * key_mask.to(advantages.dtype))


def teacher_forced_logprobs(
    ctx: RolloutContext, prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) untempered log-probs of completions under given prompts, without gradients;
    a context that needs more than token ids (a VLM's images) provides its own."""
    with torch.no_grad():
        own = getattr(ctx, "teacher_forced_logprobs", None)
        if own is not None:
            return own(prompt_ids, completion_ids, completion_mask)
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        return sequence_logprobs(ctx.model, prompt_ids, completion_ids, completion_mask, pad_id=pad_id)


@dataclass
class RepairOutcome:
    """Repairs of the failures of a batch of plain groups."""

    failures: int  # failed samples
    attempted: dict[int, tuple[int, str]] = field(default_factory=dict)  # row -> (failure point, how)
    repaired: GroupBatch | None = None  # one row per repaired failure; info[SOURCE] the failed row
    generated_tokens: int = 0  # sampled by every repair attempt, successful or not

    @property
    def num_repaired(self) -> int:
        return 0 if self.repaired is None else self.repaired.size

    @property
    def repair_rate(self) -> float:
        return self.num_repaired / len(self.attempted) if self.attempted else 0.0


def repair_failures(
    ctx: RolloutContext,
    batch: GroupBatch,
    *,
    max_attempts: int,
    fallback: str,
    mixed_groups_only: bool,
    max_per_group: int,
) -> RepairOutcome:
    """Locate the failure point of failed samples and re-sample from it with the answer hint.

    The repaired rows come back under the ORIGINAL prompt ids with ``old_logp`` recomputed
    there (see the module docstring); their ``forced_mask`` marks the failed prefix.
    """
    correct = batch.correct.bool().tolist()
    group_of = batch.group_ids.tolist()
    successes: dict[int, list[list[int]]] = {}
    for row, ok in enumerate(correct):
        if ok:
            successes.setdefault(group_of[row], []).append(valid_tokens(batch, row))
    outcome = RepairOutcome(failures=sum(not ok for ok in correct))
    taken: dict[int, int] = {}
    for row, ok in enumerate(correct):
        group = group_of[row]
        if ok or (mixed_groups_only and group not in successes):
            continue
        if max_per_group and taken.get(group, 0) >= max_per_group:
            continue
        taken[group] = taken.get(group, 0) + 1
        outcome.attempted[row] = failure_point(
            valid_tokens(batch, row), successes.get(group, []), ctx.tokenizer, fallback
        )
    pending = list(outcome.attempted)
    parts: list[GroupBatch] = []
    for _ in range(max_attempts):
        if not pending:
            break
        problems = [batch.problems[row] for row in pending]
        rollout = ctx.sample(
            [ctx.encode_prompt(hinted_prompt(problem)) for problem in problems], 1,
            prefixes=[valid_tokens(batch, row)[: outcome.attempted[row][0]] for row in pending],
        )
        outcome.generated_tokens += rollout.num_generated_tokens
        rewards, verdict = ctx.score(rollout.texts, problems)
        attempt = GroupBatch.from_rollout(rollout, problems, rewards, verdict)
        fixed = [k for k, ok in enumerate(verdict.bool().tolist()) if ok]
        if fixed:
            part = select_rows(attempt, fixed)
            sources = [pending[k] for k in fixed]
            # Train under the original prompt: the hint must not be part of the learned context.
            part.prompt_ids = [batch.prompt_ids[row] for row in sources]
            part.old_logp = teacher_forced_logprobs(
                ctx, part.prompt_ids, part.completion_ids, part.completion_mask
            ).to(part.old_logp.dtype)
            source_index = torch.tensor(sources, dtype=torch.long, device=batch.group_ids.device)
            part.group_ids = batch.group_ids[source_index]
            part.info = {SOURCE: source_index}
            parts.append(part)
        fixed_rows = {pending[k] for k in fixed}
        pending = [row for row in pending if row not in fixed_rows]
    outcome.repaired = concat_batches(parts) if parts else None
    return outcome


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"difference_feedback option {name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_method("difference_feedback")
class DifferenceFeedback(Method):
    """Repair failed samples with an answer hint, align, weight the key positions.

    alpha: weight of key positions, A_t = A (1 + alpha m_t) (number >= 0).
    mode: "weight" (advantage weighting) or "mask" (loss only on key positions of rows that have them).
    add_positive: train each repaired trajectory as a positive group member (bool).
    max_attempts: repair rounds per failure (int >= 1).
    max_repairs_per_group: failures repaired per group and step (int >= 0; 0 = all).
    span: "changed" (aligned changes) or "suffix" (everything from the first divergence).
    fallback: failure point without a successful sibling: "answer" (answer line) or "response" (start).
    eval_groups: held-out problems whose failures ``evaluate`` repairs (int >= 0; 0 skips it).
    """

    name = "difference_feedback"
    default_loss = "grpo"

    def __init__(
        self,
        alpha: float = 1.0,
        mode: str = "weight",
        add_positive: bool = True,
        max_attempts: int = 1,
        max_repairs_per_group: int = 2,
        span: str = "changed",
        fallback: str = "answer",
        eval_groups: int = 4,
        **unknown: Any,
    ) -> None:
        # Options arrive from the CLI as free-form KEY=VALUE pairs: a misspelt key must be a
        # clear ValueError, not a TypeError from the call.
        if unknown:
            raise ValueError(
                f"unknown difference_feedback option(s) {sorted(unknown)}; valid options: alpha, mode, "
                "add_positive, max_attempts, max_repairs_per_group, span, fallback, eval_groups"
            )
        _check("alpha", alpha, isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
               and alpha >= 0 and alpha == alpha and alpha != float("inf"), "a finite number >= 0")
        _check("mode", mode, mode in MODES, f"one of {MODES}")
        _check("add_positive", add_positive, isinstance(add_positive, bool), "true or false")
        _check("max_attempts", max_attempts, _is_int(max_attempts) and max_attempts >= 1, "an int >= 1")
        _check("max_repairs_per_group", max_repairs_per_group,
               _is_int(max_repairs_per_group) and max_repairs_per_group >= 0, "an int >= 0")
        _check("span", span, span in SPANS, f"one of {SPANS}")
        _check("fallback", fallback, fallback in FALLBACKS, f"one of {FALLBACKS}")
        _check("eval_groups", eval_groups, _is_int(eval_groups) and eval_groups >= 0, "an int >= 0")
        self.alpha = float(alpha)
        self.mode = mode
        self.add_positive = add_positive
        self.max_attempts = max_attempts
        self.max_repairs_per_group = max_repairs_per_group
        self.span = span
        self.fallback = fallback
        self.eval_groups = eval_groups

    def max_completion_length(self, max_new_tokens: int) -> int:
        # A forced prefix is a proper prefix of a failed sample, followed by a full budget.
        return 2 * max_new_tokens - 1

    def _repair(self, ctx: RolloutContext, base: GroupBatch) -> RepairOutcome:
        return repair_failures(
            ctx, base, max_attempts=self.max_attempts, fallback=self.fallback,
            mixed_groups_only=not self.add_positive, max_per_group=self.max_repairs_per_group,
        )

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """G samples per problem, their repairs, and the key positions of each repaired pair.

        Returns the P * G original rows (+ one per repaired failure with ``add_positive``)
        with info KEY_MASK (B, T), SOURCE (B,) and FAILURE_POINT (B,) (module constants).
        """
        base = super().build_groups(ctx, problems)
        outcome = self._repair(ctx, base)
        device = base.group_ids.device
        key_base = torch.zeros(base.size, base.completion_ids.shape[1], dtype=torch.float32, device=device)
        failure_at = torch.full((base.size,), -1, dtype=torch.long, device=device)
        repaired_rows: list[tuple[int, list[int]]] = []  # (failed row, repaired key mask)
        divergence: list[int] = []
        key_counts: list[int] = []
        if outcome.repaired is not None:
            for k, source in enumerate(outcome.repaired.info[SOURCE].tolist()):
                failed = valid_tokens(base, source)
                repaired = valid_tokens(outcome.repaired, k)
                m_failed, m_repaired = key_positions(failed, repaired, self.span)
                key_base[source, : len(m_failed)] = torch.tensor(m_failed, dtype=torch.float32)
                failure_at[source] = outcome.attempted[source][0]
                repaired_rows.append((source, m_repaired))
                divergence.append(common_prefix_length(failed, repaired))
                key_counts.append(sum(m_failed))
        base.info = {KEY_MASK: key_base, SOURCE: torch.full((base.size,), -1, dtype=torch.long, device=device),
                     FAILURE_POINT: failure_at}
        batch = base
        if self.add_positive and outcome.repaired is not None:
            extra = outcome.repaired
            key_extra = torch.zeros(extra.size, extra.completion_ids.shape[1], dtype=torch.float32, device=device)
            for k, (_, m_repaired) in enumerate(repaired_rows):
                key_extra[k, : len(m_repaired)] = torch.tensor(m_repaired, dtype=torch.float32)
            extra.info = {KEY_MASK: key_extra, SOURCE: extra.info[SOURCE],
                          FAILURE_POINT: torch.full((extra.size,), -1, dtype=torch.long, device=device)}
            extra.primary = torch.zeros(extra.size, dtype=torch.bool, device=device)
            batch = concat_batches([base, extra])
        batch.num_generated_tokens = base.num_generated_tokens + outcome.generated_tokens
        how = [h for _, h in outcome.attempted.values()]
        failed_lengths = [int(base.completion_mask[row].sum()) for row, _ in repaired_rows]
        batch.metrics = {
            "group_accuracy": float(base.correct.mean()),
            "failures": float(outcome.failures),
            "repairs_attempted": float(len(outcome.attempted)),
            "located_by_sibling": float(how.count("sibling")),
            "located_by_answer_line": float(how.count("answer")),
            "located_at_start": float(how.count("start")),
            "repaired": float(outcome.num_repaired),
            "repair_rate": outcome.repair_rate,
            "positives_added": float(batch.size - base.size),
            "first_divergence_mean": sum(divergence) / len(divergence) if divergence else 0.0,
            "key_positions_mean": sum(key_counts) / len(key_counts) if key_counts else 0.0,
            "key_fraction": sum(key_counts) / sum(failed_lengths) if failed_lengths else 0.0,
            "repair_tokens": float(outcome.generated_tokens),
        }
        return batch

    def _key_mask(self, batch: GroupBatch) -> torch.Tensor:
        if KEY_MASK not in batch.info:
            raise ValueError(
                f"difference_feedback needs batch.info[{KEY_MASK!r}]: build the batch with "
                "DifferenceFeedback.build_groups"
            )
        key = batch.info[KEY_MASK]
        if key.shape != batch.completion_ids.shape:
            raise ValueError(
                f"info[{KEY_MASK!r}] must be (B, T) = {tuple(batch.completion_ids.shape)}, got {tuple(key.shape)}"
            )
        return key.to(batch.completion_ids.device)

    def advantages(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """(b) A[B, T] = A_i (1 + alpha m_t) ("weight"), or A_i ("mask")."""
        plain = outcome_advantages_for(loss, batch.rewards, batch.group_ids, batch.completion_mask).advantages
        if self.mode == "mask":
            return plain
        return weighted_advantages(plain, self._key_mask(batch), self.alpha)

    def mask(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """(c) M[B, T]: sampled tokens (preset's zero-variance mode); in "mask" mode, rows
        with key positions keep only those."""
        base = super().mask(batch, loss)
        if self.mode == "weight":
            return base
        key = self._key_mask(batch).bool()
        has_key = key.any(dim=1, keepdim=True)
        return torch.where(has_key, base & key, base)

    @torch.no_grad()
    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """Held-out repair rate: sample groups for the first ``eval_groups`` problems and
        repair their failures as in training; counts reported beside the rate."""
        if not problems or self.eval_groups == 0:
            return {}
        base = super().build_groups(ctx, problems[: self.eval_groups])
        outcome = self._repair(ctx, base)
        return {
            "difference_feedback/repair_rate": outcome.repair_rate,
            "difference_feedback/failures": float(outcome.failures),
            "difference_feedback/repairs_attempted": float(len(outcome.attempted)),
            "difference_feedback/repaired": float(outcome.num_repaired),
        }
