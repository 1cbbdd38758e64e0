"""MGRPO, Multi-Layer GRPO (arXiv 2506.04746): GRPO on the query plus GRPO on self-correction.

What the paper says (abstract and introduction; no official code):
- Layer 1 is standard GRPO on the query: ``G`` responses per problem, group-relative
  outcome advantages.
- Layer 2 feeds the query, a layer-1 response and a guiding correction prompt back to the
  same policy, samples ``H`` corrections per response and trains them with GRPO on the reward
  "the corrected final answer is correct". Both layers update one policy, so the model
  learns to answer and to repair (or keep) its own answer.
- Evaluation is two-pass: accuracy at pass 1, at pass 2 (after the correction prompt), and
  the flip rates incorrect->correct and correct->incorrect.

What is ours (reconstruction):
- The correction prompt, ``CORRECTION_PROMPT``: the paper's exact text is not public. It
  uses only printable ASCII (every character the char tokenizer knows) and, like the task
  prompts, ends with a newline after an instruction to finish with an ``Answer: <answer>``
  line, so a correction has the format the task verifiers read.
- The layer-2 prompt is token-level: the layer-1 prompt ids, then the response's sampled
  completion ids (padding removed, a final eos dropped so the context does not claim the
  text ended), then the tokenized correction prompt. Re-tokenizing decoded text instead
  could split a subword tokenizer's tokens differently from what the policy sampled.
- A correction's reward is the verifier on the correction alone (``ctx.score``); the
  layer-1 answer sits in the prompt, so it can neither help nor hurt the score.
- Each response's ``H`` corrections form one layer-2 group, with group ids offset past the
  layer-1 ids, and both layers go into one ``GroupBatch``, so the standard per-group
  outcome advantages and masks of ``Method`` apply unchanged to both.
- ``layer2_responses`` bounds compute: "all" corrects every layer-1 response of the step,
  an int ``k`` only the first ``k`` responses of each problem (deterministic, and unbiased
  because samples within a group are exchangeable).

Flip rates, over pairs (response, correction of that response); ``before`` is the
response's correctness, ``after`` the correction's:
    flip_incorrect_to_correct = #(before wrong, after correct) / #(before wrong)
                              = P(after correct | before wrong)
    flip_correct_to_incorrect = #(before correct, after wrong) / #(before correct)
                              = P(after wrong | before correct)
Either rate is 0.0 when its denominator is 0; the counts are reported next to the rates so
a 0.0 from an empty denominator can be told apart from a measured 0.

Shapes: P problems per step, G = ``ctx.group_size``, R layer-2 responses (R = P * G for
"all"), H = ``corrections``; the step's batch holds B = P * G + R * H samples, layer-1 rows
first. T is the longest completion.
"""
from __future__ import annotations

from typing import Any

import torch

from training.lm_rl.methods import register_method
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext, concat_batches
from training.lm_rl.rollout import SamplingConfig, generate
from training.lm_rl.tasks import Problem

# Ours (the paper's prompt is not public). The leading newline ends the response's last line
# (a truncated response may stop mid-line); the trailing newline puts the correction on a
# fresh line, as the task prompts do before the first scratchpad line. Short, because every
# correction's context carries it (prefill and training cost).
CORRECTION_PROMPT = "\nCheck each step above and correct any error. Finish with a final line 'Answer: <answer>'.\n"

LAYER2_RESPONSES_ALL = "all"
# Held-out problems per greedy decoding batch in ``evaluate``: large batches amortise the
# per-token decoding overhead, the cap bounds memory for pretrained models with long contexts.
_EVAL_BATCH_SIZE = 64


def correction_prompt_ids(tokenizer: Any) -> list[int]:
    """Token ids of ``CORRECTION_PROMPT`` without special tokens (it continues a sequence)."""
    return list(tokenizer(CORRECTION_PROMPT, add_special_tokens=False)["input_ids"])


def layer2_prompt(
    prompt_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    finish_reason: str,
    correction_ids: list[int],
) -> list[int]:
    """Context of a layer-2 correction: layer-1 prompt + response tokens + correction prompt.

    prompt_ids: (L,) long, the layer-1 prompt (bos and separator included, unpadded).
    completion_ids: (T,) long, the response row, right-padded; completion_mask: (T,) bool.
    finish_reason: the response's ("eos" | "stop" | "length"); on "eos" its last valid
        token is the eos, which is dropped: mid-context it would tell the model the text ended.
    correction_ids: the tokenized correction prompt (``correction_prompt_ids``).
    Returns the token ids as a list of length L + |response| + |correction|.
    """
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 1:
        raise ValueError(
            f"completion_ids and completion_mask must both be (T,), got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    response = completion_ids[completion_mask.bool()].tolist()
    if finish_reason == "eos" and response:
        response = response[:-1]
    return prompt_ids.tolist() + response + list(correction_ids)


def flip_statistics(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Flip rates and their counts for paired correctness verdicts (see the module docstring).

    before: (N,) {0, 1}, the correctness of the corrected response (repeated once per
        correction); after: (N,) {0, 1}, the correctness of each correction.
    Returns flip_incorrect_to_correct, flip_correct_to_incorrect (0.0 for an empty
    denominator, never NaN) and the counts count_incorrect_to_correct,
    count_correct_to_incorrect, count_from_incorrect, count_from_correct.
    """
    if before.shape != after.shape or before.dim() != 1:
        raise ValueError(
            f"before and after must both be (N,), got {tuple(before.shape)} and {tuple(after.shape)}"
        )
    was_correct = before.bool()
    now_correct = after.bool()
    from_incorrect = int((~was_correct).sum())
    from_correct = int(was_correct.sum())
    incorrect_to_correct = int((~was_correct & now_correct).sum())
    correct_to_incorrect = int((was_correct & ~now_correct).sum())
    return {
        "flip_incorrect_to_correct": incorrect_to_correct / from_incorrect if from_incorrect else 0.0,
        "flip_correct_to_incorrect": correct_to_incorrect / from_correct if from_correct else 0.0,
        "count_incorrect_to_correct": float(incorrect_to_correct),
        "count_correct_to_incorrect": float(correct_to_incorrect),
        "count_from_incorrect": float(from_incorrect),
        "count_from_correct": float(from_correct),
    }


@register_method("mgrpo")
class MGRPO(Method):
    """Two-layer GRPO: answer groups on the query, correction groups on each answer.

    corrections: H, corrections sampled per layer-1 response (one layer-2 group; >= 2 so
        the group can have a reward spread).
    layer2_responses: "all" (every layer-1 response) or an int k >= 1 (the first k
        responses of each problem; capped at the group size).
    """

    name = "mgrpo"
    default_loss = "grpo"

    def __init__(
        self, corrections: int = 2, layer2_responses: int | str = LAYER2_RESPONSES_ALL, **unknown: Any
    ) -> None:
        # Options arrive from the CLI as free-form KEY=VALUE pairs: a misspelt key must be a
        # clear ValueError, not a TypeError from the call.
        if unknown:
            raise ValueError(
                f"unknown mgrpo option(s) {sorted(unknown)}; valid options: corrections, layer2_responses"
            )
        if isinstance(corrections, bool) or not isinstance(corrections, int) or corrections < 2:
            raise ValueError(
                f"mgrpo option corrections must be an int >= 2 (a layer-2 group needs a spread), "
                f"got {corrections!r}"
            )
        if layer2_responses != LAYER2_RESPONSES_ALL and (
            isinstance(layer2_responses, bool) or not isinstance(layer2_responses, int) or layer2_responses < 1
        ):
            raise ValueError(
                f"mgrpo option layer2_responses must be {LAYER2_RESPONSES_ALL!r} or an int >= 1, "
                f"got {layer2_responses!r}"
            )
        self.corrections = corrections
        self.layer2_responses = layer2_responses

    def _responses_to_correct(self, num_problems: int, group_size: int) -> list[int]:
        """Row indices (group-major layer-1 batch) of the responses that get layer-2 groups."""
        if self.layer2_responses == LAYER2_RESPONSES_ALL:
            per_problem = group_size
        else:
            per_problem = min(int(self.layer2_responses), group_size)
        return [p * group_size + g for p in range(num_problems) for g in range(per_problem)]

    def build_groups(self, ctx: RolloutContext, problems: list[Problem]) -> GroupBatch:
        """Layer 1: G samples per problem. Layer 2: H corrections per selected response.

        Returns a batch of B = P * G + R * H rows (layer 1 first) with info["layer"] (B,)
        long in {1, 2} and info["parent"] (B,) long: for a correction, the row of the
        response it corrects; -1 on layer-1 rows.
        """
        layer1 = super().build_groups(ctx, problems)
        device = layer1.group_ids.device
        parents = self._responses_to_correct(len(problems), ctx.group_size)  # R rows of layer 1

        correction_ids = correction_prompt_ids(ctx.tokenizer)
        prompts = [
            layer2_prompt(
                layer1.prompt_ids[row], layer1.completion_ids[row], layer1.completion_mask[row],
                layer1.finish_reason[row], correction_ids,
            )
            for row in parents
        ]
        rollout = ctx.sample(prompts, self.corrections)  # R * H rows, response-major
        corrected = [layer1.problems[row] for row in parents for _ in range(self.corrections)]
        rewards, correct = ctx.score(rollout.texts, corrected)
        layer2 = GroupBatch.from_rollout(rollout, corrected, rewards, correct)
        # Rollout group ids count responses from 0; shift them past every layer-1 id.
        layer2.group_ids = layer2.group_ids + int(layer1.group_ids.max()) + 1

        parent_rows = torch.tensor(parents, dtype=torch.long, device=device)  # (R,)
        layer1.info.update(
            layer=torch.ones(layer1.size, dtype=torch.long, device=device),
            parent=torch.full((layer1.size,), -1, dtype=torch.long, device=device),
        )
        layer2.info.update(
            layer=torch.full((layer2.size,), 2, dtype=torch.long, device=device),
            parent=parent_rows.repeat_interleave(self.corrections),
        )
        before = layer1.correct[parent_rows].repeat_interleave(self.corrections)  # (R * H,)
        layer2.primary = torch.zeros(layer2.size, dtype=torch.bool, device=device)  # not answers to the query
        batch = concat_batches([layer1, layer2])
        batch.metrics = {
            "layer1_accuracy": float(layer1.correct.mean()),
            "layer2_accuracy": float(layer2.correct.mean()),
            "layer2_samples": float(layer2.size),
            **flip_statistics(before, layer2.correct),
        }
        return batch

    @torch.no_grad()
    def evaluate(self, ctx: RolloutContext, problems: list[Problem]) -> dict[str, float]:
        """Two-pass greedy evaluation: answer, then answer the correction prompt after it.

        Returns "mgrpo/pass1_accuracy", "mgrpo/pass2_accuracy", the flip rates between the
        passes ("mgrpo/flip_incorrect_to_correct", "mgrpo/flip_correct_to_incorrect") and
        their counts; {} for no problems.
        """
        if not problems:
            return {}
        # Greedy decoding makes the held-out numbers a function of the weights alone.
        greedy = SamplingConfig(
            max_new_tokens=ctx.sampling.max_new_tokens, temperature=0.0,
            stop_strings=ctx.sampling.stop_strings, seed=ctx.sampling.seed,
        )
        correction_ids = correction_prompt_ids(ctx.tokenizer)
        pass1: list[torch.Tensor] = []
        pass2: list[torch.Tensor] = []
        for start in range(0, len(problems), _EVAL_BATCH_SIZE):
            chunk = problems[start : start + _EVAL_BATCH_SIZE]
            first = generate(
                ctx.model, ctx.tokenizer, [ctx.encode_prompt(p.prompt) for p in chunk], greedy,
                generator=ctx.generator,
            )
            prompts = [
                layer2_prompt(
                    first.prompt_ids[row], first.completion_ids[row], first.completion_mask[row],
                    first.finish_reason[row], correction_ids,
                )
                for row in range(len(chunk))
            ]
            second = generate(ctx.model, ctx.tokenizer, prompts, greedy, generator=ctx.generator)
            pass1.append(ctx.score(first.texts, chunk)[1])
            pass2.append(ctx.score(second.texts, chunk)[1])
        before, after = torch.cat(pass1), torch.cat(pass2)  # (N,) each
        stats = flip_statistics(before, after)
        return {
            "mgrpo/pass1_accuracy": float(before.mean()),
            "mgrpo/pass2_accuracy": float(after.mean()),
            **{f"mgrpo/{key}": value for key, value in stats.items()},
        }
