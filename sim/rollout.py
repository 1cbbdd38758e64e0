"""In-process episode loop for evaluations and benchmarks (no ROS).

`run_episode` resets the scene for (task, seed), then attempts the task's subgoals in
order: the policy is queried for action chunks (joint-position targets at the scene's
control rate), every executed control step is followed by a predicate check, and as soon
as the current subgoal's predicate holds the remaining chunk is dropped and the next
subgoal begins (a subgoal that already holds when it starts succeeds with 0 steps). The
episode fails on the first subgoal not reached within `task.max_steps_per_subgoal` control
steps. Durations are simulated seconds.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sim.panda import N_JOINTS
from sim.scene import TabletopScene
from sim.tasks.predicates import evaluate, parse_predicate
from sim.tasks.spec import TaskSpec
from sim.world_state import WorldState

logger = logging.getLogger(__name__)


class Policy(Protocol):
    def reset(self) -> None: ...

    def act(self, world_state: WorldState, joint_positions: ArrayLike, task: TaskSpec, subgoal_index: int) -> NDArray[np.float64]: ...


@dataclass
class SubgoalResult:
    name: str
    predicate: str
    success: bool
    steps: int  # control steps spent on this subgoal
    duration_s: float  # simulated seconds spent on this subgoal


@dataclass
class EpisodeResult:
    task_id: str
    seed: int
    success: bool
    subgoals: list[dict[str, Any]] = field(default_factory=list)  # SubgoalResult as dicts
    total_steps: int = 0
    duration_s: float = 0.0
    reason: str | None = None  # why the episode failed, None on success

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PolicyOutputError(ValueError):
    """A policy returned something that is not a (T >= 1, 9) array of finite targets."""


def _check_chunk(chunk: Any, task: TaskSpec, k: int) -> NDArray[np.float64]:
    arr = np.asarray(chunk, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != N_JOINTS:
        raise PolicyOutputError(f"task {task.task_id!r} subgoal {k}: policy.act must return a (T, {N_JOINTS}) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise PolicyOutputError(f"task {task.task_id!r} subgoal {k}: policy.act returned non-finite targets")
    return arr


def run_episode(
    scene: TabletopScene,
    task: TaskSpec,
    policy: Policy,
    seed: int,
    on_subgoal: Callable[[int, SubgoalResult], None] | None = None,
) -> EpisodeResult:
    """Run one episode of `task` from the initial state of `seed` (see module docstring).

    `on_subgoal(index, result)` is called after each attempted subgoal.
    """
    ws = scene.reset(task, seed)
    policy.reset()
    geometry = task.geometry
    result = EpisodeResult(task_id=task.task_id, seed=int(seed), success=True)
    for k, subgoal in enumerate(task.subgoals):
        call = parse_predicate(subgoal.predicate)
        start_s = scene.sim_time_s
        steps = 0
        reached = evaluate(call, ws, geometry)
        while not reached and steps < task.max_steps_per_subgoal:
            chunk = _check_chunk(policy.act(ws, ws.joint_positions, task, k), task, k)
            for row in chunk:
                scene.apply_joint_targets(row)
                scene.step_control()
                steps += 1
                ws = scene.world_state()
                reached = evaluate(call, ws, geometry)
                if reached or steps >= task.max_steps_per_subgoal:
                    break
        sub = SubgoalResult(subgoal.name, subgoal.predicate, reached, steps, scene.sim_time_s - start_s)
        result.subgoals.append(asdict(sub))
        result.total_steps += steps
        if on_subgoal is not None:
            on_subgoal(k, sub)
        if not reached:
            result.success = False
            result.reason = f"subgoal {k} '{subgoal.name}' ({subgoal.predicate}) not reached within {task.max_steps_per_subgoal} steps"
            break
    result.duration_s = scene.sim_time_s
    logger.debug("episode %s seed %d: success=%s steps=%d", task.task_id, seed, result.success, result.total_steps)
    return result
