"""EqLen: equal-length paired training (arXiv 2604.17328), as a group constructor and a mask.

The paper treats response-length bias as a comparison-unit problem: GRPO compares whole
responses of different lengths, so length itself leaks into the advantage. It builds
equal-length, alignable segments during generation and trains only on them. Only the
abstract is public; the three mechanisms it names are implemented here as follows (our
reconstruction, see docs/papers/lm-rl.md, method 3):

- Dual-track synchronous generation: from a shared prefix, the ``G = ctx.group_size``
  tracks of a group (two or more) decode in lock-step for exactly ``segment_len`` tokens
  (one ``ctx.sample`` call with the shared prefix forced on every track), so their
  divergent segments have equal length. A track that emits eos (or a stop string) inside
  its segment has a shorter segment; it is kept, because ending is itself the decision
  being compared, and scored as the complete response it is.
- Segment scoring by rollout to completion: each unfinished track continues with
  ``shared prefix + its segment`` forced and the rest of the generation budget; the reward
  is the verifier on the full text. The total completion never exceeds the run's
  ``max_new_tokens`` (prefix + segment + continuation), so rows compare with plain GRPO's
  at the same budget.
- Segment masking: a row is prompt -> shared prefix (forced, not in the loss) + segment (the
  only tokens in the loss, ``info["segment_mask"]``) + continuation (sampled, but not the
  decision being compared, so not in the loss). The group-relative advantage of the rows'
  rewards sits on the segment tokens; under GRPO's per-sequence mean every track of a group
  is normalised by the same segment length, under GSPO the sequence ratio is the segment's.
- Prefix inheritance: for ``rounds`` rounds, the next round's shared prefix is the current
  one plus the segment of the best-scoring track (``choose_inherited_track``). Each round's
  tracks form their own group. A problem stops early when the inherited segment ended
  (eos/stop) or the budget is used up.

Every sampled token, of segments and of continuations, counts in ``num_generated_tokens``:
the benchmark matches compute by that number.

Shapes: P problems per step, G = ``ctx.group_size`` tracks per group, B rows (G per group,
at most P * rounds groups), T the longest completion (<= the run's ``max_new_tokens``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.lm_rl.core import LossConfig, outcome_advantages_for
from training.lm_rl.diagnostics import greedy_response_length
from training.lm_rl.methods import register_method
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext
from training.lm_rl.rollout import Rollout
from training.lm_rl.tasks import Problem


def segment_mask(prefix_lengths: torch.Tensor, segment_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """M[B, T]: True on the divergent segment of each row, positions [P_i, P_i + S_i).

    prefix_lengths, segment_lengths: (B,) long (P_i shared-prefix tokens, S_i segment
    tokens). Returns (B, width) bool.
    """
    if prefix_lengths.shape != segment_lengths.shape or prefix_lengths.dim() != 1:
        raise ValueError(
            f"prefix_lengths and segment_lengths must both be (B,), got "
            f"{tuple(prefix_lengths.shape)} and {tuple(segment_lengths.shape)}"
        )
    positions = torch.arange(width, device=prefix_lengths.device)[None, :]  # (1, T)
    start = prefix_lengths[:, None]
    return (positions >= start) & (positions < start + segment_lengths[:, None])


def choose_inherited_track(rewards: torch.Tensor, ended: torch.Tensor) -> int:
    """Index of the track whose segment the next round inherits.

    rewards: (G,) the tracks' rollout rewards; ended: (G,) bool, the segment itself ended
    (eos or stop). The highest reward wins; among equal rewards a track that can still be
    continued wins (inheriting an ended segment would stop the problem although an equally
    good track could go on); remaining ties go to the lowest index, so the choice is
    deterministic.
    """
    if rewards.dim() != 1 or ended.shape != rewards.shape or rewards.numel() == 0:
        raise ValueError(
            f"rewards and ended must both be non-empty (G,), got {tuple(rewards.shape)} and {tuple(ended.shape)}"
        )
    return min(range(rewards.numel()), key=lambda i: (-float(rewards[i]), bool(ended[i]), i))


@dataclass
class _Track:
    """One row of the batch: a track's full completion and where its segment sits."""

    problem: Problem
    prompt: torch.Tensor  # (L,) long
    tokens: list[int]  # shared prefix + segment (+ continuation)
    old_logp: list[float]  # untempered sampling-time log-probs of ``tokens``
    text: str
    finish_reason: str
    prefix_length: int
    segment_length: int
    segment_ended: bool  # eos or a stop string inside the segment
    group_id: int
    round_index: int


def _row(rollout: Rollout, row: int) -> tuple[list[int], list[float]]:
    """Tokens and untempered log-probs of one rollout row, padding removed."""
    length = int(rollout.completion_mask[row].sum())
    return rollout.completion_ids[row, :length].tolist(), rollout.logp_raw[row, :length].tolist()


@register_method("eqlen")
class EqLen(Method):
    """Equal-length segments from shared prefixes, scored by rollout, trained on the segment only.

    Options: ``segment_len`` (tokens per divergent segment, default 16) and ``rounds``
    (segments per problem by prefix inheritance, default 2).
    """

    name = "eqlen"
    default_loss = "grpo"

    def __init__(self, segment_len: int = 16, rounds: int = 2) -> None:
        for option, value in (("segment_len", segment_len), ("rounds", rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eqlen option {option} must be an int >= 1, got {value!r}")
        self.segment_len = segment_len
        self.rounds = rounds

    def max_completion_length(self, max_new_tokens: int) -> int:
        """Prefix + segment + continuation together never exceed the sampling budget: each
        round's segment and continuation budgets are what the inherited prefix left of it."""
        return max_new_tokens

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """(a) Up to ``rounds`` groups of ``ctx.group_size`` equal-length tracks per problem."""
        if ctx.group_size < 2:
            raise ValueError(f"eqlen compares tracks in lock-step and needs group_size >= 2, got {ctx.group_size}")
        budget = ctx.sampling.max_new_tokens
        tracks_per_group = ctx.group_size
        prompts = [ctx.encode_prompt(p.prompt) for p in problems]
        shared_prefix: list[list[int]] = [[] for _ in problems]
        active = list(range(len(problems)))
        tracks: list[_Track] = []
        rewards_per_round: list[torch.Tensor] = []
        correct_per_round: list[torch.Tensor] = []
        generated = 0
        for round_index in range(self.rounds):
            if not active:
                break
            # Every active problem inherited one full segment per earlier round (a shorter,
            # ended segment stops its problem), so they share one prefix length.
            prefix_length = len(shared_prefix[active[0]])
            segment_budget = min(self.segment_len, budget - prefix_length)
            continuation_budget = budget - prefix_length - segment_budget

            # Dual-track synchronous generation: G tracks per problem from its shared prefix.
            segments = ctx.sample(
                [prompts[p] for p in active], tracks_per_group,
                prefixes=[shared_prefix[p] for p in active for _ in range(tracks_per_group)],
                max_new_tokens=segment_budget,
            )
            generated += segments.num_generated_tokens
            # A segment that hit its length can be rolled out further; eos/stop ended it.
            ended = [reason != "length" for reason in segments.finish_reason]
            to_continue = [j for j in range(len(ended)) if not ended[j] and continuation_budget > 0]
            continued: dict[int, tuple[Rollout, int]] = {}
            if to_continue:
                continuations = ctx.sample(
                    [prompts[active[j // tracks_per_group]] for j in to_continue], 1,
                    prefixes=[_row(segments, j)[0] for j in to_continue],
                    max_new_tokens=continuation_budget,
                )
                generated += continuations.num_generated_tokens
                continued = {j: (continuations, k) for k, j in enumerate(to_continue)}

            round_tracks: list[_Track] = []
            for j in range(len(ended)):
                source, row = continued.get(j, (segments, j))
                tokens, old_logp = _row(source, row)
                problem_index = active[j // tracks_per_group]
                round_tracks.append(_Track(
                    problem=problems[problem_index],
                    prompt=segments.prompt_ids[j],
                    tokens=tokens,
                    old_logp=old_logp,
                    text=source.texts[row],
                    finish_reason=source.finish_reason[row],
                    prefix_length=prefix_length,
                    segment_length=int(segments.completion_mask[j].sum()) - prefix_length,
                    segment_ended=ended[j],
                    # Distinct ids per (round, problem): each round's tracks are one group.
                    group_id=round_index * len(problems) + problem_index,
                    round_index=round_index,
                ))
            rewards, correct = ctx.score([t.text for t in round_tracks], [t.problem for t in round_tracks])
            tracks.extend(round_tracks)
            rewards_per_round.append(rewards.float().cpu())
            correct_per_round.append(correct.float().cpu())

            # Prefix inheritance: the best track's segment extends its problem's shared prefix.
            still_active = []
            for position, problem_index in enumerate(active):
                group = slice(position * tracks_per_group, (position + 1) * tracks_per_group)
                best = position * tracks_per_group + choose_inherited_track(
                    rewards[group], torch.tensor(ended[group])
                )
                shared_prefix[problem_index] = _row(segments, best)[0]
                if not ended[best] and len(shared_prefix[problem_index]) < budget:
                    still_active.append(problem_index)
            active = still_active
        return self._assemble(
            ctx, tracks, torch.cat(rewards_per_round), torch.cat(correct_per_round), generated
        )

    def _assemble(
        self, ctx: RolloutContext, tracks: list[_Track], rewards: torch.Tensor, correct: torch.Tensor, generated: int
    ) -> GroupBatch:
        """Right-pad the tracks of all rounds into one batch with its segment mask.

        rewards, correct: (B,) in the order of ``tracks``.
        """
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        width = max(len(t.tokens) for t in tracks)
        completion_ids = torch.full((len(tracks), width), pad_id, dtype=torch.long)  # (B, T)
        old_logp = torch.zeros((len(tracks), width), dtype=torch.float32)  # (B, T)
        lengths = torch.tensor([len(t.tokens) for t in tracks])  # (B,)
        for i, track in enumerate(tracks):
            completion_ids[i, : len(track.tokens)] = torch.tensor(track.tokens, dtype=torch.long)
            old_logp[i, : len(track.old_logp)] = torch.tensor(track.old_logp, dtype=torch.float32)
        positions = torch.arange(width)[None, :]  # (1, T)
        prefix_lengths = torch.tensor([t.prefix_length for t in tracks])  # (B,)
        segment_lengths = torch.tensor([t.segment_length for t in tracks])  # (B,)
        group_ids = torch.tensor([t.group_id for t in tracks])
        num_groups = int(torch.unique(group_ids).numel())
        return GroupBatch(
            problems=[t.problem for t in tracks],
            prompt_ids=[t.prompt for t in tracks],
            completion_ids=completion_ids,
            completion_mask=positions < lengths[:, None],
            forced_mask=positions < prefix_lengths[:, None],
            old_logp=old_logp,
            texts=[t.text for t in tracks],
            group_ids=group_ids,
            rewards=rewards,
            correct=correct,
            num_generated_tokens=generated,
            finish_reason=[t.finish_reason for t in tracks],
            info={
                "segment_mask": segment_mask(prefix_lengths, segment_lengths, width),
                "prefix_length": prefix_lengths,
                "segment_length": segment_lengths,
                "round": torch.tensor([t.round_index for t in tracks]),
            },
            metrics={
                "segments": float(len(tracks)),
                "groups": float(num_groups),
                # Every group has G rows sharing one prefix, so the row mean is the group mean.
                "inherited_prefix_length": float(prefix_lengths.float().mean()),
                "early_end_fraction": sum(t.segment_ended for t in tracks) / len(tracks),
                "accuracy": float(correct.mean()),
                "completion_length": float(lengths.float().mean()),
            },
        )

    def advantages(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """(b) A[B, T]: the group-relative advantage of each track's rollout reward, on its segment."""
        segments = batch.info["segment_mask"]
        return outcome_advantages_for(loss, batch.rewards, batch.group_ids, segments).advantages

    def mask(self, batch: GroupBatch, loss: LossConfig) -> torch.Tensor:
        """(c) M[B, T]: the divergent segment only; zero-variance groups dropped if configured."""
        segments = batch.info["segment_mask"]
        return outcome_advantages_for(loss, batch.rewards, batch.group_ids, segments).mask

    @torch.no_grad()
    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """Mean greedy response length on the held-out problems (its drift is EqLen's metric)."""
        if not problems:
            return {}
        prompts = [ctx.encode_prompt(p.prompt) for p in problems]
        length = greedy_response_length(ctx.model, ctx.tokenizer, prompts, ctx.sampling.max_new_tokens)
        return {"eqlen/response_length": length}
