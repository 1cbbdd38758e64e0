"""Multi-turn tool use: look prices up, compute a total, then answer a follow-up.

Why: the committed state matters most when what a later turn needs was only ever seen in
hidden thoughts. Here the prices are nowhere in the prompt: they come from a lookup tool (a
fixed price table of 20 shops x 8 items) and the total from a calculator, through the call
format of ``training.lm_rl.tool_env``::

    Shop s7: total cost of 3 pen and 2 cup?
    <think>
    <call>lookup: s7 pen</call><result>7</result>
    <call>lookup: s7 cup</call><result>12</result>
    <call>calc: 3*7+2*12</call><result>45</result>
    </think>
    <state>pen=7; cup=12; total=45</state>      (long state; the short one: total=45)
    Answer: 45

Difficulty = number of items (lookups), plus one calculator call. The follow-up ("What is the
price of one cup?") has no tool access, so with the thoughts erased only a committed state
that carries the price answers it. The verifier checks the final integer exactly (and the
committed format); the rollout runs the tools through ``tool_env`` (``tool_env`` /
``max_turns`` attributes of this family), so ``train lm --task tool_use`` works with any method.
"""
from __future__ import annotations

import random

from training.lm_rl.committed import CALL_CLOSE, CALL_OPEN, FORMAT_INSTRUCTION, RESULT_CLOSE, RESULT_OPEN, CommittedTask
from training.lm_rl.tasks.base import IntegerAnswerTask, Problem, check_difficulty
from training.lm_rl.tool_env import Calculator, KeyValueLookup, ToolEnv

SHOPS = tuple(f"s{i}" for i in range(20))
ITEMS = ("pen", "cup", "hat", "box", "jar", "mug", "cap", "bag")
_PRICE_RANGE = (1, 20)
_QUANTITY_RANGE = (2, 5)


def _price_table() -> dict[str, int]:
    # A fixed table (its own seeded stream): the same prices in every process and run.
    rng = random.Random("tool_use/price-table")
    return {f"{shop} {item}": rng.randint(*_PRICE_RANGE) for shop in SHOPS for item in ITEMS}


PRICES = _price_table()
TOOLS_LINE = "Tools: lookup: <shop> <item>, calc: <expression>."


class ToolUseTask(CommittedTask, IntegerAnswerTask):
    """Total cost of `difficulty` items at one shop, with lookup + calculator calls."""

    name = "tool_use"

    def __init__(self) -> None:
        self.tool_env = ToolEnv({"calc": Calculator(), "lookup": KeyValueLookup(PRICES)})

    @property
    def max_turns(self) -> int:
        # Enough calls for the largest difficulty the item list allows, plus a retry.
        return len(ITEMS) + 2

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        check_difficulty(difficulty)
        if difficulty > len(ITEMS):
            raise ValueError(f"tool_use difficulty must be <= {len(ITEMS)} (items per shop), got {difficulty}")
        shop = rng.choice(SHOPS)
        items = rng.sample(ITEMS, difficulty)
        quantities = [rng.randint(*_QUANTITY_RANGE) for _ in items]
        prices = [PRICES[f"{shop} {item}"] for item in items]
        total = sum(q * p for q, p in zip(quantities, prices))
        expression = "+".join(f"{q}*{p}" for q, p in zip(quantities, prices))
        wanted = " and ".join(f"{q} {item}" for q, item in zip(quantities, items))
        thoughts = [f"{CALL_OPEN}lookup: {shop} {item}{CALL_CLOSE}{RESULT_OPEN}{price}{RESULT_CLOSE}"
                    for item, price in zip(items, prices)]
        thoughts.append(f"{CALL_OPEN}calc: {expression}{CALL_CLOSE}{RESULT_OPEN}{total}{RESULT_CLOSE}")
        asked = rng.randrange(difficulty)
        return Problem(
            task=self.name,
            prompt=f"Shop {shop}: total cost of {wanted}?\n{TOOLS_LINE}\n{FORMAT_INSTRUCTION}",
            answer=str(total),
            difficulty=difficulty,
            meta={
                "shop": shop,
                "items": tuple(items),
                "quantities": tuple(quantities),
                # The solution's steps, one per tool call (difficulty lookups + one calculation).
                "chain": tuple(thoughts),
                "thoughts": thoughts,
                "state_short": [("total", total)],
                "state_long": list(zip(items, prices)) + [("total", total)],
                "followup": f"What is the price of one {items[asked]}?",
                "followup_answer": str(prices[asked]),
            },
        )
