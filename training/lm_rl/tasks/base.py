"""Common contract for procedurally generated LM tasks with exact verifiers.

Every task family produces `Problem`s from a seeded `random.Random`, can write a correct
completion for any of its problems (`trace`, used for SFT warm-start), and verifies a model
completion exactly. Completions end with a final line `Answer: <...>`; the verifier reads the
LAST such line, so a model may restate intermediate answers in its scratchpad. Verification
never raises on model output: anything unparsable is simply wrong, because a reward function
that crashes on one odd sample would stop an RL run.
"""
from __future__ import annotations

import abc
import random
import re
from dataclasses import dataclass, field
from typing import Any

ANSWER_PREFIX = "Answer:"

# Anchored per line so "Answer:" inside prose ("the Answer: is...") mid-line does not count.
# The capture is greedy and stripped afterwards: a lazy capture followed by optional
# whitespace backtracks quadratically on long runs of spaces.
_ANSWER_LINE = re.compile(rf"^[ \t]*{re.escape(ANSWER_PREFIX)}(.*)$", re.MULTILINE)
# Integers longer than this are not answers any of our generators produce; refusing them
# keeps int() conversion cheap on adversarial input.
_MAX_INT_DIGITS = 40
_INT = re.compile(r"[+-]?\d{1,%d}" % _MAX_INT_DIGITS)


@dataclass(frozen=True)
class Problem:
    """One task instance.

    `answer` is the canonical answer text (for countdown: one reference expression among
    possibly many correct ones). `meta` holds what the family needs to verify and to write a
    trace (numbers, target, solution steps); it is excluded from hashing since dicts are
    unhashable.
    """

    task: str
    prompt: str
    answer: str
    difficulty: int
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


def extract_final_answer(completion: str) -> str | None:
    """Text after `Answer:` on the last answer line, stripped; None if absent or empty."""
    if not isinstance(completion, str):
        return None
    matches = _ANSWER_LINE.findall(completion)
    answer = matches[-1].strip() if matches else ""
    return answer or None


def parse_int(text: str) -> int | None:
    """Strict integer parse (optional sign, digits only); None for anything else."""
    if _INT.fullmatch(text) is None:
        return None
    return int(text)


def check_difficulty(difficulty: int) -> None:
    """Reject difficulties the generators cannot honour, with the offending value."""
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 1:
        raise ValueError(f"difficulty must be an integer >= 1, got {difficulty!r}")


class TaskFamily(abc.ABC):
    """A family of problems: seeded generator, answer parser, exact checker, reference trace.

    Subclasses implement `generate`, `parse_answer`, `is_correct` and `trace`; `verify` ties
    extraction, parsing and checking together and is the one entry point rewards use.
    """

    name: str

    @abc.abstractmethod
    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw one problem; the same rng state and difficulty give the same problem."""

    @abc.abstractmethod
    def parse_answer(self, answer_text: str) -> Any | None:
        """Parse the text of a final `Answer:` line; None when it is not well formed."""

    @abc.abstractmethod
    def is_correct(self, problem: Problem, parsed: Any) -> bool:
        """Whether a parsed (non-None) answer solves `problem`."""

    @abc.abstractmethod
    def trace(self, problem: Problem) -> str:
        """A correct completion in the exact expected format, ending with `Answer: ...`."""

    def verify(self, problem: Problem, completion: str) -> bool:
        """Exact check of a model completion; False (never an exception) for malformed text."""
        answer_text = extract_final_answer(completion)
        if answer_text is None:
            return False
        parsed = self.parse_answer(answer_text)
        return parsed is not None and self.is_correct(problem, parsed)

    def has_valid_format(self, completion: str) -> bool:
        """Whether the completion ends in an `Answer:` line this family can parse."""
        answer_text = extract_final_answer(completion)
        return answer_text is not None and self.parse_answer(answer_text) is not None


class IntegerAnswerTask(TaskFamily):
    """A family whose answer is one integer, compared exactly with `problem.answer`."""

    def parse_answer(self, answer_text: str) -> int | None:
        return parse_int(answer_text)

    def is_correct(self, problem: Problem, parsed: int) -> bool:
        return parsed == int(problem.answer)
