"""CERL: the reward on hand-made completions, the method's groups on a real model, option
errors, and short end-to-end training runs (cerl on math, grpo on the multi-turn tool task)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.lm_rl.committed import committed_sft_examples
from training.lm_rl.core import get_preset
from training.lm_rl.methods import RolloutContext, get_method
from training.lm_rl.methods.cerl import cerl_reward
from training.lm_rl.models import build_tiny_model
from training.lm_rl.rollout import SamplingConfig
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tasks import get_task, make_split
from training.lm_rl.trainer import GRPOTrainer, TrainConfig, read_metrics

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[3]

PROBLEM = make_split("math_followup", "test", 1, 2, seed=0)[0]  # (45 + 23) * 2: step 1 = 68, answer 136
LONG = get_task("math_followup").long_trace(PROBLEM)
SHORT = get_task("math_followup").trace(PROBLEM)


def test_problem_is_the_expected_hand_made_case() -> None:
    assert PROBLEM.answer == "136" and PROBLEM.meta["followup_answer"] == "68"
    assert "s1=68" in LONG and "s1=68" not in SHORT


@pytest.mark.parametrize(
    ("completion", "erase", "keep", "variant", "reward"),
    [
        (LONG, "Answer: 68", "Answer: 68", "erasure_only", 1.0),  # erasure path still right
        (LONG, "Answer: 67", "Answer: 68", "erasure_only", 0.0),  # erasure path wrong
        (SHORT, "Answer: 12", "Answer: 68", "erasure_only", 0.0),  # right only with the thoughts
        (LONG, "Answer: 68", "Answer: 1", "erasure_only", 1.0),  # keep path does not matter ...
        (LONG, "Answer: 68", "Answer: 1", "erasure_x_keep", 0.0),  # ... unless the variant asks
        (LONG, "Answer: 68", "Answer: 68", "erasure_x_keep", 1.0),
        (LONG.replace("Answer: 136", "Answer: 135"), "Answer: 68", "Answer: 68", "erasure_only", 0.0),  # wrong answer
        ("Answer: 136", "Answer: 68", "Answer: 68", "erasure_only", 0.0),  # malformed: no thoughts/state
        (LONG.replace("</think>", ""), "Answer: 68", "Answer: 68", "erasure_only", 0.0),  # malformed
        (LONG, "", "", "erasure_only", 0.0),  # no follow-up answer
        (LONG, "Answer: sixty-eight", "Answer: 68", "erasure_only", 0.0),  # unparsable follow-up
    ],
)
def test_cerl_reward_on_hand_made_completions(completion: str, erase: str, keep: str, variant: str,
                                              reward: float) -> None:
    assert cerl_reward(PROBLEM, completion, erase, keep, variant) == reward


def test_cerl_reward_errors() -> None:
    with pytest.raises(ValueError, match="variant"):
        cerl_reward(PROBLEM, LONG, "Answer: 68", variant="erasure_sometimes")
    with pytest.raises(ValueError, match="follow-up"):
        cerl_reward(make_split("arithmetic", "test", 1, 1)[0], "Answer: 1", "Answer: 1")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"variant": "keep_only"}, "variant"), ({"followup_tokens": 0}, "followup_tokens"),
     ({"eval_problems": -1}, "eval_problems"), ({"folowup_tokens": 8}, "unknown cerl option")],
)
def test_method_options_are_validated(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_method("cerl", **options)


def _context(model, tokenizer) -> RolloutContext:
    def score(texts, problems):
        correct = torch.tensor([float(get_task(p.task).verify(p, t)) for t, p in zip(texts, problems)])
        return correct, correct.clone()

    return RolloutContext(
        model=model, tokenizer=tokenizer, sampling=SamplingConfig(max_new_tokens=96, temperature=0.0),
        generator=torch.Generator().manual_seed(0), group_size=2, score=score,
        encode_prompt=lambda text: encode_prompt(tokenizer, text),
    )


def test_groups_reward_the_sufficient_state_and_advantages_sit_on_the_completion(memorise) -> None:
    model, tokenizer = memorise(lambda tokenizer: committed_sft_examples(tokenizer, PROBLEM, long_state=True))
    method = get_method("cerl")
    batch = method.build_groups(_context(model, tokenizer), [PROBLEM])
    assert batch.texts == [LONG, LONG]
    assert batch.correct.tolist() == [1.0, 1.0] and batch.rewards.tolist() == [1.0, 1.0]
    assert batch.info["erase_correct"].tolist() == [True, True]
    assert batch.metrics["acc_erased"] == 1.0 and batch.metrics["wellformed"] == 1.0
    assert batch.metrics["probe_tokens"] > 0
    # Probes are counted as compute, and are not rows of the batch.
    assert batch.num_generated_tokens == int(batch.completion_mask.sum()) + batch.metrics["probe_tokens"]
    loss = get_preset("grpo")
    advantages, mask = method.advantages(batch, loss), method.mask(batch, loss)
    assert advantages.shape == mask.shape == batch.completion_ids.shape
    assert not mask[~batch.completion_mask].any()
    held_out = method.evaluate(_context(model, tokenizer), [PROBLEM])
    assert held_out["cerl/acc_erased"] == 1.0 and held_out["cerl/flip_rate"] == 0.0


def test_groups_refuse_tasks_without_followups() -> None:
    model, tokenizer = build_tiny_model(seed=0)
    with pytest.raises(ValueError, match="math_followup"):
        get_method("cerl").build_groups(_context(model, tokenizer), make_split("arithmetic", "train", 1, 1))


def test_cli_trains_cerl_for_two_steps(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "train", "lm", "--method", "cerl", "--task", "math_followup",
         "--model", "tiny", "--out", str(tmp_path), "--max-steps", "2", "--prompts-per-step", "2",
         "--group-size", "2", "--max-new-tokens", "16", "--eval-problems", "2", "--save-every", "2",
         "--option", "variant=erasure_x_keep", "--option", "eval_problems=2", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and "eval/cerl/acc_erased" in summary
    steps = [r for r in read_metrics(tmp_path) if "charts/reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["method/acc_erased"]) and math.isfinite(r["losses/policy"]) for r in steps)


def test_grpo_runs_on_the_multi_turn_tool_task(tmp_path: Path) -> None:
    config = TrainConfig(method="grpo", task="tool_use", model="tiny", out_dir=str(tmp_path), max_steps=2,
                         prompts_per_step=2, group_size=2, max_new_tokens=24, lr=1e-3, save_every=2,
                         eval_problems=2, seed=0, progress=False)
    trainer = GRPOTrainer(config)
    # The context samples through the tool environment.
    assert getattr(trainer.context(), "env", None) is get_task("tool_use").tool_env
    summary = trainer.train()
    assert summary["step"] == 2 and 0.0 <= summary["eval/accuracy"] <= 1.0
    assert all(math.isfinite(r["losses/policy"]) for r in read_metrics(tmp_path) if "losses/policy" in r)
