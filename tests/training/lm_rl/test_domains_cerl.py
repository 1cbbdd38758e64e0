"""The committed-format domains: generators, traces, exact verifiers, follow-ups, checked
against independent solvers (the tool environment, the calculator, a fact reader)."""
from __future__ import annotations

import random
import re

import pytest

from training.lm_rl.committed import CommittedTask, parse_committed, render_completion
from training.lm_rl.tasks import TASKS, get_task, make_split
from training.lm_rl.tasks.arithmetic import ArithmeticTask
from training.lm_rl.tasks.tool_use import PRICES
from training.lm_rl.tool_env import Calculator

DOMAIN_TASKS = ("math_followup", "logic_followup", "science_qa", "tool_use")


@pytest.mark.parametrize("task", DOMAIN_TASKS)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_traces_verify_and_wrong_or_malformed_answers_do_not(task: str, difficulty: int) -> None:
    family = get_task(task)
    assert isinstance(family, CommittedTask)
    for problem in make_split(task, "train", 8, difficulty, seed=1):
        short, long = family.trace(problem), family.long_trace(problem)
        assert family.verify(problem, short) and family.verify(problem, long)
        assert parse_committed(short) is not None and parse_committed(long) is not None
        wrong = "999" if problem.answer != "999" else "998"
        assert not family.verify(problem, short.replace(f"Answer: {problem.answer}", f"Answer: {wrong}"))
        # The right answer outside the committed format is not accepted.
        assert not family.verify(problem, f"Answer: {problem.answer}")
        assert not family.verify(problem, short.replace("</think>", ""))
        assert not family.verify(problem, "")
        # Follow-up verifier: the expected answer only.
        expected = problem.meta["followup_answer"]
        assert family.verify_followup(problem, f"Answer: {expected}")
        assert family.verify_followup(problem, f"Answer:   {str(expected).upper()}  ")  # case and spaces
        assert not family.verify_followup(problem, "Answer: 12345")
        assert not family.verify_followup(problem, "no answer line")
        assert not family.verify_followup(problem, "Answer: two words")
        # Only the long state commits what the follow-up needs (unless the answer itself is asked).
        state_long = parse_committed(long).state
        assert expected in state_long.values()
        if expected != problem.answer:
            assert expected not in parse_committed(short).state.values()


@pytest.mark.parametrize("task", DOMAIN_TASKS)
def test_generation_is_seeded_and_splits_are_disjoint(task: str) -> None:
    first = make_split(task, "train", 30, 2, seed=0)
    assert [p.prompt for p in first] == [p.prompt for p in make_split(task, "train", 30, 2, seed=0)]
    test = make_split(task, "test", 30, 2, seed=0)
    assert not {p.prompt for p in first} & {p.prompt for p in test}
    with pytest.raises(ValueError, match="difficulty"):
        get_task(task).generate(random.Random(0), 0)


def test_tool_use_traces_agree_with_the_environment() -> None:
    family = get_task("tool_use")
    for problem in make_split("tool_use", "test", 20, 3, seed=2):
        trace = family.long_trace(problem)
        calls = re.findall(r"<call>(.*?)</call><result>(.*?)</result>", trace)
        assert len(calls) == problem.difficulty + 1
        for call, result in calls:
            assert family.tool_env.execute(call) == result  # the environment gives what the trace shows
        assert calls[-1][1] == problem.answer
        shop = problem.meta["shop"]
        # The prices are not in the prompt (its only numbers are the shop and the quantities): only the tool knows them.
        numbers = re.findall(r"\d+", problem.prompt.split("\n")[0])
        assert numbers == [shop[1:], *map(str, problem.meta["quantities"])]
        assert [PRICES[f"{shop} {item}"] for item in problem.meta["items"]] == [
            int(v) for k, v in parse_committed(trace).state.items() if k != "total"]
    with pytest.raises(ValueError, match="difficulty"):
        family.generate(random.Random(0), 9)


def test_math_followup_uses_the_arithmetic_generator_and_values_check_out() -> None:
    for problem in make_split("math_followup", "test", 20, 3, seed=0):
        expression = problem.prompt.split("\n")[0].removeprefix("Compute ").removesuffix(".")
        assert Calculator()(expression) == problem.answer
        step = int(re.search(r"step (\d+)", problem.meta["followup"]).group(1))
        assert problem.meta["followup_answer"] == str(problem.meta["steps"][step - 1][3])
    # The base family is unchanged: same rng, same problem as before the committed variant existed.
    base = ArithmeticTask().generate(random.Random("x"), 2)
    assert base.prompt.endswith("finish with a final line 'Answer: <integer>'.")
    assert ArithmeticTask().trace(base).splitlines()[-1] == f"Answer: {base.answer}"


def _solve_bindings(prompt: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for statement in prompt.split("\n")[0].split(". "):
        match = re.fullmatch(r"(\w+) = (\w+)(?: ([+-]) (\d+))?", statement)
        if match is None:
            continue
        target, source, op, offset = match.groups()
        value = int(source) if source.isdigit() else values[source]
        values[target] = value + int(offset) if op == "+" else value - int(offset) if op == "-" else value
    return values


def test_logic_followup_answers_follow_from_the_prompt() -> None:
    for problem in make_split("logic_followup", "test", 20, 2, seed=0):
        values = _solve_bindings(problem.prompt)
        assert str(values[problem.meta["query"]]) == problem.answer
        asked = problem.meta["followup"].removeprefix("What is ").removesuffix("?")
        assert str(values[asked]) == problem.meta["followup_answer"]


def _read_world(prompt: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    kind, home, temperature = {}, {}, {}
    for fact in prompt.split("\n")[0].split(". "):
        if m := re.fullmatch(r"(\w+) is a kind of (\w+)", fact):
            kind[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"(\w+) lives in (\w+)", fact):
            home[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"(\w+) is (\d+) degrees", fact):
            temperature[m.group(1)] = m.group(2)
    return kind, home, temperature


@pytest.mark.parametrize("difficulty", [1, 2])
def test_science_qa_is_answerable_from_the_stated_facts(difficulty: int) -> None:
    for problem in make_split("science_qa", "test", 30, difficulty, seed=0):
        kind, home, temperature = _read_world(problem.prompt)
        subject = problem.meta["subject"]
        place = home[kind[subject]]
        assert problem.answer == (place if difficulty == 1 else temperature[place])
        assert problem.meta["followup_answer"] in (kind[subject], place)
        # Multi-hop: the answer is never stated next to the subject itself.
        assert f"{subject} lives in" not in problem.prompt


def test_registry_lists_the_committed_domains_next_to_the_old_tasks() -> None:
    assert {"arithmetic", "countdown", "logic_chain", *DOMAIN_TASKS} <= set(TASKS)
    assert not isinstance(get_task("arithmetic"), CommittedTask)


def test_trace_variant_rejects_unknown_variants() -> None:
    problem = make_split("science_qa", "train", 1, 1)[0]
    with pytest.raises(ValueError, match="variant"):
        get_task("science_qa").trace_variant(problem, "medium")
    assert render_completion(["a"], [], 1) == "<think>\na\n</think>\n<state></state>\nAnswer: 1"
