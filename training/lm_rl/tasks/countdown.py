"""The Countdown numbers game: combine given numbers with + - * / to hit a target exactly.

Each given number may be used at most once. Solvability is guaranteed by construction: the
generator repeatedly merges two numbers of the pool with a random operator (keeping every
intermediate a positive integer) until one value is left, and that value is the target; the
merge history is the reference solution. The verifier parses the answer with a small
recursive-descent parser over digits, + - * / and parentheses (no eval, no unary minus, no
exponent), evaluates with exact fractions, and checks the multiset of numbers used.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from training.lm_rl.tasks.base import ANSWER_PREFIX, Problem, TaskFamily, check_difficulty

_SMALL_RANGE = (1, 10)
_LARGE_NUMBERS = (15, 20, 25, 50, 75, 100)
_LARGE_PROBABILITY = 0.3
# Targets above this stop looking like Countdown and are hard to check by hand.
_MAX_TARGET = 999
_MAX_GENERATION_ATTEMPTS = 100

# Parser limits: bounded input keeps verification O(small) on adversarial completions; no
# given number has more than 3 digits, so a 7-digit literal can only be wrong anyway.
_MAX_ANSWER_CHARS = 256
_MAX_LITERAL_DIGITS = 6
_MAX_PAREN_DEPTH = 32
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")

_FORMAT_INSTRUCTION = (
    "Show your work, then finish with a final line 'Answer: <expression>' using only the "
    "given numbers, + - * / and parentheses."
)


class _ParseError(ValueError):
    """The answer is not a well-formed Countdown expression."""


@dataclass(frozen=True)
class CountdownAnswer:
    """A parsed expression: its exact value and the literals it uses (sorted)."""

    value: Fraction
    numbers_used: tuple[int, ...]


class _ExpressionParser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := NUMBER | '(' expr ')'."""

    def __init__(self, text: str) -> None:
        self._tokens = self._tokenize(text)
        self._pos = 0
        self._depth = 0
        self.numbers: list[int] = []

    @staticmethod
    def _tokenize(text: str) -> list[str]:
        tokens: list[str] = []
        pos = 0
        stripped_end = len(text.rstrip())
        while pos < stripped_end:
            match = _TOKEN.match(text, pos)
            if match is None:
                raise _ParseError(f"unexpected character at {pos}")
            tokens.append(match.group(1) or match.group(2))
            pos = match.end()
        return tokens

    def parse(self) -> Fraction:
        value = self._expr()
        if self._pos != len(self._tokens):
            raise _ParseError(f"trailing token {self._tokens[self._pos]!r}")
        return value

    def _peek(self) -> str | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self._tokens[self._pos]
            self._pos += 1
            rhs = self._term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            op = self._tokens[self._pos]
            self._pos += 1
            rhs = self._factor()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise _ParseError("division by zero")
            else:
                value = value / rhs
        return value

    def _factor(self) -> Fraction:
        token = self._peek()
        if token is None:
            raise _ParseError("unexpected end of expression")
        self._pos += 1
        if token == "(":
            self._depth += 1
            if self._depth > _MAX_PAREN_DEPTH:
                raise _ParseError("parentheses nested too deeply")
            value = self._expr()
            if self._peek() != ")":
                raise _ParseError("missing ')'")
            self._pos += 1
            self._depth -= 1
            return value
        if token.isdigit():
            if len(token) > _MAX_LITERAL_DIGITS:
                raise _ParseError("number literal too long")
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise _ParseError(f"unexpected token {token!r}")


def parse_countdown_expression(text: str) -> CountdownAnswer | None:
    """Parse and evaluate an expression exactly; None if malformed or dividing by zero."""
    if len(text) > _MAX_ANSWER_CHARS:
        return None
    try:
        parser = _ExpressionParser(text)
        value = parser.parse()
    except _ParseError:
        return None
    return CountdownAnswer(value=value, numbers_used=tuple(sorted(parser.numbers)))


_Item = tuple[int, str]  # (value, expression text that produces it)


def _merge_options(a: _Item, b: _Item) -> list[tuple[_Item, str, _Item, int]]:
    """All merges of a and b that keep a positive integer and are not a no-op (x / 1)."""
    hi, lo = (a, b) if a[0] >= b[0] else (b, a)
    options = [(a, "+", b, a[0] + b[0]), (a, "*", b, a[0] * b[0])]
    if hi[0] != lo[0]:
        options.append((hi, "-", lo, hi[0] - lo[0]))
    if lo[0] > 1 and hi[0] % lo[0] == 0:
        options.append((hi, "/", lo, hi[0] // lo[0]))
    return options


class CountdownTask(TaskFamily):
    """`difficulty + 2` numbers; the target is built from all of them, so it is reachable."""

    name = "countdown"

    def _draw_number(self, rng: random.Random) -> int:
        if rng.random() < _LARGE_PROBABILITY:
            return rng.choice(_LARGE_NUMBERS)
        return rng.randint(*_SMALL_RANGE)

    def _build(
        self, rng: random.Random, numbers: list[int]
    ) -> tuple[int, str, tuple[tuple[int, str, int, int], ...]]:
        """Merge the pool down to one value; returns (target, expression, steps)."""
        pool: list[_Item] = [(n, str(n)) for n in numbers]
        steps: list[tuple[int, str, int, int]] = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            left, op, right, result = rng.choice(_merge_options(pool[i], pool[j]))
            pool = [item for k, item in enumerate(pool) if k not in (i, j)]
            pool.append((result, f"({left[1]} {op} {right[1]})"))
            steps.append((left[0], op, right[0], result))
        target, expression = pool[0]
        return target, expression[1:-1], tuple(steps)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        check_difficulty(difficulty)
        count = difficulty + 2
        # Redraw until the target is non-trivial (not simply one of the given numbers) and in
        # range; the draw sequence depends only on rng, so this stays deterministic. Should no
        # draw qualify, the last one is kept: it is still solvable, just easy or large.
        for _ in range(_MAX_GENERATION_ATTEMPTS):
            numbers = [self._draw_number(rng) for _ in range(count)]
            target, expression, steps = self._build(rng, numbers)
            if target not in numbers and target <= _MAX_TARGET:
                break
        prompt = (
            f"Using the numbers {numbers}, each at most once, make {target}.\n"
            f"{_FORMAT_INSTRUCTION}"
        )
        return Problem(
            task=self.name,
            prompt=prompt,
            answer=expression,
            difficulty=difficulty,
            meta={"numbers": tuple(numbers), "target": target, "steps": steps},
        )

    def parse_answer(self, answer_text: str) -> CountdownAnswer | None:
        return parse_countdown_expression(answer_text)

    def is_correct(self, problem: Problem, parsed: CountdownAnswer) -> bool:
        if parsed.value != problem.meta["target"]:
            return False
        # Multiset inclusion: each given number at most as often as it was given.
        return Counter(parsed.numbers_used) <= Counter(problem.meta["numbers"])

    def trace(self, problem: Problem) -> str:
        lines = [f"{a} {op} {b} = {c}" for a, op, b, c in problem.meta["steps"]]
        lines.append(f"{ANSWER_PREFIX} {reference_solution(problem)}")
        return "\n".join(lines)


def reference_solution(problem: Problem) -> str:
    """One expression over the given numbers that evaluates to the target."""
    return problem.answer
