"""Long-chain variable binding, e.g. "a = 3. b = a + 4. c = b. d = c - 2. What is d?".

The queried variable sits at the end of a chain of `2 * difficulty` dependent bindings
(copies, `+ k`, `- k`) rooted in a constant. Distractor bindings are interleaved: some are
constants, some read earlier variables (including chain variables), so a model cannot
discard them by surface form and must actually follow the chain. Every binding reads only
variables defined before it, so the text can be evaluated top to bottom. The scratchpad
trace evaluates only the chain, one binding per line.
"""
from __future__ import annotations

import random
import string

from training.lm_rl.committed import FORMAT_INSTRUCTION as COMMITTED_FORMAT_INSTRUCTION
from training.lm_rl.committed import CommittedTask
from training.lm_rl.tasks.base import (
    ANSWER_PREFIX,
    IntegerAnswerTask,
    Problem,
    check_difficulty,
)

_LINKS_PER_LEVEL = 2
_DISTRACTORS_PER_LEVEL = 2
_CONSTANT_RANGE = (0, 20)
_OFFSET_RANGE = (1, 9)
_LETTERS = tuple(string.ascii_lowercase)
# Two-letter names extend the pool past 26 so high difficulties still get distinct names.
_NAME_POOL = _LETTERS + tuple(a + b for a in _LETTERS for b in _LETTERS)

_FORMAT_INSTRUCTION = (
    "Work through the bindings you need, then finish with a final line 'Answer: <integer>'."
)

# (target, source, op, offset): source is None for a constant binding `target = offset`;
# op is "" for a plain copy `target = source`.
_Binding = tuple[str, str | None, str, int]


def _binding_text(binding: _Binding) -> str:
    target, source, op, offset = binding
    if source is None:
        return f"{target} = {offset}"
    if not op:
        return f"{target} = {source}"
    return f"{target} = {source} {op} {offset}"


def _evaluate(binding: _Binding, values: dict[str, int]) -> int:
    _, source, op, offset = binding
    if source is None:
        return offset
    if op == "+":
        return values[source] + offset
    if op == "-":
        return values[source] - offset
    return values[source]


class LogicChainTask(IntegerAnswerTask):
    """Follow a chain of `2 * difficulty` bindings past `2 * difficulty` distractors."""

    name = "logic_chain"

    def _random_binding(self, rng: random.Random, target: str, source: str) -> _Binding:
        op = rng.choice(("", "+", "-"))
        return (target, source, op, rng.randint(*_OFFSET_RANGE) if op else 0)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        check_difficulty(difficulty)
        links = _LINKS_PER_LEVEL * difficulty
        distractors = _DISTRACTORS_PER_LEVEL * difficulty
        if links + distractors + 1 > len(_NAME_POOL):
            raise ValueError(f"difficulty {difficulty} needs more variable names than available")
        # Single letters read most naturally; fall back to the larger pool only when needed.
        pool = _LETTERS if links + distractors + 1 <= len(_LETTERS) else _NAME_POOL
        names = rng.sample(pool, links + distractors + 1)
        chain_names, distractor_names = names[: links + 1], names[links + 1 :]

        # Slot layout: the chain root first, then chain links and distractors interleaved at
        # random positions, so the order of definitions never gives the chain away.
        slots = ["chain"] * links + ["distractor"] * distractors
        rng.shuffle(slots)
        chain: list[_Binding] = [(chain_names[0], None, "", rng.randint(*_CONSTANT_RANGE))]
        statements: list[_Binding] = [chain[0]]
        defined = [chain_names[0]]
        for slot in slots:
            if slot == "chain":
                binding = self._random_binding(rng, chain_names[len(chain)], chain[-1][0])
                chain.append(binding)
            else:
                target = distractor_names.pop()
                if rng.random() < 0.3:
                    binding = (target, None, "", rng.randint(*_CONSTANT_RANGE))
                else:
                    binding = self._random_binding(rng, target, rng.choice(defined))
            statements.append(binding)
            defined.append(binding[0])

        values: dict[str, int] = {}
        for binding in statements:
            values[binding[0]] = _evaluate(binding, values)
        query = chain[-1][0]
        text = ". ".join(_binding_text(b) for b in statements)
        return Problem(
            task=self.name,
            prompt=f"{text}. What is {query}?\n{_FORMAT_INSTRUCTION}",
            answer=str(values[query]),
            difficulty=difficulty,
            meta={"query": query, "chain": tuple(chain)},
        )

    def trace(self, problem: Problem) -> str:
        return scratchpad_trace(problem)


def scratchpad_trace(problem: Problem) -> str:
    """Correct solution: each chain binding with its value (`c = b - 2 = 5`), then the answer."""
    values: dict[str, int] = {}
    lines = []
    for binding in problem.meta["chain"]:
        value = _evaluate(binding, values)
        values[binding[0]] = value
        text = _binding_text(binding)
        lines.append(text if binding[1] is None else f"{text} = {value}")
    lines.append(f"{ANSWER_PREFIX} {problem.answer}")
    return "\n".join(lines)


class LogicFollowupTask(CommittedTask, IntegerAnswerTask):
    """Long-chain logic in the committed format (training.lm_rl.committed) with a follow-up.

    The problem is a `LogicChainTask` problem; the thoughts are its chain lines, the short state
    commits the queried variable, the long state every chain variable. The follow-up asks for
    an intermediate chain variable (not the root constant, when the chain has one in between).
    """

    name = "logic_followup"

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        base = LogicChainTask().generate(rng, difficulty)
        chain = base.meta["chain"]
        values: dict[str, int] = {}
        for binding in chain:
            values[binding[0]] = _evaluate(binding, values)
        names = [binding[0] for binding in chain]
        asked = rng.choice(names[1:-1] or names[:1])
        thoughts = scratchpad_trace(base).split("\n")[:-1]
        question = base.prompt.split("\n", 1)[0]
        return Problem(
            task=self.name,
            prompt=f"{question}\n{COMMITTED_FORMAT_INSTRUCTION}",
            answer=base.answer,
            difficulty=difficulty,
            meta={
                **base.meta,
                "thoughts": thoughts,
                "state_short": [(names[-1], base.answer)],
                "state_long": [(name, values[name]) for name in names],
                "followup": f"What is {asked}?",
                "followup_answer": str(values[asked]),
            },
        )
