"""Synthetic visual-reasoning tasks: small RGB images with exact answers.

Three families, each a ``TaskFamily`` (training/lm_rl/tasks/base.py) so the verifiers,
rewards, SFT traces and ``make_split`` of the text tasks apply unchanged:

- ``shape_count``: circles, squares and triangles in a few colours; "How many red shapes?"
- ``bar_compare``: a bar chart of bars A, B, C, ...; "Which is taller?" or "How much taller?"
- ``table_read``: a grid of seven-segment digits; "What digit is in row r, column c?"

Why a scene is a pure function of one integer: a problem is ``(task, difficulty,
image_seed)``. The generator draws the seed from the split's rng and builds the whole scene
and question from ``random.Random(f"{task}/{difficulty}/{seed}")``, so ``Problem.meta``
carries only render parameters (the scene) and any process can re-render the same pixels.
The prompt names the image with a reference line ``[image <task>/<difficulty>/<seed hex>]``:
the prompt token ids are the one handle every method keeps on a sample (regeneration from
a prefix, MGRPO's re-prompts, the trainer's log-prob pass), so the VLM prompt encoder
(``training.lm_rl.vlm.io``) finds the pixels of any prompt from its text, the way a chat
template marks where an image goes. The seed is random, so the reference says nothing about
the answer.

Train/test disjointness: ``make_split`` assigns every prompt to one split by a hash of its
text; the reference makes the prompt a function of the seed, so a seed (an image) belongs to
exactly one split and no test image is ever trained on.

Drawing: PIL's ``ImageDraw`` with integer coordinates and no antialiasing, and digits as
seven-segment glyphs drawn as rectangles, so the pixels depend on no font file and are the
same on every machine.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from training.lm_rl.tasks.base import (
    ANSWER_PREFIX,
    Problem,
    TaskFamily,
    check_difficulty,
    parse_int,
)

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64  # pixels per side of every rendered image
BACKGROUND = (235, 235, 235)

# Colours are far apart in RGB, so a per-pixel nearest-colour test recovers them exactly.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
}
SHAPES = ("circle", "square", "triangle")

_REFERENCE = re.compile(r"\[image ([a-z_]+)/(\d+)/([0-9a-f]{8})\]")
_FORMAT_LINE = "End with 'Answer: <{kind}>'."


def image_reference(task: str, difficulty: int, seed: int) -> str:
    """The prompt line that names the image of (task, difficulty, seed)."""
    return f"[image {task}/{difficulty}/{seed:08x}]"


@dataclass(frozen=True)
class ImageRef:
    """Which image a prompt shows: enough to render it again."""

    task: str
    difficulty: int
    seed: int


def find_image_reference(text: str) -> ImageRef | None:
    """The first image reference in a prompt text, or None when it has none."""
    match = _REFERENCE.search(text)
    if match is None:
        return None
    return ImageRef(match.group(1), int(match.group(2)), int(match.group(3), 16))


def _scene_rng(task: str, difficulty: int, seed: int) -> random.Random:
    return random.Random(f"{task}/{difficulty}/{seed}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"image seed must be an int in [0, 2**32), got {seed!r}")


# --- drawing helpers ---------------------------------------------------------------------
# Seven-segment layout: a top, b top-right, c bottom-right, d bottom, e bottom-left,
# f top-left, g middle.
SEGMENTS: dict[int, str] = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def segment_boxes(x: int, y: int, width: int, height: int, stroke: int = 2) -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes (x0, y0, x1, y1), inclusive, of the seven segments of a glyph at (x, y)."""
    half = y + height // 2
    right = x + width - stroke
    bottom = y + height - stroke
    return {
        "a": (x, y, x + width - 1, y + stroke - 1),
        "b": (right, y, x + width - 1, half),
        "c": (right, half, x + width - 1, y + height - 1),
        "d": (x, bottom, x + width - 1, y + height - 1),
        "e": (x, half, x + stroke - 1, y + height - 1),
        "f": (x, y, x + stroke - 1, half),
        "g": (x, half - stroke // 2, x + width - 1, half - stroke // 2 + stroke - 1),
    }


def draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, width: int, height: int,
               colour: tuple[int, int, int] = (0, 0, 0)) -> None:
    """A seven-segment digit with its top-left corner at (x, y)."""
    boxes = segment_boxes(x, y, width, height)
    for segment in SEGMENTS[digit]:
        draw.rectangle(boxes[segment], fill=colour)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, size: int,
                colour: tuple[int, int, int]) -> None:
    half = size // 2
    box = (cx - half, cy - half, cx - half + size - 1, cy - half + size - 1)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), BACKGROUND)
    return image, ImageDraw.Draw(image)


# --- the families -------------------------------------------------------------------------
class VisualTask(TaskFamily):
    """A family whose problems come with an image rendered from ``problem.meta["scene"]``.

    Subclasses implement ``make_scene(rng, difficulty)`` (scene dict with the question's
    parameters), ``question(scene)``, ``answer(scene)``, ``trace_lines(scene)`` and
    ``draw(scene, size)``.
    """

    answer_kind = "integer"

    # TaskFamily ------------------------------------------------------------------------
    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        check_difficulty(difficulty)
        return self.problem(difficulty, rng.getrandbits(32))

    def trace(self, problem: Problem) -> str:
        return "\n".join([*self.trace_lines(problem.meta["scene"]), f"{ANSWER_PREFIX} {problem.answer}"])

    # visual ------------------------------------------------------------------------------
    def problem(self, difficulty: int, seed: int) -> Problem:
        """The problem whose image has this seed (the same on every call)."""
        check_difficulty(difficulty)
        _check_seed(seed)
        scene = self.make_scene(_scene_rng(self.name, difficulty, seed), difficulty)
        return self.problem_from_scene(scene, difficulty, seed)

    def problem_from_scene(self, scene: dict[str, Any], difficulty: int, seed: int) -> Problem:
        """A problem for a given scene (hand-made scenes in tests use this)."""
        prompt = "\n".join([
            image_reference(self.name, difficulty, seed),
            self.question(scene),
            _FORMAT_LINE.format(kind=self.answer_kind),
        ])
        return Problem(
            task=self.name, prompt=prompt, answer=self.answer(scene), difficulty=difficulty,
            meta={"image_seed": seed, "image_size": IMAGE_SIZE, "scene": scene},
        )

    def render(self, problem: Problem, size: int = IMAGE_SIZE) -> np.ndarray:
        """The problem's image as (size, size, 3) uint8."""
        if problem.task != self.name or "scene" not in problem.meta:
            raise ValueError(f"{self.name} cannot render a {problem.task!r} problem without meta['scene']")
        return self.draw(problem.meta["scene"], size)

    def draw(self, scene: dict[str, Any], size: int) -> np.ndarray:
        image, draw = _canvas(size)
        self.paint(draw, scene, size / IMAGE_SIZE)
        return np.asarray(image, dtype=np.uint8).copy()

    def make_scene(self, rng: random.Random, difficulty: int) -> dict[str, Any]:
        raise NotImplementedError

    def question(self, scene: dict[str, Any]) -> str:
        raise NotImplementedError

    def answer(self, scene: dict[str, Any]) -> str:
        raise NotImplementedError

    def trace_lines(self, scene: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def paint(self, draw: ImageDraw.ImageDraw, scene: dict[str, Any], scale: float) -> None:
        raise NotImplementedError


class ShapeCountTask(VisualTask):
    """Count the shapes of one colour. Shapes sit in distinct cells of a 4x4 grid (16 px),
    so they never overlap; the trace lists that colour's shapes in reading order.

    difficulty d: 2..(2 + 2d) shapes in min(2 + d, 4) colours.
    """

    name = "shape_count"
    _GRID = 4

    def make_scene(self, rng: random.Random, difficulty: int) -> dict[str, Any]:
        colours = list(COLOURS)[: min(2 + difficulty, len(COLOURS))]
        count = rng.randint(2, 2 + 2 * difficulty)
        cells = sorted(rng.sample(range(self._GRID * self._GRID), count))
        cell = IMAGE_SIZE // self._GRID
        shapes = []
        for index in cells:
            row, col = divmod(index, self._GRID)
            shapes.append({
                "shape": rng.choice(SHAPES), "colour": rng.choice(colours),
                "x": col * cell + cell // 2 + rng.randint(-1, 1),
                "y": row * cell + cell // 2 + rng.randint(-1, 1),
                "size": rng.randint(10, 12),
            })
        # Ask mostly about a colour that is present; sometimes about one that is not.
        present = sorted({s["colour"] for s in shapes}, key=colours.index)
        target = rng.choice(present) if rng.random() < 0.85 or len(present) == len(colours) else rng.choice(
            [c for c in colours if c not in present])
        return {"shapes": shapes, "target": target}

    def question(self, scene: dict[str, Any]) -> str:
        return f"How many {scene['target']} shapes are there?"

    def answer(self, scene: dict[str, Any]) -> str:
        return str(sum(s["colour"] == scene["target"] for s in scene["shapes"]))

    def trace_lines(self, scene: dict[str, Any]) -> list[str]:
        names = [s["shape"] for s in scene["shapes"] if s["colour"] == scene["target"]]
        return [f"{scene['target']}: {' '.join(names) if names else 'none'}"]

    def parse_answer(self, answer_text: str) -> int | None:
        return parse_int(answer_text)

    def is_correct(self, problem: Problem, parsed: int) -> bool:
        return parsed == int(problem.answer)

    def paint(self, draw: ImageDraw.ImageDraw, scene: dict[str, Any], scale: float) -> None:
        for s in scene["shapes"]:
            _draw_shape(draw, s["shape"], round(s["x"] * scale), round(s["y"] * scale),
                        max(3, round(s["size"] * scale)), COLOURS[s["colour"]])


_BAR_LETTERS = "ABCDEFGH"
_BAR_UNIT = 6  # pixels per height unit
_BAR_BASE = 58  # y of the chart's baseline (bars grow upwards from it)
_BAR_MAX = 8


class BarCompareTask(VisualTask):
    """A bar chart of 2 + d bars named A, B, ... left to right, heights 1..8 units on a
    grid of one line per unit. Either "which of two bars is taller" (answer: a letter) or
    "how much taller is X than Y" (answer: the height difference)."""

    name = "bar_compare"
    answer_kind = "letter or integer"

    def make_scene(self, rng: random.Random, difficulty: int) -> dict[str, Any]:
        count = min(2 + difficulty, len(_BAR_LETTERS))
        heights = [rng.randint(1, _BAR_MAX) for _ in range(count)]
        first, second = rng.sample(range(count), 2)
        while heights[first] == heights[second]:
            heights[second] = rng.randint(1, _BAR_MAX)
        kind = rng.choice(("taller", "difference"))
        if kind == "difference" and heights[first] < heights[second]:
            first, second = second, first
        return {"heights": heights, "pair": [first, second], "kind": kind}

    def question(self, scene: dict[str, Any]) -> str:
        a, b = (_BAR_LETTERS[i] for i in scene["pair"])
        letters = ", ".join(_BAR_LETTERS[: len(scene["heights"])])
        if scene["kind"] == "taller":
            return f"Bars {letters} from left to right. Which is taller, {a} or {b}?"
        return f"Bars {letters} from left to right. How much taller is {a} than {b}?"

    def answer(self, scene: dict[str, Any]) -> str:
        i, j = scene["pair"]
        h = scene["heights"]
        if scene["kind"] == "taller":
            return _BAR_LETTERS[i] if h[i] > h[j] else _BAR_LETTERS[j]
        return str(h[i] - h[j])

    def trace_lines(self, scene: dict[str, Any]) -> list[str]:
        i, j = scene["pair"]
        h = scene["heights"]
        lines = [f"{_BAR_LETTERS[i]} = {h[i]}", f"{_BAR_LETTERS[j]} = {h[j]}"]
        if scene["kind"] == "difference":
            lines.append(f"{h[i]} - {h[j]} = {h[i] - h[j]}")
        return lines

    def parse_answer(self, answer_text: str) -> str | None:
        text = answer_text.strip()
        if len(text) == 1 and text in _BAR_LETTERS:
            return text
        value = parse_int(text)
        return None if value is None else str(value)

    def is_correct(self, problem: Problem, parsed: str) -> bool:
        return parsed == problem.answer

    @staticmethod
    def bar_columns(count: int) -> list[tuple[int, int]]:
        """(x0, x1) inclusive pixel columns of each bar at IMAGE_SIZE."""
        slot = (IMAGE_SIZE - 8) // count
        width = max(4, slot - 4)
        return [(4 + k * slot + (slot - width) // 2, 4 + k * slot + (slot - width) // 2 + width - 1)
                for k in range(count)]

    def paint(self, draw: ImageDraw.ImageDraw, scene: dict[str, Any], scale: float) -> None:
        def px(value: float) -> int:
            return round(value * scale)

        for unit in range(1, _BAR_MAX + 1):
            y = px(_BAR_BASE - unit * _BAR_UNIT)
            draw.line([(px(2), y), (px(IMAGE_SIZE - 3), y)], fill=(200, 200, 200))
        for (x0, x1), height in zip(self.bar_columns(len(scene["heights"])), scene["heights"]):
            draw.rectangle((px(x0), px(_BAR_BASE - height * _BAR_UNIT), px(x1 + 1) - 1, px(_BAR_BASE) - 1),
                           fill=(40, 80, 160))
        draw.line([(px(2), px(_BAR_BASE)), (px(IMAGE_SIZE - 3), px(_BAR_BASE))], fill=(0, 0, 0))


_TABLE_SHAPES = {1: (2, 2), 2: (3, 3), 3: (4, 4)}


class TableReadTask(VisualTask):
    """A table of seven-segment digits with grid lines; "What digit is in row r, column c?".
    The trace reads the whole row first, then picks the column.

    difficulty 1: 2x2, 2: 3x3, 3 and up: 4x4 cells.
    """

    name = "table_read"
    answer_kind = "digit"

    def make_scene(self, rng: random.Random, difficulty: int) -> dict[str, Any]:
        rows, cols = _TABLE_SHAPES[min(difficulty, 3)]
        digits = [[rng.randint(0, 9) for _ in range(cols)] for _ in range(rows)]
        return {"digits": digits, "row": rng.randrange(rows), "col": rng.randrange(cols)}

    def question(self, scene: dict[str, Any]) -> str:
        return f"What digit is in row {scene['row'] + 1}, column {scene['col'] + 1}?"

    def answer(self, scene: dict[str, Any]) -> str:
        return str(scene["digits"][scene["row"]][scene["col"]])

    def trace_lines(self, scene: dict[str, Any]) -> list[str]:
        row = scene["digits"][scene["row"]]
        return [f"row {scene['row'] + 1}: {' '.join(map(str, row))}",
                f"column {scene['col'] + 1}: {row[scene['col']]}"]

    def parse_answer(self, answer_text: str) -> int | None:
        value = parse_int(answer_text)
        return value if value is not None and 0 <= value <= 9 else None

    def is_correct(self, problem: Problem, parsed: int) -> bool:
        return parsed == int(problem.answer)

    @staticmethod
    def cell_boxes(rows: int, cols: int) -> list[list[tuple[int, int, int, int]]]:
        """(x0, y0, x1, y1) pixel boxes of every cell at IMAGE_SIZE (grid lines on their edges)."""
        margin = 2
        width = (IMAGE_SIZE - 2 * margin) // cols
        height = (IMAGE_SIZE - 2 * margin) // rows
        return [[(margin + c * width, margin + r * height, margin + (c + 1) * width, margin + (r + 1) * height)
                 for c in range(cols)] for r in range(rows)]

    @staticmethod
    def glyph_box(cell: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the digit glyph centred in a cell."""
        x0, y0, x1, y1 = cell
        height = min(18, y1 - y0 - 5)
        width = max(5, min(12, (x1 - x0) - 6, height * 2 // 3))
        return x0 + (x1 - x0 - width) // 2 + 1, y0 + (y1 - y0 - height) // 2 + 1, width, height

    def paint(self, draw: ImageDraw.ImageDraw, scene: dict[str, Any], scale: float) -> None:
        digits = scene["digits"]
        boxes = self.cell_boxes(len(digits), len(digits[0]))
        for r, row in enumerate(digits):
            for c, digit in enumerate(row):
                x0, y0, x1, y1 = boxes[r][c]
                draw.rectangle((round(x0 * scale), round(y0 * scale), round(x1 * scale), round(y1 * scale)),
                               outline=(120, 120, 120))
                x, y, width, height = self.glyph_box(boxes[r][c])
                draw_digit(draw, digit, round(x * scale), round(y * scale),
                           max(3, round(width * scale)), max(5, round(height * scale)))


VISUAL_TASK_FAMILIES: tuple[VisualTask, ...] = (ShapeCountTask(), BarCompareTask(), TableReadTask())
VISUAL_TASKS: dict[str, VisualTask] = {task.name: task for task in VISUAL_TASK_FAMILIES}


def is_visual_task(name: str) -> bool:
    return name in VISUAL_TASKS


def render_reference(ref: ImageRef, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render the image a prompt reference names, (size, size, 3) uint8."""
    if ref.task not in VISUAL_TASKS:
        raise ValueError(f"image reference names unknown visual task {ref.task!r}; valid: {sorted(VISUAL_TASKS)}")
    family = VISUAL_TASKS[ref.task]
    return family.render(family.problem(ref.difficulty, ref.seed), size)


def render_problem(problem: Problem, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image of a visual problem, (size, size, 3) uint8."""
    if problem.task not in VISUAL_TASKS:
        raise ValueError(f"{problem.task!r} is not a visual task; valid: {sorted(VISUAL_TASKS)}")
    return VISUAL_TASKS[problem.task].render(problem, size)
