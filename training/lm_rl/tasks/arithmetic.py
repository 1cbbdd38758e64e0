"""Multi-step integer arithmetic with a scratchpad, e.g. "Compute ((17 + 5) * 3) - 8.".

The expression is built one operation at a time around the running value, so difficulty is
exactly the number of operations and the scratchpad is one line per operation
("17 + 5 = 22"). The model must end with `Answer: <int>`; the verifier compares integers
exactly. Only + - * are used so every intermediate value is an integer.
"""
from __future__ import annotations

import random

from training.lm_rl.committed import FORMAT_INSTRUCTION as COMMITTED_FORMAT_INSTRUCTION
from training.lm_rl.committed import CommittedTask
from training.lm_rl.tasks.base import (
    ANSWER_PREFIX,
    IntegerAnswerTask,
    Problem,
    check_difficulty,
)

_OPERATORS = ("+", "-", "*")
# Operand ranges: sums stay readable with two-digit operands; factors are single digits so
# values grow by at most ~10x per multiplication even at high difficulty.
_ADD_RANGE = (1, 50)
_MUL_RANGE = (2, 9)

_FORMAT_INSTRUCTION = (
    "Show your steps, one operation per line, then finish with a final line "
    "'Answer: <integer>'."
)


def _apply(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    return left * right


def _fmt(value: int) -> str:
    # Parenthesise negatives so a step never reads "5 - -3".
    return f"({value})" if value < 0 else str(value)


class ArithmeticTask(IntegerAnswerTask):
    """Integer expressions with `difficulty` operations; answer is the integer value."""

    name = "arithmetic"

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        check_difficulty(difficulty)
        value = rng.randint(*_ADD_RANGE)
        expression = str(value)
        steps: list[tuple[int, str, int, int]] = []
        for index in range(difficulty):
            op = rng.choice(_OPERATORS)
            operand = rng.randint(*(_MUL_RANGE if op == "*" else _ADD_RANGE))
            inner = expression if index == 0 else f"({expression})"
            if rng.random() < 0.5:
                left, right = value, operand
                expression = f"{inner} {op} {operand}"
            else:
                left, right = operand, value
                expression = f"{operand} {op} {inner}"
            value = _apply(left, op, right)
            steps.append((left, op, right, value))
        return Problem(
            task=self.name,
            prompt=f"Compute {expression}.\n{_FORMAT_INSTRUCTION}",
            answer=str(value),
            difficulty=difficulty,
            meta={"expression": expression, "steps": tuple(steps)},
        )

    def trace(self, problem: Problem) -> str:
        return scratchpad_trace(problem)


def scratchpad_trace(problem: Problem) -> str:
    """Correct step-by-step solution: one `a op b = c` line per operation, then the answer."""
    lines = [
        f"{_fmt(left)} {op} {_fmt(right)} = {result}"
        for left, op, right, result in problem.meta["steps"]
    ]
    lines.append(f"{ANSWER_PREFIX} {problem.answer}")
    return "\n".join(lines)


class MathFollowupTask(CommittedTask, IntegerAnswerTask):
    """Arithmetic in the committed format (training.lm_rl.committed) with a follow-up question.

    The problem is an `ArithmeticTask` problem (same expression generator); the thoughts are its
    scratchpad lines, the short state commits `ans`, the long state every intermediate value
    (`s1`, `s2`, ...) too. The follow-up asks for the value after step k < difficulty (for one
    operation: the answer itself), which the thoughts hold and only the long state commits.
    """

    name = "math_followup"

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        base = ArithmeticTask().generate(rng, difficulty)
        steps = base.meta["steps"]
        values = [result for _, _, _, result in steps]
        k = rng.randint(1, max(1, len(steps) - 1))
        thoughts = [f"{_fmt(left)} {op} {_fmt(right)} = {result}" for left, op, right, result in steps]
        return Problem(
            task=self.name,
            prompt=f"Compute {base.meta['expression']}.\n{COMMITTED_FORMAT_INSTRUCTION}",
            answer=base.answer,
            difficulty=difficulty,
            meta={
                **base.meta,
                # The solution's steps, one per operation (the same field the chain tasks carry).
                "chain": tuple(steps),
                "thoughts": thoughts,
                "state_short": [("ans", base.answer)],
                "state_long": [(f"s{i + 1}", v) for i, v in enumerate(values[:-1])] + [("ans", base.answer)],
                "followup": f"What was the value after step {k}?",
                "followup_answer": str(values[k - 1]),
            },
        )
