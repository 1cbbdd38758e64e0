"""Reward functions (TRL convention) and the safe_reward wrapper."""
from __future__ import annotations

import logging
import math

import pytest

from training.lm_rl.rewards import correctness_reward, format_reward, safe_reward
from training.lm_rl.tasks import get_task, make_split


def _batch():
    problems = [
        *make_split("arithmetic", "train", 2, 2),
        *make_split("countdown", "train", 2, 2),
        *make_split("logic_chain", "train", 2, 2),
    ]
    completions = []
    for i, problem in enumerate(problems):
        trace = get_task(problem.task).trace(problem)
        completions.append(trace if i % 2 == 0 else "I think\nAnswer: 123456789")
    return problems, completions


def test_correctness_reward_scores_each_completion() -> None:
    problems, completions = _batch()
    assert correctness_reward(completions, problems=problems) == [1.0, 0.0] * 3


def test_correctness_reward_accepts_conversational_completions() -> None:
    problems, completions = _batch()
    messages = [[{"role": "assistant", "content": c}] for c in completions]
    assert correctness_reward(messages, problems=problems, prompts=["x"] * 6) == [1.0, 0.0] * 3


def test_reward_length_mismatch_is_an_error() -> None:
    problems, completions = _batch()
    with pytest.raises(ValueError, match="one problem per completion"):
        correctness_reward(completions[:3], problems=problems)


def test_format_reward() -> None:
    problems, _ = _batch()
    completions = [
        "Answer: 5", "no answer", "Answer: 3 +", "Answer: 2 * 3", "Answer: x", "Answer: -4"
    ]
    assert format_reward(completions) == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    # Per task: countdown needs an expression, the others an integer.
    assert format_reward(completions, problems=problems) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_safe_reward_passes_good_rewards_through() -> None:
    wrapped = safe_reward(correctness_reward)
    problems, completions = _batch()
    assert wrapped(completions, problems=problems) == [1.0, 0.0] * 3
    assert wrapped.__name__ == "correctness_reward"
    assert wrapped.failures == 0


def test_safe_reward_exception_zeroes_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def broken(completions, **kwargs):
        raise KeyError("missing column")

    wrapped = safe_reward(broken)
    with caplog.at_level(logging.WARNING, logger="training.lm_rl.rewards"):
        assert wrapped(["a", "b"]) == [0.0, 0.0]
    assert "broken raised" in caplog.text
    assert (wrapped.failures, wrapped.failed_samples) == (1, 2)
    assert wrapped(["c"]) == [0.0]
    assert wrapped.failures == 2


def test_safe_reward_non_finite_values_zero_only_those_samples() -> None:
    values = [1.0, math.nan, math.inf, "0.5", None, 10**400, 0.25]
    wrapped = safe_reward(lambda completions, **kw: values)
    assert wrapped(list("abcdefg")) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]
    assert (wrapped.failures, wrapped.failed_samples) == (1, 5)


def test_safe_reward_accepts_numpy_and_torch() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    as_numpy = safe_reward(lambda c, **kw: np.array([0.5, np.nan], dtype=np.float32))
    assert as_numpy(["a", "b"]) == [0.5, 0.0]
    assert safe_reward(lambda c, **kw: torch.tensor([1.0, -1.0]))(["a", "b"]) == [1.0, -1.0]


@pytest.mark.parametrize("result", [[1.0], [1.0, 1.0, 1.0], None, 1.0, "11"])
def test_safe_reward_wrong_length_or_type_zeroes_the_call(result) -> None:
    wrapped = safe_reward(lambda completions, **kw: result)
    assert wrapped(["a", "b"]) == [0.0, 0.0]
    assert (wrapped.failures, wrapped.failed_samples) == (1, 2)
