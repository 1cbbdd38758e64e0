"""Tracks a long-horizon task subgoal by subgoal: the harness's baseline bookkeeping.

Fed one WorldState per control step, it advances through the task's ordered subgoals
when each success predicate holds and fails the task when a subgoal exceeds its step
budget. The ROS harness node and in-process evaluations use the same tracker, so the
numbers in result.json mean the same thing everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from sim.tasks.predicates import evaluate
from sim.tasks.spec import TaskSpec
from sim.world_state import WorldState


class Progress(str, Enum):
    RUNNING = "running"
    SUBGOAL_REACHED = "subgoal_reached"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class SubgoalRecord:
    name: str
    success: bool
    steps: int
    duration_s: float

    def as_dict(self) -> dict:
        return {"name": self.name, "success": self.success, "steps": self.steps, "duration_s": round(self.duration_s, 4)}


@dataclass
class TaskProgress:
    task: TaskSpec
    start_time_s: float
    index: int = 0
    steps: int = 0
    records: list[SubgoalRecord] = field(default_factory=list)
    reason: str = ""
    _subgoal_start_s: float | None = None

    @property
    def done(self) -> bool:
        return self.index >= len(self.task.subgoals) or bool(self.reason)

    @property
    def current_name(self) -> str:
        return self.task.subgoals[self.index].name if self.index < len(self.task.subgoals) else ""

    def update(self, world: WorldState) -> Progress:
        """Account for one control step that ended in `world`."""
        if self.done:
            raise RuntimeError("TaskProgress.update() after the task ended")
        if self._subgoal_start_s is None:
            self._subgoal_start_s = self.start_time_s
        self.steps += 1
        subgoal = self.task.subgoals[self.index]
        elapsed = world.sim_time_s - self._subgoal_start_s
        if evaluate(subgoal.predicate, world, self.task.geometry):
            self.records.append(SubgoalRecord(subgoal.name, True, self.steps, elapsed))
            self.index += 1
            self.steps = 0
            self._subgoal_start_s = world.sim_time_s
            return Progress.SUCCEEDED if self.index == len(self.task.subgoals) else Progress.SUBGOAL_REACHED
        if self.steps >= self.task.max_steps_per_subgoal:
            self.fail(f"subgoal '{subgoal.name}' not reached within {self.task.max_steps_per_subgoal} steps", world.sim_time_s)
            return Progress.FAILED
        return Progress.RUNNING

    def fail(self, reason: str, now_s: float) -> None:
        """End the task as failed (timeout, lost node, cancel); the current subgoal is recorded failed."""
        if self.index < len(self.task.subgoals) and not self.reason:
            start = self._subgoal_start_s if self._subgoal_start_s is not None else self.start_time_s
            self.records.append(SubgoalRecord(self.task.subgoals[self.index].name, False, self.steps, now_s - start))
        self.reason = self.reason or reason

    @property
    def success(self) -> bool:
        return self.index == len(self.task.subgoals) and not self.reason
