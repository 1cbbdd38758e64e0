"""EqLen (training/lm_rl/methods/eqlen.py): hand-computed segment mask and inheritance choice,
the structure of the batches it builds with a real tiny policy, and end-to-end runs under the
grpo, gspo and rloo loss presets."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.lm_rl.core import get_preset
from training.lm_rl.diagnostics import greedy_response_length
from training.lm_rl.methods import RolloutContext, get_method
# Importing the module registers "eqlen" for get_method and TrainConfig.
from training.lm_rl.methods.eqlen import choose_inherited_track, segment_mask
from training.lm_rl.models import load_policy_model
from training.lm_rl.rollout import SamplingConfig
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tasks import Problem, make_split
from training.lm_rl.trainer import GRPOTrainer, TrainConfig, read_metrics

torch.set_num_threads(1)


def parity_score(texts: list[str], problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-dependent reward so an untrained policy's groups have spread."""
    reward = torch.tensor([float(len(text) % 2) for text in texts])
    return reward, torch.zeros_like(reward)


def tiny_context(max_new_tokens: int, group_size: int = 3, seed: int = 0) -> RolloutContext:
    model, tokenizer = load_policy_model("tiny", seed=seed)
    model.eval()
    return RolloutContext(
        model=model, tokenizer=tokenizer, sampling=SamplingConfig(max_new_tokens=max_new_tokens),
        generator=torch.Generator().manual_seed(seed), group_size=group_size, score=parity_score,
        encode_prompt=lambda text: encode_prompt(tokenizer, text),
    )


# --- pure pieces, by hand -------------------------------------------------------------------


def test_segment_mask_by_hand() -> None:
    # Row 0: round 1, no prefix, 3-token segment. Row 1: prefix 2, segment 3.
    # Row 2: prefix 2, a segment that hit eos after 1 token.
    got = segment_mask(torch.tensor([0, 2, 2]), torch.tensor([3, 3, 1]), width=6)
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="prefix_lengths"):
        segment_mask(torch.tensor([0, 1]), torch.tensor([1]), width=3)


@pytest.mark.parametrize(
    ("rewards", "ended", "expected"),
    [
        ([0.0, 1.0, 1.0, 0.5], [False, True, False, False], 2),  # tie at 1: the continuable one
        ([1.0, 1.0], [False, False], 0),  # full tie: lowest index
        ([0.0, 0.0, 0.0], [True, True, True], 0),  # all ended: lowest index
        ([0.2, 0.9], [False, True], 1),  # a higher reward wins even if its segment ended
        ([0.0, 0.0, 0.0], [True, False, False], 1),
    ],
)
def test_choose_inherited_track_by_hand(rewards: list[float], ended: list[bool], expected: int) -> None:
    assert choose_inherited_track(torch.tensor(rewards), torch.tensor(ended)) == expected


@pytest.mark.parametrize(
    ("options", "name"),
    [({"segment_len": 0}, "segment_len"), ({"segment_len": True}, "segment_len"),
     ({"rounds": "2"}, "rounds"), ({"rounds": 0}, "rounds")],
)
def test_bad_options_raise_value_error_naming_the_option(options: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=f"eqlen option {name}"):
        get_method("eqlen", **options)


# --- the batches it builds with a real tiny policy ------------------------------------------


def test_build_groups_equal_segments_inheritance_and_token_count() -> None:
    budget, segment_len, group_size = 10, 4, 3
    ctx = tiny_context(budget, group_size)
    method = get_method("eqlen", segment_len=segment_len, rounds=3)
    problems = make_split("arithmetic", "train", 2, 1)
    batch = method.build_groups(ctx, problems)

    prefix = batch.info["prefix_length"]
    segment = batch.info["segment_length"]
    rounds = batch.info["round"]
    lengths = batch.completion_mask.sum(dim=1)
    width = batch.completion_ids.shape[1]
    assert width <= budget and method.max_completion_length(budget) == budget
    # Every sampled token belongs to exactly one row: segment + continuation, never the prefix.
    assert batch.num_generated_tokens == int((batch.completion_mask & ~batch.forced_mask).sum())
    positions = torch.arange(width)[None, :]
    assert torch.equal(batch.forced_mask, positions < prefix[:, None])
    assert torch.equal(batch.info["segment_mask"], segment_mask(prefix, segment, width))
    assert bool((prefix + segment <= lengths).all())

    for group in torch.unique(batch.group_ids):
        rows = (batch.group_ids == group).nonzero()[:, 0]
        assert rows.numel() == group_size
        assert torch.unique(rounds[rows]).numel() == 1 and torch.unique(prefix[rows]).numel() == 1
        # Lock-step segments: full length unless the track ended (eos) inside it.
        for row in rows.tolist():
            expected = min(segment_len, budget - int(prefix[row]))
            ended = batch.finish_reason[row] == "eos" and int(lengths[row]) == int(prefix[row] + segment[row])
            assert int(segment[row]) == expected or (ended and int(segment[row]) < expected)
        # All tracks of a group share the forced prefix token for token.
        shared = batch.completion_ids[rows, : int(prefix[rows[0]])]
        assert bool((shared == shared[0]).all())

    # Prefix inheritance: each later-round group continues from the chosen track of the
    # previous round for the same problem.
    for group in torch.unique(batch.group_ids[rounds > 0]):
        rows = (batch.group_ids == group).nonzero()[:, 0]
        r, problem = int(rounds[rows[0]]), batch.problems[int(rows[0])]
        previous = [i for i in range(batch.size) if int(rounds[i]) == r - 1 and batch.problems[i] == problem]
        ended = torch.tensor([
            batch.finish_reason[i] == "eos" and int(lengths[i]) == int(prefix[i] + segment[i]) for i in previous
        ])
        best = previous[choose_inherited_track(batch.rewards[previous], ended)]
        end = int(prefix[best] + segment[best])
        assert int(prefix[rows[0]]) == end
        assert torch.equal(batch.completion_ids[rows[0], :end], batch.completion_ids[best, :end])

    # 2 problems x rounds at prefix 0, 4, 8 (the last with a 2-token segment) unless one stopped early.
    assert batch.metrics["groups"] == float(torch.unique(batch.group_ids).numel()) <= 6
    assert batch.metrics["segments"] == float(batch.size)

    loss = get_preset("grpo", max_completion_length=budget)
    mask = method.mask(batch, loss)
    advantages = method.advantages(batch, loss)
    assert torch.equal(mask, batch.info["segment_mask"])
    assert bool((advantages[~batch.info["segment_mask"]] == 0).all())


def test_budget_exhaustion_stops_rounds() -> None:
    ctx = tiny_context(max_new_tokens=8, group_size=2)
    batch = get_method("eqlen", segment_len=4, rounds=5).build_groups(ctx, make_split("arithmetic", "train", 1, 1))
    # Prefixes of 0 and 4 tokens; after that the inherited prefix fills the 8-token budget.
    assert set(batch.info["prefix_length"].tolist()) <= {0, 4}
    assert batch.completion_mask.sum(dim=1).max() <= 8


def test_segments_that_end_at_eos_are_kept_short_and_stop_the_problem() -> None:
    ctx = tiny_context(max_new_tokens=12, group_size=3)
    # Every id counts as eos: each track ends on its first token.
    ctx.model.generation_config.eos_token_id = list(range(ctx.model.config.vocab_size))
    batch = get_method("eqlen", segment_len=4, rounds=3).build_groups(ctx, make_split("arithmetic", "train", 2, 1))
    assert batch.size == 2 * 3  # one round only: the inherited segment ended
    assert batch.info["segment_length"].tolist() == [1] * 6
    assert batch.finish_reason == ["eos"] * 6
    assert batch.num_generated_tokens == 6
    assert batch.metrics["early_end_fraction"] == 1.0
    assert greedy_response_length(ctx.model, ctx.tokenizer, [ctx.encode_prompt("1 + 1")], 12) == 1.0


def test_build_groups_needs_two_tracks() -> None:
    ctx = tiny_context(max_new_tokens=8, group_size=1)
    with pytest.raises(ValueError, match="group_size"):
        get_method("eqlen").build_groups(ctx, make_split("arithmetic", "train", 1, 1))


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["grpo", "gspo", "rloo"])
def test_trainer_runs_eqlen_under_each_loss(tmp_path: Path, loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GRPOTrainer, "_rewards", lambda self, texts, problems: parity_score(texts, problems))
    config = TrainConfig(
        method="eqlen", loss=loss, task="arithmetic", model="tiny", max_steps=2, prompts_per_step=2,
        group_size=2, max_new_tokens=8, eval_problems=2, save_every=2, progress=False, out_dir=str(tmp_path),
        method_options={"segment_len": 3},
    )
    trainer = GRPOTrainer(config)
    assert trainer.loss_config.ratio_level == ("sequence" if loss == "gspo" else "token")
    result = trainer.train()
    train_records = [r for r in read_metrics(tmp_path) if "charts/reward" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for record in train_records:
        for key in ("losses/policy", "losses/grad_norm", "method/segments", "method/inherited_prefix_length",
                    "method/accuracy", "method/completion_length"):
            assert math.isfinite(record[key]), key
        assert record["charts/generated_tokens"] > 0
    assert 0 < result["eval/eqlen/response_length"] <= 8
