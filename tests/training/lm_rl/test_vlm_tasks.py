"""Visual tasks: renderers read back from the pixels, exact verifiers on hand-checked images,
determinism, image references, train/test disjointness by image seed, and bad input."""
from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest

from training.lm_rl.tasks import get_task, make_split, prompt_split
from training.lm_rl.vlm.tasks import (
    COLOURS,
    IMAGE_SIZE,
    SEGMENTS,
    VISUAL_TASKS,
    BarCompareTask,
    ImageRef,
    TableReadTask,
    find_image_reference,
    image_reference,
    render_problem,
    render_reference,
    segment_boxes,
)

FAMILIES = sorted(VISUAL_TASKS)
BAR = (40, 80, 160)


def components(mask: np.ndarray) -> int:
    """4-connected components of a boolean image."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def colour_mask(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(image == np.array(colour, dtype=np.uint8), axis=-1)


def read_bars(image: np.ndarray, count: int) -> list[int]:
    """Bar heights in units, measured on the centre column of each bar."""
    heights = []
    for x0, x1 in BarCompareTask.bar_columns(count):
        column = colour_mask(image, BAR)[:, (x0 + x1) // 2]
        heights.append(int(column.sum()) // 6)
    return heights


def read_table(image: np.ndarray, rows: int, cols: int) -> list[list[int | None]]:
    """Digits decoded from which seven-segment boxes are inked (centre pixel of each)."""
    ink = np.all(image == 0, axis=-1)
    table = []
    for row in TableReadTask.cell_boxes(rows, cols):
        decoded = []
        for cell in row:
            x, y, width, height = TableReadTask.glyph_box(cell)
            lit = {name for name, (bx0, by0, bx1, by1) in segment_boxes(x, y, width, height).items()
                   if ink[(by0 + by1) // 2, (bx0 + bx1) // 2]}
            matches = [d for d, segments in SEGMENTS.items() if set(segments) == lit]
            decoded.append(matches[0] if len(matches) == 1 else None)
        table.append(decoded)
    return table


def test_shape_count_hand_made_scene() -> None:
    family = VISUAL_TASKS["shape_count"]
    scene = {"target": "red", "shapes": [
        {"shape": "circle", "colour": "red", "x": 8, "y": 8, "size": 11},
        {"shape": "square", "colour": "blue", "x": 24, "y": 24, "size": 11},
        {"shape": "triangle", "colour": "red", "x": 56, "y": 40, "size": 12},
        {"shape": "circle", "colour": "green", "x": 8, "y": 56, "size": 10},
    ]}
    problem = family.problem_from_scene(scene, 1, seed=7)
    assert problem.answer == "2"
    assert "How many red shapes are there?" in problem.prompt
    assert family.trace(problem) == "red: circle triangle\nAnswer: 2"
    image = family.render(problem)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert components(colour_mask(image, COLOURS["red"])) == 2
    assert components(colour_mask(image, COLOURS["blue"])) == 1
    assert colour_mask(image, COLOURS["yellow"]).sum() == 0
    # The square fills its 11x11 box exactly.
    assert colour_mask(image, COLOURS["blue"]).sum() == 121
    assert family.verify(problem, "red: circle triangle\nAnswer: 2")
    assert family.verify(problem, "Answer: 2")
    assert not family.verify(problem, "red: circle\nAnswer: 1")
    assert not family.verify(problem, "Answer: two")
    assert not family.verify(problem, "red: circle triangle\nAnswer: 2\nAnswer: 3")


def test_bar_compare_hand_made_scenes() -> None:
    family = VISUAL_TASKS["bar_compare"]
    taller = family.problem_from_scene({"heights": [3, 7, 5], "pair": [0, 2], "kind": "taller"}, 1, seed=1)
    assert "Which is taller, A or C?" in taller.prompt
    assert taller.answer == "C"
    assert family.trace(taller) == "A = 3\nC = 5\nAnswer: C"
    assert read_bars(family.render(taller), 3) == [3, 7, 5]
    assert family.verify(taller, "Answer: C") and not family.verify(taller, "Answer: A")
    assert not family.verify(taller, "Answer: c") and not family.verify(taller, "Answer: CC")
    diff = family.problem_from_scene({"heights": [3, 7, 5, 1], "pair": [1, 3], "kind": "difference"}, 2, seed=2)
    assert "How much taller is B than D?" in diff.prompt
    assert diff.answer == "6"
    assert family.trace(diff) == "B = 7\nD = 1\n7 - 1 = 6\nAnswer: 6"
    assert read_bars(family.render(diff), 4) == [3, 7, 5, 1]
    assert family.verify(diff, "Answer: 6") and not family.verify(diff, "Answer: B")


def test_table_read_hand_made_scene() -> None:
    family = VISUAL_TASKS["table_read"]
    digits = [[1, 2, 3], [4, 5, 6]]
    problem = family.problem_from_scene({"digits": digits, "row": 1, "col": 2}, 1, seed=3)
    assert "What digit is in row 2, column 3?" in problem.prompt
    assert problem.answer == "6"
    assert family.trace(problem) == "row 2: 4 5 6\ncolumn 3: 6\nAnswer: 6"
    assert read_table(family.render(problem), 2, 3) == digits
    assert family.verify(problem, "Answer: 6")
    for wrong in ("Answer: 5", "Answer: 16", "Answer: -6", "Answer: six"):
        assert not family.verify(problem, wrong)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_rendered_pixels_agree_with_the_answer(difficulty: int) -> None:
    """For random problems, reading the answer back from the pixels gives problem.answer."""
    rng = random.Random(difficulty)
    for _ in range(15):
        count = VISUAL_TASKS["shape_count"].generate(rng, difficulty)
        target = count.meta["scene"]["target"]
        assert components(colour_mask(render_problem(count), COLOURS[target])) == int(count.answer)

        bars = VISUAL_TASKS["bar_compare"].generate(rng, difficulty)
        scene = bars.meta["scene"]
        heights = read_bars(render_problem(bars), len(scene["heights"]))
        assert heights == scene["heights"]
        i, j = scene["pair"]
        expected = ("ABCDEFGH"[i] if heights[i] > heights[j] else "ABCDEFGH"[j]) if scene["kind"] == "taller" \
            else str(heights[i] - heights[j])
        assert bars.answer == expected

        table = VISUAL_TASKS["table_read"].generate(rng, difficulty)
        scene = table.meta["scene"]
        read = read_table(render_problem(table), len(scene["digits"]), len(scene["digits"][0]))
        assert read == scene["digits"]
        assert table.answer == str(read[scene["row"]][scene["col"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_traces_verify_and_generation_is_deterministic(family: str) -> None:
    task = get_task(family)  # the shared registry resolves visual tasks too
    for difficulty in (1, 2, 3):
        rng = random.Random(difficulty)
        for _ in range(50):
            problem = task.generate(rng, difficulty)
            assert task.verify(problem, task.trace(problem))
            assert task.problem(difficulty, problem.meta["image_seed"]) == problem
        assert task.generate(random.Random(5), difficulty) == task.generate(random.Random(5), difficulty)
    first = task.generate(random.Random(0), 1)
    assert np.array_equal(render_problem(first), render_problem(first))
    ref = find_image_reference(first.prompt)
    assert ref == ImageRef(family, 1, first.meta["image_seed"])
    assert np.array_equal(render_reference(ref), render_problem(first))
    # Rendering at another size keeps the layout (a 96x96 processor input).
    assert render_problem(first, 96).shape == (96, 96, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_test_are_disjoint_by_image_seed(family: str) -> None:
    train = make_split(family, "train", 400, 1, seed=0)
    test = make_split(family, "test", 100, 1, seed=0)
    train_seeds = {p.meta["image_seed"] for p in train}
    assert not train_seeds & {p.meta["image_seed"] for p in test}
    assert all(prompt_split(family, p.prompt) == "test" for p in test)
    other_train = {p.meta["image_seed"] for p in make_split(family, "train", 400, 1, seed=1)}
    assert not other_train & {p.meta["image_seed"] for p in test}


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_is_refused_or_wrong(family: str) -> None:
    task = VISUAL_TASKS[family]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="difficulty"):
            task.generate(random.Random(0), bad)
    for seed in (-1, 2**32, 1.0, None):
        with pytest.raises(ValueError, match="seed"):
            task.problem(1, seed)
    problem = task.generate(random.Random(0), 1)
    for completion in ("", "Answer:", "no answer", "Answer: " + "9" * 1000, "Answer: 1/0", None):
        assert task.verify(problem, completion) is False  # type: ignore[arg-type]
    other = VISUAL_TASKS[next(f for f in FAMILIES if f != family)].generate(random.Random(0), 1)
    with pytest.raises(ValueError, match="cannot render"):
        task.render(other)
    with pytest.raises(ValueError, match="unknown visual task"):
        render_reference(ImageRef("arithmetic", 1, 0))
    with pytest.raises(ValueError, match="not a visual task"):
        render_problem(get_task("arithmetic").generate(random.Random(0), 1))


def test_image_reference_round_trip() -> None:
    assert image_reference("bar_compare", 2, 255) == "[image bar_compare/2/000000ff]"
    assert find_image_reference("x\n[image bar_compare/2/000000ff]\ny") == ImageRef("bar_compare", 2, 255)
    assert find_image_reference("no image here") is None
    assert find_image_reference("[image bar_compare/2/zz]") is None
