"""The long-horizon task suite (sim/tasks/suite/*.yaml) and its train/held-out seed split.

Seed split (fixed, documented, disjoint by construction): an initial state is drawn from
an integer seed alone (`sim.tasks.sampling`). Training demonstrations and learned-policy
training use seeds 0 .. HELDOUT_SEED_BASE - 1; evaluation uses held-out seeds
HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + 1, ...  Seeds are shared across tasks (seed k of
task A and seed k of task B are unrelated scenes because the tasks' objects differ).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sim.tasks.spec import TaskSpec, TaskSpecError, load_task_file

SUITE_DIR = Path(__file__).with_name("suite")
HELDOUT_SEED_BASE = 1_000_000
SPLITS = ("train", "heldout")


class UnknownTaskError(KeyError):
    """A task id that is not in the suite; the message lists the valid ids."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@lru_cache(maxsize=1)
def _load(suite_dir: Path) -> dict[str, TaskSpec]:
    tasks: dict[str, TaskSpec] = {}
    for path in sorted(suite_dir.glob("*.yaml")):
        task = load_task_file(path)
        if task.task_id != path.stem:
            raise TaskSpecError(f"{path}: task.task_id {task.task_id!r} must match the file name {path.stem!r}")
        tasks[task.task_id] = task
    if not tasks:
        raise TaskSpecError(f"{suite_dir}: no task files (*.yaml)")
    return tasks


def load_suite() -> dict[str, TaskSpec]:
    """All suite tasks by id (sorted by id); loaded and validated once per process."""
    return dict(_load(SUITE_DIR))


def get_task(task_id: str) -> TaskSpec:
    tasks = _load(SUITE_DIR)
    if task_id not in tasks:
        raise UnknownTaskError(f"unknown task id {task_id!r}; valid ids: {', '.join(sorted(tasks))}")
    return tasks[task_id]


def initial_state_seeds(split: str, n: int) -> list[int]:
    """The first `n` seeds of a split: "train" -> 0..n-1, "heldout" -> 1_000_000.. ."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split == "train":
        if n > HELDOUT_SEED_BASE:
            raise ValueError(f"n must be <= {HELDOUT_SEED_BASE} for the train split, got {n}")
        return list(range(n))
    return list(range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + n))


def split_of_seed(seed: int) -> str:
    """Which split a seed belongs to."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return "train" if seed < HELDOUT_SEED_BASE else "heldout"
