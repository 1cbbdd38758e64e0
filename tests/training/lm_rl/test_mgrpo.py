"""MGRPO: layer-2 prompt construction, flip statistics, two-layer group ids, a trainer run, options."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.lm_rl.methods import get_method

# Importing the module runs its @register_method("mgrpo").
from training.lm_rl.methods.mgrpo import (
    CORRECTION_PROMPT,
    MGRPO,
    correction_prompt_ids,
    flip_statistics,
    layer2_prompt,
)
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tokenizer import build_tokenizer
from training.lm_rl.trainer import GRPOTrainer, TrainConfig, read_metrics

torch.set_num_threads(1)


def tiny_config(out_dir: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        method="mgrpo", task="arithmetic", model="tiny", out_dir=str(out_dir), max_steps=2,
        prompts_per_step=2, group_size=2, max_new_tokens=8, lr=1e-3, save_every=2,
        eval_problems=2, seed=3, progress=False, method_options={"corrections": 2},
    )
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def parity_reward(completions: list[str], problems: list[object], **kwargs: object) -> list[float]:
    """Deterministic, text-dependent reward: gives the untrained model reward spread in both layers."""
    return [float(len(text) % 2) for text in completions]


def test_correction_prompt_round_trips_through_char_tokenizer() -> None:
    tokenizer = build_tokenizer()
    ids = correction_prompt_ids(tokenizer)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == CORRECTION_PROMPT
    # Ends asking for the tasks' answer line, on a fresh line.
    assert "'Answer: <answer>'" in CORRECTION_PROMPT and CORRECTION_PROMPT.endswith("\n")


def test_layer2_prompt_is_prompt_then_response_then_correction() -> None:
    tokenizer = build_tokenizer()
    prompt = torch.tensor(encode_prompt(tokenizer, "Compute 2 + 3."))
    response = tokenizer("2 + 3 = 5\nAnswer: 5", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    completion = torch.tensor(response + [eos, pad, pad])  # (T,)
    mask = torch.tensor([True] * (len(response) + 1) + [False, False])
    correction = [70, 71, 72]

    got = layer2_prompt(prompt, completion, mask, "eos", correction)
    assert got == prompt.tolist() + response + [70, 71, 72]
    assert eos not in got and pad not in got
    # Hand-checked on the text too: bos, prompt, separator, response, correction.
    assert tokenizer.decode(got[1:-3]) == "Compute 2 + 3.\n2 + 3 = 5\nAnswer: 5"

    # A truncated response has no eos: every valid token stays.
    truncated = torch.tensor(response[:4] + [pad])
    kept = layer2_prompt(prompt, truncated, torch.tensor([True] * 4 + [False]), "length", correction)
    assert kept == prompt.tolist() + response[:4] + correction


def test_flip_statistics_on_hand_made_verdicts() -> None:
    before = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    after = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    stats = flip_statistics(before, after)
    # 4 corrections of wrong responses, 2 of them right; 3 of right responses, 1 of them wrong.
    assert stats["count_from_incorrect"] == 4.0 and stats["count_incorrect_to_correct"] == 2.0
    assert stats["count_from_correct"] == 3.0 and stats["count_correct_to_incorrect"] == 1.0
    assert stats["flip_incorrect_to_correct"] == pytest.approx(0.5)
    assert stats["flip_correct_to_incorrect"] == pytest.approx(1 / 3)

    # Empty denominators give 0.0, not NaN.
    all_right = flip_statistics(torch.ones(3), torch.tensor([1.0, 0.0, 1.0]))
    assert all_right["flip_incorrect_to_correct"] == 0.0 and all_right["count_from_incorrect"] == 0.0
    assert all_right["flip_correct_to_incorrect"] == pytest.approx(1 / 3)
    assert flip_statistics(torch.zeros(0), torch.zeros(0))["flip_correct_to_incorrect"] == 0.0
    with pytest.raises(ValueError, match="before and after"):
        flip_statistics(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize(("layer2_responses", "per_problem"), [("all", 3), (2, 2)])
def test_two_layer_groups(tmp_path: Path, layer2_responses: object, per_problem: int) -> None:
    problems_per_step, group_size, corrections = 2, 3, 2
    trainer = GRPOTrainer(tiny_config(
        tmp_path, prompts_per_step=problems_per_step, group_size=group_size, eval_problems=0,
        method_options={"corrections": corrections, "layer2_responses": layer2_responses},
    ))
    trainer.correctness = parity_reward
    batch = trainer.method.build_groups(trainer.context(), trainer._batch_problems(0))

    layer = batch.info["layer"]
    num_layer1 = problems_per_step * group_size
    num_layer2 = problems_per_step * per_problem * corrections
    assert batch.size == num_layer1 + num_layer2
    assert layer.tolist() == [1] * num_layer1 + [2] * num_layer2
    ids1, ids2 = batch.group_ids[layer == 1], batch.group_ids[layer == 2]
    assert not set(ids1.tolist()) & set(ids2.tolist())
    assert torch.unique(ids1, return_counts=True)[1].tolist() == [group_size] * problems_per_step
    assert torch.unique(ids2, return_counts=True)[1].tolist() == [corrections] * (problems_per_step * per_problem)

    # Each correction continues its parent: first `per_problem` responses of each problem.
    parents = batch.info["parent"]
    assert parents[layer == 1].eq(-1).all()
    expected_parents = [p * group_size + g for p in range(problems_per_step) for g in range(per_problem)]
    assert parents[layer == 2].tolist() == [row for row in expected_parents for _ in range(corrections)]
    correction = correction_prompt_ids(trainer.tokenizer)
    for row in torch.nonzero(layer == 2)[:, 0].tolist():
        parent = int(parents[row])
        expected = layer2_prompt(
            batch.prompt_ids[parent], batch.completion_ids[parent], batch.completion_mask[parent],
            batch.finish_reason[parent], correction,
        )
        assert batch.prompt_ids[row].tolist() == expected
        assert batch.problems[row] is batch.problems[parent]

    metrics = batch.metrics
    assert metrics["layer1_accuracy"] == pytest.approx(float(batch.correct[layer == 1].mean()))
    assert metrics["layer2_accuracy"] == pytest.approx(float(batch.correct[layer == 2].mean()))
    assert metrics["count_from_incorrect"] + metrics["count_from_correct"] == num_layer2
    advantages = trainer.method.advantages(batch, trainer.loss_config)
    assert advantages.shape == batch.completion_ids.shape and torch.isfinite(advantages).all()


def test_trainer_runs_mgrpo_end_to_end(tmp_path: Path) -> None:
    trainer = GRPOTrainer(tiny_config(tmp_path))
    trainer.correctness = parity_reward
    result = trainer.train()
    assert result["step"] == 2
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "charts/reward" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    method_keys = {
        "method/layer1_accuracy", "method/layer2_accuracy", "method/flip_incorrect_to_correct",
        "method/flip_correct_to_incorrect", "method/count_from_incorrect", "method/count_from_correct",
    }
    for record in train_records:
        assert method_keys <= set(record)
        assert all(math.isfinite(value) for value in record.values())
    eval_keys = {
        "eval/mgrpo/pass1_accuracy", "eval/mgrpo/pass2_accuracy",
        "eval/mgrpo/flip_incorrect_to_correct", "eval/mgrpo/flip_correct_to_incorrect",
    }
    assert eval_keys <= set(result)
    assert all(0.0 <= result[key] <= 1.0 for key in eval_keys)


@pytest.mark.parametrize(
    ("options", "option"),
    [({"corrections": 1}, "corrections"), ({"corrections": 2.0}, "corrections"),
     ({"corrections": True}, "corrections"), ({"layer2_responses": 0}, "layer2_responses"),
     ({"layer2_responses": "some"}, "layer2_responses"), ({"layer2_responses": True}, "layer2_responses"),
     ({"hints": 1}, "hints")],
)
def test_bad_options_raise_naming_the_option(options: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        get_method("mgrpo", **options)


def test_registered_defaults() -> None:
    method = get_method("mgrpo")
    assert isinstance(method, MGRPO) and method.default_loss == "grpo"
    assert method.corrections == 2 and method.layer2_responses == "all"
    with pytest.raises(ValueError, match="corrections"):
        TrainConfig(method="mgrpo", method_options={"corrections": 0})
