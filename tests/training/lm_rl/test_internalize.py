"""Internalization: first-wrong-step localisation on hand-made scratchpads, hand-computed
advantages and masks, the locate-and-repair constructor, a trainer run and option errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.lm_rl.core import get_preset
from training.lm_rl.methods import GroupBatch, get_method
# Importing the module registers "internalize" for get_method and TrainConfig.
from training.lm_rl.methods.internalize import (
    EXTRA,
    SOURCE,
    SUFFIX_START,
    Internalize,
    StepLocation,
    first_wrong_step,
    step_texts,
)
from training.lm_rl.tasks import make_split
from training.lm_rl.tokenizer import build_tokenizer
from training.lm_rl.trainer import GRPOTrainer, TrainConfig, read_metrics

torch.set_num_threads(1)


def parity_reward(completions: list[str], problems: list[object], **kwargs: object) -> list[float]:
    """Deterministic, text-dependent reward: gives the untrained model successes and failures."""
    return [float(len(text) % 2) for text in completions]


# Two correct scratchpads of (3 + 4) * 2 - 5 that order the operands differently.
SUCCESS_A = "3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\nAnswer: 9"
SUCCESS_B = "4 + 3 = 7\n2 * 7 = 14\n14 - 5 = 9\nAnswer: 9"


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        # Shares step 0 with A, goes wrong in step 1 (which starts after "3 + 4 = 7\n": token 10).
        ("3 + 4 = 7\n7 * 2 = 15\n15 - 5 = 10\nAnswer: 10", StepLocation(1, 10)),
        # Step 0 matches B and step 1 matches A, but no single success shares both: the
        # longest common step prefix is 1 (with B), so step 1 is the first wrong one.
        ("4 + 3 = 7\n7 * 2 = 14\n14 - 5 = 8\nAnswer: 8", StepLocation(1, 10)),
        # Wrong from the first step: regenerate from the empty prefix.
        ("3 + 4 = 8\nAnswer: 8", StepLocation(0, 0)),
        # Cut off mid-step: the unfinished step is the wrong one.
        ("3 + 4 = 7\n7 * 2 = 1", StepLocation(1, 10)),
        # Cut off at a step boundary: every step is a prefix of A, nothing to locate.
        ("3 + 4 = 7\n7 * 2 = 14", None),
        # The last step differs only in the answer: step 3 starts at token 32.
        ("3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\nAnswer: 8", StepLocation(3, 32)),
    ],
)
def test_first_wrong_step_on_hand_made_scratchpads(failed: str, expected: StepLocation | None) -> None:
    tokenizer = build_tokenizer()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    got = first_wrong_step(ids(failed), [ids(SUCCESS_A), ids(SUCCESS_B)], tokenizer)
    assert got == expected
    if got is not None:
        assert tokenizer.decode(ids(failed)[: got.position]) == "".join(
            line + "\n" for line in failed.split("\n")[: got.step]
        )
    assert first_wrong_step(ids(failed), [], tokenizer) is None


def test_step_texts_drop_line_ends_and_eos() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("a = 3\n\nAnswer: 3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert step_texts(ids, tokenizer) == ([0, 6, 7], ["a = 3", "", "Answer: 3"])


def hand_batch() -> GroupBatch:
    """Group 0: r0 correct, r1 wrong from token 2 on (located), r2 wrong (not located),
    r3 = the repair of r1 (2 forced tokens, then 3 sampled, correct).
    Group 1: r4, r5 both wrong (no success: plain outcome advantages)."""
    lengths = [4, 4, 4, 5, 4, 4]
    width = 5
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    forced = torch.zeros_like(mask)
    forced[3, :2] = True
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    return GroupBatch(
        problems=[None] * 6,  # type: ignore[list-item]
        prompt_ids=[torch.tensor([1])] * 6,
        completion_ids=torch.where(mask, 7, 0),
        completion_mask=mask,
        forced_mask=forced,
        old_logp=torch.zeros(6, width),
        texts=[""] * 6,
        group_ids=torch.tensor([0, 0, 0, 0, 1, 1]),
        rewards=rewards,
        correct=rewards.clone(),
        num_generated_tokens=23,
        finish_reason=["eos"] * 6,
        info={
            EXTRA: torch.tensor([False, False, False, True, False, False]),
            SUFFIX_START: torch.tensor([0, 2, 0, 2, 0, 0]),
            SOURCE: torch.tensor([-1, -1, -1, 1, -1, -1]),
        },
    )


def test_advantages_and_mask_by_hand() -> None:
    batch = hand_batch()
    method = Internalize()
    # Without std scaling, over the ORIGINAL samples of group 0 (rewards 1, 0, 0): mean 1/3,
    # A = [2/3, -1/3, -1/3]. The repair is not in the mean; A_c = r_c - mean = 2/3.
    #   r0: 2/3 everywhere          r1: 0 on the shared prefix (t < 2), -1/3 on the failed suffix
    #   r2: -1/3 everywhere         r3: 0 on its forced prefix, 2/3 on the corrected suffix
    #   r4, r5: group without success -> 0
    c, f = 2 / 3, -1 / 3
    expected = torch.tensor([
        [c, c, c, c, 0.0],
        [0.0, 0.0, f, f, 0.0],
        [f, f, f, f, 0.0],
        [0.0, 0.0, c, c, c],
        [0.0] * 5,
        [0.0] * 5,
    ])
    advantages = method.advantages(batch, get_preset("grpo", scale_rewards="none"))
    assert torch.allclose(advantages, expected, atol=1e-6)

    # With std scaling (std over the originals = sqrt(1/3)), the repair gets exactly the
    # advantage of the successful sibling; had it entered the group, the mean would be 1/2.
    grpo = get_preset("grpo")
    scaled = method.advantages(batch, grpo)
    assert torch.allclose(scaled, expected / (math.sqrt(1 / 3) + 1e-4), atol=1e-5)
    assert scaled[3, 2] == scaled[0, 0]

    # The shared prefix of r1 stays in the loss with A = 0; the forced prefix of r3 does not.
    mask = method.mask(batch, grpo)
    assert mask.tolist() == batch.completion_mask.tolist()[:3] + [
        [False, False, True, True, True]
    ] + batch.completion_mask.tolist()[4:]
    # DAPO's dynamic sampling drops group 1 (no spread among the originals), nothing else.
    dropped = method.mask(batch, get_preset("dapo"))
    assert not dropped[4:].any() and torch.equal(dropped[:4], mask[:4])

    plain = GroupBatch(**{**batch.__dict__, "info": {}})
    with pytest.raises(ValueError, match="Internalize.build_groups"):
        method.advantages(plain, grpo)


def test_locate_and_repair_builds_corrected_extra_members(newline_heavy_context) -> None:
    group_size = 4
    ctx = newline_heavy_context(group_size)
    problems = make_split("arithmetic", "train", 3, 1, seed=0)
    method = Internalize(max_attempts=2)
    batch = method.build_groups(ctx, problems)

    originals = len(problems) * group_size
    extra = batch.info[EXTRA]
    assert not extra[:originals].any() and extra[originals:].all()
    metrics = batch.metrics
    assert metrics["failures_repaired"] == batch.size - originals == metrics["corrected_samples"] > 0
    assert metrics["failures_located"] <= metrics["failures_seen"]
    assert metrics["repair_rate"] == pytest.approx(metrics["failures_repaired"] / metrics["failures_seen"])
    assert batch.completion_ids.shape[1] <= method.max_completion_length(12)
    assert batch.num_generated_tokens == (
        int((batch.completion_mask[:originals] & ~batch.forced_mask[:originals]).sum()) + metrics["repair_tokens"]
    )

    suffix_start = batch.info[SUFFIX_START]
    located = torch.nonzero(suffix_start[:originals] > 0)[:, 0].tolist()
    assert metrics["prefix_len_mean"] > 0, "newline-heavy samples must share some leading steps"
    mask = method.mask(batch, get_preset("grpo"))
    advantages = method.advantages(batch, get_preset("grpo"))
    for row in range(originals, batch.size):
        source = int(batch.info[SOURCE][row])
        prefix = int(batch.forced_mask[row].sum())
        assert batch.correct[row] == 1 and batch.correct[source] == 0
        assert batch.group_ids[row] == batch.group_ids[source]
        assert prefix == int(suffix_start[row]) == int(suffix_start[source])
        assert batch.completion_ids[row, :prefix].tolist() == batch.completion_ids[source, :prefix].tolist()
        assert not mask[row, :prefix].any() and (advantages[row, prefix:][mask[row, prefix:]] > 0).all()
        # The failure is trained on: 0 before its wrong step, negative from it on.
        assert (advantages[source, :prefix] == 0).all()
        assert (advantages[source][batch.completion_mask[source]][prefix:] < 0).all()
    for row in located:
        # The prefix before the first wrong step is a step prefix of a successful sibling.
        _, steps = step_texts(batch.completion_ids[row][batch.completion_mask[row]].tolist(), ctx.tokenizer)
        position = int(suffix_start[row])
        text = ctx.tokenizer.decode(batch.completion_ids[row, :position].tolist())
        siblings = [
            r for r in range(originals) if batch.group_ids[r] == batch.group_ids[row] and batch.correct[r] == 1
        ]
        assert any(batch.texts[r].startswith(text) for r in siblings)

    # Without reuse the repairs are measured but not trained on.
    kept_out = Internalize(reuse_corrected=False).build_groups(newline_heavy_context(group_size), problems)
    assert kept_out.size == originals and not kept_out.info[EXTRA].any()
    assert kept_out.metrics["failures_repaired"] == metrics["failures_repaired"]


def tiny_config(out_dir: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        method="internalize", task="arithmetic", model="tiny", max_steps=2, prompts_per_step=2, group_size=4,
        max_new_tokens=8, eval_problems=2, save_every=2, progress=False, out_dir=str(out_dir), lr=1e-3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def test_trainer_runs_internalize_end_to_end(tmp_path: Path) -> None:
    trainer = GRPOTrainer(tiny_config(tmp_path))
    trainer.correctness = parity_reward
    result = trainer.train()
    assert result["step"] == 2
    train_records = [r for r in read_metrics(tmp_path) if "charts/reward" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for record in train_records:
        for key in ("losses/policy", "losses/grad_norm", "method/repair_rate", "method/failures_seen"):
            assert math.isfinite(record[key]), key
        assert record["method/failures_seen"] > 0
    for key in ("eval/internalize/repair_rate", "eval/internalize/failures_seen"):
        assert math.isfinite(result[key]), key


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"reuse_corrected": "yes"}, "reuse_corrected"),
        ({"eval_groups": -1}, "eval_groups"),
        ({"attempts": 2}, "unknown internalize option"),
    ],
)
def test_bad_options_raise_value_error(tmp_path: Path, options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("internalize", **options)
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, method_options=options)
