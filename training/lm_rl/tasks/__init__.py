"""Procedural LM tasks with exact verifiers, and disjoint train/test splits.

The registry `TASKS` maps a family name to its `TaskFamily`; every LM RL method trains and
is evaluated on problems drawn through `make_split`, so held-out numbers are comparable
across methods.
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Literal

from training.lm_rl.tasks.arithmetic import ArithmeticTask, MathFollowupTask
from training.lm_rl.tasks.base import (
    ANSWER_PREFIX,
    Problem,
    TaskFamily,
    extract_final_answer,
)
from training.lm_rl.tasks.countdown import CountdownTask
from training.lm_rl.tasks.logic_chain import LogicChainTask, LogicFollowupTask
from training.lm_rl.tasks.science_qa import ScienceQATask
from training.lm_rl.tasks.tool_use import ToolUseTask

logger = logging.getLogger(__name__)

TASKS: dict[str, TaskFamily] = {
    task.name: task for task in (ArithmeticTask(), CountdownTask(), LogicChainTask())
}
# Committed-format families with follow-up questions (training.lm_rl.committed, docs/cerl.md).
TASKS.update(
    {task.name: task for task in (MathFollowupTask(), LogicFollowupTask(), ScienceQATask(), ToolUseTask())}
)

Split = Literal["train", "test"]

# Share of the prompt space reserved for test (see make_split); small so that the train
# stream loses little and drawing a test set costs ~1/fraction generations per problem.
TEST_FRACTION = 0.2
# Draws allowed per requested problem before giving up (expected need: 1/0.2 = 5 for test).
_MAX_DRAWS_PER_PROBLEM = 200


def get_task(name: str) -> TaskFamily:
    """The task family registered under `name`: a text family of `TASKS` or a visual one
    (rendered images, solved by a VLM) of `training.lm_rl.vlm.tasks.VISUAL_TASKS`."""
    family = TASKS.get(name)
    if family is None:
        # The visual families import this package, so they are looked up lazily.
        from training.lm_rl.vlm.tasks import VISUAL_TASKS

        family = VISUAL_TASKS.get(name)
        if family is None:
            raise ValueError(f"unknown task {name!r}; valid names: {sorted([*TASKS, *VISUAL_TASKS])}")
    return family


def prompt_split(task: str, prompt: str) -> Split:
    """The split a prompt belongs to: a fixed function of (task, prompt) text."""
    digest = hashlib.sha256(f"{task}\x00{prompt}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def make_split(
    task: str, split: Split, n: int, difficulty: int, seed: int = 0
) -> list[Problem]:
    """Draw `n` problems of `task` at `difficulty` for `split`; train and test never overlap.

    Scheme, two layers:
    1. Disjoint seed streams: the generator rng is seeded with the string
       "<task>/<split>/<difficulty>/<seed>", so train and test draw from independent streams
       and the same seed is reproducible across runs and machines (string seeds are hashed
       with SHA-512 by `random`, not with the per-process string hash).
    2. Collision filter: a stream can still produce a prompt the other stream produces
       (small problem spaces repeat). Each prompt is assigned to one split by a hash of its
       text (`prompt_split`, ~`TEST_FRACTION` go to test); each stream keeps only prompts of
       its own split. So no test prompt ever occurs in any train stream — of this seed or
       any other, of any length — and the guarantee needs no stored list of train prompts.

    Problems may repeat within a split (it is a sample of the task distribution).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    family = get_task(task)
    rng = random.Random(f"{task}/{split}/{difficulty}/{seed}")
    problems: list[Problem] = []
    max_draws = _MAX_DRAWS_PER_PROBLEM * max(n, 1)
    draws = 0
    while len(problems) < n:
        if draws >= max_draws:
            raise RuntimeError(
                f"drew {draws} {task} problems at difficulty {difficulty} but only "
                f"{len(problems)}/{n} fell in the {split} split"
            )
        draws += 1
        problem = family.generate(rng, difficulty)
        if prompt_split(task, problem.prompt) == split:
            problems.append(problem)
    logger.debug(
        "%s/%s difficulty %d: %d problems from %d draws", task, split, difficulty, n, draws
    )
    return problems


__all__ = [
    "ANSWER_PREFIX",
    "TASKS",
    "TEST_FRACTION",
    "Problem",
    "TaskFamily",
    "extract_final_answer",
    "get_task",
    "make_split",
    "prompt_split",
]
