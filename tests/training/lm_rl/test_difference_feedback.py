"""Difference Feedback: alignment and key positions on hand-made token sequences, failure
points, hand-computed advantage weighting and masks, the repair constructor (the hint stays
out of the trained context, text and VLM), and option errors."""
from __future__ import annotations

import math

import pytest
import torch

from training.lm_rl.core import get_preset
from training.lm_rl.methods import GroupBatch, RolloutContext, get_method
from training.lm_rl.methods.difference_feedback import (
    FAILURE_POINT,
    KEY_MASK,
    SOURCE,
    DifferenceFeedback,
    failure_point,
    hinted_prompt,
    key_positions,
    weighted_advantages,
)
from training.lm_rl.methods.internalize import valid_tokens
from training.lm_rl.rollout import SamplingConfig, sequence_logprobs
from training.lm_rl.tasks import make_split
from training.lm_rl.tokenizer import build_tokenizer
from training.lm_rl.vlm.models import TINY_VLM, load_vlm
from training.lm_rl.vlm.sampling import VisionPrompts

torch.set_num_threads(1)


# --- alignment ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("failed", "repaired", "m_failed", "m_repaired"),
    [
        # Identical sequences: nothing had to change.
        ([5, 6, 7], [5, 6, 7], [0, 0, 0], [0, 0, 0]),
        # Substitution of one token.
        ([1, 2, 3, 4, 5], [1, 2, 9, 4, 5], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0]),
        # Insertion: the repair adds 3; the failed token emitted in its place (4) is key.
        ([1, 2, 4, 5], [1, 2, 3, 4, 5], [0, 0, 1, 0], [0, 0, 1, 0, 0]),
        # Deletion: the failed sample repeated 3; the repair's token at that point (4) is key.
        ([1, 2, 3, 3, 4], [1, 2, 3, 4], [0, 0, 0, 1, 0], [0, 0, 0, 1]),
        # Two changes with an equal block between them: the equal block is not key.
        ([1, 2, 3, 4, 5, 6], [1, 9, 3, 4, 8, 6], [0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 1, 0]),
        # The failure stopped early: its last token is where the continuation belongs.
        ([1, 2], [1, 2, 3], [0, 1], [0, 0, 1]),
        # An empty failure: only the repair has tokens to mark.
        ([], [4], [], [1]),
    ],
)
def test_key_positions_on_hand_made_sequences(failed, repaired, m_failed, m_repaired) -> None:
    assert key_positions(failed, repaired) == (m_failed, m_repaired)


def test_key_positions_align_from_the_first_divergence() -> None:
    # Without stripping the common prefix first, difflib would match the long tail 3 4 5 6 7
    # of the repair against the failure's second half and call the shared prefix deleted.
    failed = [3, 4, 3, 4, 5, 6, 7]
    repaired = [3, 4, 5, 6, 7]
    m_failed, m_repaired = key_positions(failed, repaired)
    assert m_failed[:2] == [0, 0] and sum(m_failed) > 0
    assert m_repaired[:2] == [0, 0]
    # span="suffix" marks everything from the first divergence on.
    assert key_positions([1, 2, 3, 4, 5, 6], [1, 9, 3, 4, 8, 6], span="suffix") == (
        [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="span"):
        key_positions([1], [2], span="all")


# --- failure points ------------------------------------------------------------------------
def test_failure_point_cases() -> None:
    tokenizer = build_tokenizer()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    failed = ids("red: circle\nAnswer: 1")
    success = ids("red: circle square\nAnswer: 2")
    other = ids("red: square\nAnswer: 1")
    # The longest prefix shared with any success: "red: circle" (11 tokens).
    assert failure_point(failed, [other, success], tokenizer) == (11, "sibling")
    # No success: the start of the final answer line ("red: circle\n" is 12 tokens).
    assert failure_point(failed, [], tokenizer) == (12, "answer")
    assert failure_point(failed, [], tokenizer, fallback="response") == (0, "start")
    # No answer line at all: the start of the response.
    assert failure_point(ids("red: circ"), [], tokenizer) == (0, "start")
    # A failure that is a prefix of a success (cut short): its last token is re-sampled.
    assert failure_point(ids("red: ci"), [success], tokenizer) == (6, "sibling")
    assert failure_point([], [], tokenizer) == (0, "start")
    with pytest.raises(ValueError, match="fallback"):
        failure_point(failed, [], tokenizer, fallback="middle")


# --- advantages and masks --------------------------------------------------------------------
def test_weighted_advantages_hand_computed() -> None:
    advantages = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    key = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[-1.0, -3.0, -3.0, 0.0], [1.5, 0.5, 0.5, 0.5]])
    assert torch.equal(weighted_advantages(advantages, key, alpha=2.0), expected)
    assert torch.equal(weighted_advantages(advantages, key, alpha=0.0), advantages)
    with pytest.raises(ValueError, match="same shape"):
        weighted_advantages(advantages, key[:, :3], 1.0)


def _hand_batch() -> GroupBatch:
    """One group: a success, a repaired failure, an unrepaired failure, and the repair."""
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    forced = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    key = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)
    return GroupBatch(
        problems=[None] * 4, prompt_ids=[torch.tensor([1, 2])] * 4,  # type: ignore[list-item]
        completion_ids=torch.ones(4, 4, dtype=torch.long), completion_mask=completion_mask, forced_mask=forced,
        old_logp=torch.zeros(4, 4), texts=["a", "b", "c", "d"], group_ids=torch.zeros(4, dtype=torch.long),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), correct=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        num_generated_tokens=0, finish_reason=["eos"] * 4,
        info={KEY_MASK: key, SOURCE: torch.tensor([-1, -1, -1, 1]), FAILURE_POINT: torch.tensor([-1, 2, -1, -1])},
        primary=torch.tensor([True, True, True, False]),
    )


def test_method_advantages_and_masks_hand_computed() -> None:
    batch = _hand_batch()
    loss = get_preset("grpo")
    # Group rewards [1, 0, 0, 1] (the repair is a member): mean 0.5, unbiased std sqrt(1/3).
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    weight = DifferenceFeedback(alpha=2.0)
    expected = torch.tensor([
        [a, a, a, 0.0],
        [-a, -a, -3 * a, -3 * a],
        [-a, -a, 0.0, 0.0],
        [a, a, 3 * a, a],
    ])
    assert torch.allclose(weight.advantages(batch, loss), expected, atol=1e-5)
    sampled = batch.completion_mask & ~batch.forced_mask
    assert torch.equal(weight.mask(batch, loss), sampled)
    masked = DifferenceFeedback(mode="mask")
    assert torch.allclose(masked.advantages(batch, loss), expected.abs().clamp(max=a) * expected.sign(), atol=1e-5)
    expected_mask = sampled.clone()
    expected_mask[1] = torch.tensor([False, False, True, True])
    expected_mask[3] = torch.tensor([False, False, True, False])
    assert torch.equal(masked.mask(batch, loss), expected_mask)
    batch.info.pop(KEY_MASK)
    with pytest.raises(ValueError, match="build_groups"):
        weight.advantages(batch, loss)


# --- the constructor -----------------------------------------------------------------------
class RecordingContext(RolloutContext):
    """A real text context that also keeps the prompts it was asked to sample under."""

    def __init__(self, base: RolloutContext) -> None:
        super().__init__(**{name: getattr(base, name) for name in base.__dataclass_fields__})
        self.prompts_seen: list[list[int]] = []

    def sample(self, prompts, num_samples_per_prompt, prefixes=None, max_new_tokens=None):
        self.prompts_seen.extend(list(p) for p in prompts)
        return super().sample(prompts, num_samples_per_prompt, prefixes, max_new_tokens)


def _check_repairs(ctx, batch: GroupBatch, method: DifferenceFeedback, pixel_values_for=None) -> int:
    """Invariants of a built batch; returns the number of repaired positives."""
    primary = batch.primary
    extra_rows = (~primary).nonzero().flatten().tolist()
    assert batch.info[KEY_MASK].shape == batch.completion_ids.shape
    for row in extra_rows:
        source = int(batch.info[SOURCE][row])
        assert primary[source] and batch.correct[row] == 1 and batch.correct[source] == 0
        assert batch.group_ids[row] == batch.group_ids[source]
        # Trained under the original prompt: no hint tokens in the context.
        assert torch.equal(batch.prompt_ids[row], batch.prompt_ids[source])
        assert "Hint" not in ctx.tokenizer.decode(batch.prompt_ids[row].tolist(), skip_special_tokens=True)
        # The forced prefix is the failure's tokens before its failure point.
        point = int(batch.info[FAILURE_POINT][source])
        assert int(batch.forced_mask[row].sum()) == point
        failed, repaired = valid_tokens(batch, source), valid_tokens(batch, row)
        assert repaired[:point] == failed[:point]
        m_failed, m_repaired = key_positions(failed, repaired)
        assert batch.info[KEY_MASK][source, : len(failed)].tolist() == m_failed
        assert batch.info[KEY_MASK][row, : len(repaired)].tolist() == m_repaired
    if extra_rows:
        index = torch.tensor(extra_rows)
        prompts = [batch.prompt_ids[r] for r in extra_rows]
        hinted = [torch.tensor(ctx.encode_prompt(hinted_prompt(batch.problems[r]))) for r in extra_rows]
        kwargs = {} if pixel_values_for is None else {"pixel_values": pixel_values_for(prompts)}
        with torch.no_grad():
            under_original = sequence_logprobs(ctx.model, prompts, batch.completion_ids[index],
                                               batch.completion_mask[index], **kwargs)
            under_hint = sequence_logprobs(ctx.model, hinted, batch.completion_ids[index],
                                           batch.completion_mask[index], **kwargs)
        # pi_old of a repaired positive is the policy on the ORIGINAL context.
        assert torch.allclose(batch.old_logp[index], under_original, atol=1e-4)
        assert not torch.allclose(batch.old_logp[index], under_hint, atol=1e-3)
    assert batch.metrics["positives_added"] == len(extra_rows)
    assert batch.num_generated_tokens > int((batch.completion_mask & ~batch.forced_mask)[primary].sum()) - 1
    return len(extra_rows)


def test_build_groups_on_text_policy_keeps_the_hint_out(newline_heavy_context) -> None:
    ctx = RecordingContext(newline_heavy_context(group_size=4, max_new_tokens=10))
    problems = make_split("arithmetic", "train", 3, 1, seed=0)
    method = DifferenceFeedback(max_repairs_per_group=0, max_attempts=2)
    batch = method.build_groups(ctx, problems)
    assert _check_repairs(ctx, batch, method) > 0
    decoded = [ctx.tokenizer.decode(p, skip_special_tokens=True) for p in ctx.prompts_seen]
    assert any("Hint: the answer is" in text for text in decoded)  # repairs sampled with the hint
    assert batch.metrics["repair_tokens"] > 0
    assert batch.num_generated_tokens >= batch.metrics["repair_tokens"]
    # Without positives, only failures of mixed groups are repaired and no rows are added.
    plain = DifferenceFeedback(add_positive=False).build_groups(ctx, problems)
    assert plain.size == 3 * 4 and bool(plain.primary.all())
    loss = get_preset("grpo")
    for m in (method, DifferenceFeedback(mode="mask")):
        advantages, mask = m.advantages(batch, loss), m.mask(batch, loss)
        assert advantages.shape == mask.shape == batch.completion_ids.shape
        assert torch.isfinite(advantages).all()


def test_build_groups_on_vlm_keeps_the_hint_out() -> None:
    parts = load_vlm(TINY_VLM, seed=0)
    parts.model.eval()
    vision = VisionPrompts.from_parts(parts)

    def parity(texts, problems):
        reward = torch.tensor([float(len(t) % 2) for t in texts])
        return reward, reward.clone()

    ctx = vision.context(
        model=parts.model, tokenizer=parts.tokenizer, sampling=SamplingConfig(max_new_tokens=8),
        generator=torch.Generator().manual_seed(0), group_size=4, score=parity,
    )
    problems = make_split("shape_count", "train", 2, 1, seed=0)
    batch = DifferenceFeedback(max_repairs_per_group=0, max_attempts=2).build_groups(ctx, problems)
    assert _check_repairs(ctx, batch, DifferenceFeedback(), pixel_values_for=vision.pixel_values) > 0
    # The hinted prompt names the same image as the original.
    assert vision.reference_of(vision.encode_prompt(hinted_prompt(problems[0]))) == vision.reference_of(
        batch.prompt_ids[0])


def test_options_are_validated() -> None:
    assert isinstance(get_method("difference_feedback", alpha=0.5, mode="mask"), DifferenceFeedback)
    bad = [
        ({"alpha": -1}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"alpha": True}, "alpha"),
        ({"mode": "both"}, "mode"), ({"add_positive": "yes"}, "add_positive"), ({"max_attempts": 0}, "max_attempts"),
        ({"max_repairs_per_group": -1}, "max_repairs_per_group"), ({"span": "all"}, "span"),
        ({"fallback": "x"}, "fallback"), ({"eval_groups": 1.5}, "eval_groups"), ({"alfa": 1}, "alfa"),
    ]
    for options, name in bad:
        with pytest.raises(ValueError, match=name):
            get_method("difference_feedback", **options)
