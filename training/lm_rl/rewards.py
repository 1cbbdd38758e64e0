"""Reward functions for LM RL on the verifiable tasks, in the TRL reward-function convention.

A reward function is a plain callable `(completions: list[str], **kwargs) -> list[float]`,
one float per completion; extra dataset columns arrive as keyword arguments (here
`problems`, one `Problem` per completion). Completions may also be conversational (a list
of message dicts); the last message's content is scored. `safe_reward` wraps any reward so
that a failure in it costs the affected samples their reward instead of the training run.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from training.lm_rl.tasks import Problem, extract_final_answer, get_task

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]


def _completion_text(completion: Any) -> str:
    """Text of a completion: a string, or the content of the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    return ""


def _check_lengths(completions: Sequence[Any], problems: Sequence[Problem]) -> None:
    if len(completions) != len(problems):
        raise ValueError(
            f"got {len(completions)} completions but {len(problems)} problems; pass one "
            "problem per completion (repeat each prompt's problem for its group)"
        )


def correctness_reward(
    completions: Sequence[Any], problems: Sequence[Problem], **kwargs: Any
) -> list[float]:
    """1.0 where the task's exact verifier accepts the completion, else 0.0."""
    _check_lengths(completions, problems)
    return [
        1.0 if get_task(problem.task).verify(problem, _completion_text(completion)) else 0.0
        for completion, problem in zip(completions, problems)
    ]


def format_reward(
    completions: Sequence[Any], problems: Sequence[Problem] | None = None, **kwargs: Any
) -> list[float]:
    """1.0 where the completion ends in a parsable `Answer:` line, else 0.0.

    With `problems`, "parsable" is per task (an integer for arithmetic, an expression for
    countdown); without, any non-empty `Answer:` line counts.
    """
    if problems is None:
        return [
            0.0 if extract_final_answer(_completion_text(c)) is None else 1.0
            for c in completions
        ]
    _check_lengths(completions, problems)
    return [
        1.0 if get_task(problem.task).has_valid_format(_completion_text(completion)) else 0.0
        for completion, problem in zip(completions, problems)
    ]


def safe_reward(fn: RewardFn) -> RewardFn:
    """Wrap a reward function so its failures give 0.0 to the affected samples.

    - raises: every sample of the call gets 0.0;
    - returns something other than len(completions) values: every sample gets 0.0;
    - returns a non-numeric, NaN or infinite entry: that sample gets 0.0.
    Each failure logs a warning. `wrapped.failures` counts calls with any failure,
    `wrapped.failed_samples` the samples that were zeroed. The wrapper keeps `fn.__name__`,
    which TRL uses as the metric name.
    """

    @functools.wraps(fn)
    def wrapped(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        n = len(completions)
        try:
            rewards = fn(completions, **kwargs)
        # A user reward function can fail in any way; the run must survive all of them.
        except Exception:
            logger.warning(
                "reward %s raised; giving 0.0 to %d samples", fn.__name__, n, exc_info=True
            )
            _record_failure(wrapped, n)
            return [0.0] * n
        # Lists, tuples, numpy arrays and 1-D tensors all have len(); a string does too but
        # is never a batch of rewards.
        if isinstance(rewards, (str, bytes)) or not hasattr(rewards, "__len__"):
            logger.warning("reward %s returned a %s; giving 0.0 to all", fn.__name__,
                           type(rewards).__name__)
            _record_failure(wrapped, n)
            return [0.0] * n
        if len(rewards) != n:
            logger.warning("reward %s returned %d values for %d completions; giving 0.0 to all",
                           fn.__name__, len(rewards), n)
            _record_failure(wrapped, n)
            return [0.0] * n
        cleaned = [_finite_float(value) for value in rewards]
        bad = sum(value is None for value in cleaned)
        if bad:
            logger.warning("reward %s gave %d non-numeric or non-finite values; set to 0.0",
                           fn.__name__, bad)
            _record_failure(wrapped, bad)
        return [0.0 if value is None else value for value in cleaned]

    wrapped.failures = 0
    wrapped.failed_samples = 0
    return wrapped


def _finite_float(value: Any) -> float | None:
    """float(value) if it is a finite number (python, numpy or 0-d tensor), else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    # OverflowError: an int too large for a float (e.g. 10**400) is not a usable reward.
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _record_failure(wrapped: Any, samples: int) -> None:
    """Count one failing call and `samples` zeroed samples on the wrapper."""
    wrapped.failures += 1
    wrapped.failed_samples += samples
