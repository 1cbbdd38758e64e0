"""The simulated tabletop as the HELM harness controller's environment (no ROS).

`SceneHarnessEnv` implements `runtime.harness_controller.HarnessEnv` over a
`TabletopScene` holding one task episode, with the episode loop's semantics
(`sim.rollout.run_episode`): a chunk's targets are applied one per control step, the
subgoal being worked on is checked after every step, and the rest of the chunk is dropped
the moment it holds. That makes a pass-through controller over this environment the same
experiment as `run_episode` (the base-policy row), and the harness rows differ from it
only by what the harness decides.

Which subgoal is "being worked on" is set by whoever proposes chunks
(`set_subgoal`, see runtime.helm), since the controller's protocol passes the subgoal to
the policy, not to the environment.

Snapshots are the scene's saved physics states plus the environment's own counters;
`restore` returns to one and lets the perturber re-impose world events that happened
after it (sim.perturbations). Executed steps are counted monotonically (`steps_executed`)
for budgets and perturbation triggers; a restore does not rewind them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.base import ActionChunk, Observation
from runtime.helm_memory import GripperEvents
from sim.panda import N_JOINTS
from sim.perturbations import DROP_FINGER_M, Perturber
from sim.scene import TabletopScene
from sim.tasks.predicates import evaluate, parse_predicate
from sim.tasks.spec import SubgoalSpec, TaskSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Snapshot:
    state: int
    sim_time_s: float


class SceneHarnessEnv:
    """`HarnessEnv` over a TabletopScene that `reset(task, seed)` has loaded."""

    def __init__(
        self,
        scene: TabletopScene,
        task: TaskSpec,
        render: Callable[[], dict[str, np.ndarray]] | None = None,
        perturber: Perturber | None = None,
        on_gripper_event: Callable[[Observation, str], None] | None = None,
        max_steps: int | None = None,
    ) -> None:
        self.scene = scene
        self.task = task
        self.render = render
        self.perturber = perturber
        self.on_gripper_event = on_gripper_event
        self.max_steps = max_steps  # a hard cap on executed steps over the episode (None: no cap)
        self.steps_executed = 0
        self.subgoal: SubgoalSpec | None = None
        self.subgoal_index = 0
        self._call = None
        self._snapshots: dict[int, _Snapshot] = {}
        self._next_handle = 0
        self._gripper = GripperEvents()
        self.holds = 0

    # -- who is being worked on ---------------------------------------------------------
    def set_subgoal(self, subgoal: SubgoalSpec, index: int) -> None:
        self.subgoal, self.subgoal_index = subgoal, int(index)
        self._call = parse_predicate(subgoal.predicate)
        if self.perturber is not None:
            self.perturber.current_predicate = subgoal.predicate

    # -- HarnessEnv ---------------------------------------------------------------------
    def observe(self) -> Observation:
        ws = self.scene.world_state()
        images = self.render() if self.render is not None else {}
        return Observation(ws.joint_positions.copy(), ws.sim_time_s, self.task, self.subgoal_index, ws, images)

    def execute(self, chunk: ActionChunk):
        from runtime.harness_controller import ExecutionReport  # the controller's own type; no ROS

        positions = np.asarray(chunk.positions, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != N_JOINTS or not np.all(np.isfinite(positions)):
            raise ValueError(f"chunk must be finite (T, {N_JOINTS}) joint targets, got shape {positions.shape}")
        for row in positions:
            if self.max_steps is not None and self.steps_executed >= self.max_steps:
                return ExecutionReport(False, f"episode step cap {self.max_steps} reached")
            target = row.copy()
            if self.perturber is not None and self.perturber.forcing_open():
                target[7:9] = DROP_FINGER_M
            self.scene.apply_joint_targets(target)
            self.scene.step_control()
            self.steps_executed += 1
            self._gripper_event(target)
            if self.perturber is not None:
                self.perturber.after_step(self.steps_executed)
            if self._call is not None and evaluate(self._call, self.scene.world_state(), self.task.geometry):
                break
        return ExecutionReport(True)

    def subgoal_done(self, subgoal: SubgoalSpec) -> bool:
        return bool(evaluate(parse_predicate(subgoal.predicate), self.scene.world_state(), self.task.geometry))

    def snapshot(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._snapshots[handle] = _Snapshot(self.scene.save_state(), self.scene.sim_time_s)
        return handle

    def restore(self, handle: int) -> None:
        if handle not in self._snapshots:
            raise KeyError(f"unknown snapshot handle {handle!r}; valid: {sorted(self._snapshots)}")
        snap = self._snapshots[handle]
        self.scene.restore_state(snap.state)
        self._gripper.reset()
        if self.perturber is not None:
            self.perturber.reapply(snap.sim_time_s)

    def hold(self) -> None:
        self.holds += 1
        self.scene.apply_joint_targets(self.scene.joint_state()[0])

    def close(self) -> None:
        """Free the episode's snapshots (the scene stays loaded)."""
        for snap in self._snapshots.values():
            self.scene.discard_state(snap.state)
        self._snapshots.clear()

    # -- keyframes at gripper events ----------------------------------------------------
    def _gripper_event(self, target: np.ndarray) -> None:
        what = self._gripper.update(target[7:9])
        if what is not None and self.on_gripper_event is not None:
            self.on_gripper_event(self.observe(), what)
