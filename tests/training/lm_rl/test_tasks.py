"""Task families: determinism, difficulty scaling, exact verification, adversarial answers,
and train/test disjointness."""
from __future__ import annotations

import random

import pytest

from training.lm_rl.tasks import TASKS, Problem, get_task, make_split, prompt_split
from training.lm_rl.tasks.arithmetic import scratchpad_trace as arithmetic_trace
from training.lm_rl.tasks.base import extract_final_answer, parse_int
from training.lm_rl.tasks.countdown import parse_countdown_expression, reference_solution
from training.lm_rl.tasks.logic_chain import scratchpad_trace as logic_trace

FAMILIES = sorted(TASKS)
LEVELS = (1, 2, 3)

ADVERSARIAL_ANSWERS = [
    "",
    "Answer:",
    "Answer: __import__('os').system('echo pwned')",
    "Answer: 9**9**9",
    "Answer: 9 ** 9 ** 9",
    "Answer: 10**10**10",
    "Answer: 1e309",
    "Answer: nan",
    "Answer: " + "(" * 5000 + "1" + ")" * 5000,
    "Answer: " + "9" * 100_000,
    "Answer: 1/0",
    "Answer: " + " " * 50_000 + "x" + " " * 50_000 + "y",
    "Answer: " + "(" * 40 + "2" + ")" * 40,
    "Answer: 1" + "\n" * 20_000 + "Answer: ",
    "Answer: lambda: 1",
    "Answer: [1, 2]",
    "Answer: \x00\x01",
    "no answer line at all",
    "Answer: 3 + ",
]


def _problem(family: str, difficulty: int, seed: int = 0):
    return get_task(family).generate(random.Random(seed), difficulty)


@pytest.mark.parametrize("family", FAMILIES)
def test_generator_is_deterministic_for_a_seed(family: str) -> None:
    for difficulty in LEVELS:
        assert _problem(family, difficulty, 7) == _problem(family, difficulty, 7)
    prompts = {_problem(family, 2, seed).prompt for seed in range(20)}
    assert len(prompts) > 10


def _size(family: str, problem) -> int:
    if family == "arithmetic":
        return len(problem.meta["steps"])
    if family == "countdown":
        return len(problem.meta["numbers"])
    return len(problem.meta["chain"])


@pytest.mark.parametrize("family", FAMILIES)
def test_difficulty_changes_problem_size(family: str) -> None:
    sizes = [_size(family, _problem(family, d)) for d in LEVELS]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(LEVELS)
    lengths = [
        sum(len(_problem(family, d, seed).prompt) for seed in range(30)) for d in LEVELS
    ]
    assert lengths == sorted(lengths)


@pytest.mark.parametrize("family", FAMILIES)
def test_invalid_difficulty_is_rejected(family: str) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="difficulty"):
            get_task(family).generate(random.Random(0), bad)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("difficulty", LEVELS)
def test_trace_verifies_for_200_problems(family: str, difficulty: int) -> None:
    task = get_task(family)
    rng = random.Random(difficulty)
    for _ in range(200):
        problem = task.generate(rng, difficulty)
        trace = task.trace(problem)
        assert trace.splitlines()[-1].startswith("Answer: ")
        assert task.verify(problem, trace), (problem.prompt, trace)
        assert task.has_valid_format(trace)


@pytest.mark.parametrize("family", FAMILIES)
def test_adversarial_and_garbage_completions_are_wrong(family: str) -> None:
    task = get_task(family)
    problem = _problem(family, 3)
    for completion in ADVERSARIAL_ANSWERS:
        assert task.verify(problem, completion) is False
        if completion.startswith("Answer:"):
            # A garbage final answer overrides a correct earlier one.
            assert task.verify(problem, task.trace(problem) + "\n" + completion) is False
    assert task.verify(problem, None) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["arithmetic", "logic_chain"])
def test_integer_answers_exact(family: str) -> None:
    task = get_task(family)
    problem = _problem(family, 2, seed=3)
    value = int(problem.answer)
    assert task.verify(problem, f"steps...\n  Answer:   {value}  \n\n")
    assert task.verify(problem, f"Answer: {value + 1}\nAnswer: {value}")
    assert not task.verify(problem, f"Answer: {value}\nAnswer: {value + 1}")
    assert not task.verify(problem, f"Answer: {value + 1}")
    assert not task.verify(problem, f"Answer: {value}.5")
    assert not task.verify(problem, f"The Answer: {value}")
    assert not task.verify(problem, f"Answer: {value} or {value + 1}")


def test_arithmetic_example_and_trace_format() -> None:
    problem = _problem("arithmetic", 3, seed=1)
    assert problem.prompt.startswith("Compute 8 * ((9 * 3) - 49).")
    assert arithmetic_trace(problem) == (
        "9 * 3 = 27\n27 - 49 = -22\n8 * (-22) = -176\nAnswer: -176"
    )


def test_logic_chain_trace_follows_chain_only() -> None:
    problem = _problem("logic_chain", 2, seed=5)
    trace = logic_trace(problem)
    assert len(trace.splitlines()) == len(problem.meta["chain"]) + 1
    assert f"What is {problem.meta['query']}?" in problem.prompt
    # The distractors are in the prompt but not in the trace.
    assert problem.prompt.count("=") > trace.count("\n")


def test_countdown_reference_and_alternatives() -> None:
    task = get_task("countdown")
    problem = task.generate(random.Random(0), 2)
    assert parse_countdown_expression(reference_solution(problem)).value == problem.meta["target"]
    assert problem.meta["target"] not in problem.meta["numbers"]
    custom = Problem(
        task="countdown", prompt="p", answer="(3 + 5) * 2", difficulty=1,
        meta={"numbers": (2, 3, 5), "target": 16, "steps": ()},
    )
    assert task.verify(custom, "Answer: (3 + 5) * 2")
    assert task.verify(custom, "Answer: 2*(5+3)")
    assert task.verify(custom, "Answer: 2 * 5 + 3 * 2") is False  # reuses 2
    assert task.verify(custom, "Answer: 16") is False  # 16 is not a given number
    assert task.verify(custom, "Answer: (3 + 5) * 2 / (5 - 5)") is False  # division by zero
    assert task.verify(custom, "Answer: -(3 + 5) * -2") is False  # no unary minus
    assert task.verify(custom, "Answer: (3 + 5) ** 2") is False
    assert task.verify(custom, "Answer: (3 + 5) * 2.0") is False
    assert task.verify(custom, "Answer: (3 + 5) * 2)") is False
    # Values are exact fractions: 3 / 2 - 1 is 1/2, never rounded to 1 or 0.
    half = Problem(
        task="countdown", prompt="p", answer="", difficulty=1,
        meta={"numbers": (1, 2, 3), "target": 1, "steps": ()},
    )
    assert task.verify(half, "Answer: 3 / 2 - 1") is False  # 0.5
    assert task.verify(half, "Answer: (1 + 2) / 3")


def test_answer_helpers() -> None:
    assert extract_final_answer("x\nAnswer: 4\r\n") == "4"
    assert extract_final_answer("Answer:   ") is None
    assert parse_int("-12") == -12
    assert parse_int("1" * 41) is None
    assert parse_int("0x10") is None


def test_get_task_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="arithmetic.*countdown.*logic_chain"):
        get_task("sudoku")


@pytest.mark.parametrize("family", FAMILIES)
def test_make_split_is_reproducible_and_sized(family: str) -> None:
    first = make_split(family, "test", 50, 2, seed=1)
    assert first == make_split(family, "test", 50, 2, seed=1)
    assert len(first) == 50 and all(p.difficulty == 2 for p in first)
    assert first != make_split(family, "test", 50, 2, seed=2)
    with pytest.raises(ValueError, match="split"):
        make_split(family, "val", 5, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_test_never_overlap(family: str) -> None:
    # Difficulty 1 has the smallest problem space, so streams collide most there.
    train = {p.prompt for p in make_split(family, "train", 3000, 1, seed=0)}
    test = make_split(family, "test", 600, 1, seed=0)
    assert not train & {p.prompt for p in test}
    assert all(prompt_split(family, p.prompt) == "test" for p in test)
    # Also disjoint from another seed's train stream.
    other_train = {p.prompt for p in make_split(family, "train", 1000, 1, seed=1)}
    assert not other_train & {p.prompt for p in test}
