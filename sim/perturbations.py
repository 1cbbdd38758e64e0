"""Mid-episode perturbations for the recovery protocol (our LIBERO-Recovery analogue).

HELM's recovery claim is measured by injecting, at a random time in the middle of an
episode, one of three disturbances (papers/helm.md):

    object_displaced   a movable object the robot is not holding is pushed 6-10 cm across
                       the table (as if someone nudged it)
    grasp_dropped      the held object slips out: the fingers are forced open for a moment
    target_noise       the current (or next) placement target is moved 3-6 cm

The trigger is a count of executed control steps (monotonic: a rollback does not rewind
it), drawn per episode from the seed. Perturbations are events of the outside world, so a
rollback of the simulator must not undo them: once one has fired, the poses it left the
objects in are recorded after they settle, and `reapply` puts the objects back there after
any restore to a state from before the event. (Without this, restoring a snapshot would
"repair" the world for free and the recovery numbers would measure nothing.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pybullet as p

from sim.scene import TabletopScene
from sim.tasks.predicates import grasped, parse_predicate
from sim.tasks.spec import WORKSPACE_X_M, WORKSPACE_Y_M, TaskSpec

logger = logging.getLogger(__name__)

PerturbationKind = Literal["object_displaced", "grasp_dropped", "target_noise"]
PERTURBATION_KINDS: tuple[str, ...] = ("object_displaced", "grasp_dropped", "target_noise")
# Control steps after the event at which the disturbed objects' poses are recorded (resting).
SETTLE_STEPS = 20
# Finger opening (per finger, m) forced by a grasp drop, and for how many control steps.
DROP_FINGER_M = 0.04
DROP_STEPS = 6


@dataclass(frozen=True)
class PerturbationSpec:
    """One scheduled disturbance: what, and after how many executed control steps."""

    kind: str
    trigger_step: int

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"perturbation kind must be one of {list(PERTURBATION_KINDS)}, got {self.kind!r}")
        if isinstance(self.trigger_step, bool) or not isinstance(self.trigger_step, int) or self.trigger_step < 0:
            raise ValueError(f"trigger_step must be an int >= 0, got {self.trigger_step!r}")


def draw_perturbation(task: TaskSpec, seed: int, kind: str | None = None) -> PerturbationSpec:
    """The perturbation of episode (task, seed): kind uniform over the three (unless given),
    trigger uniform over the middle of a typical episode (each subgoal takes ~40-100 steps)."""
    rng = np.random.default_rng([int(seed), 7919])
    chosen = kind if kind is not None else PERTURBATION_KINDS[int(rng.integers(len(PERTURBATION_KINDS)))]
    n = len(task.subgoals)
    return PerturbationSpec(chosen, int(rng.integers(40, 40 + 50 * (n - 1))))


@dataclass
class _Fired:
    step: int  # executed-step count at the event
    sim_time_s: float
    detail: str
    objects: tuple[str, ...]
    settled: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


class Perturber:
    """Fires one `PerturbationSpec` during an episode and keeps its effect through rollbacks.

    The environment calls `after_step(steps_executed)` after every executed control step
    and `reapply(restored_time_s)` after every restore; `hold_fingers_open()` tells it
    whether a grasp drop is forcing the fingers open right now.
    """

    def __init__(self, scene: TabletopScene, task: TaskSpec, spec: PerturbationSpec, seed: int) -> None:
        self.scene = scene
        self.task = task
        self.spec = spec
        self.rng = np.random.default_rng([int(seed), 104729])
        self.fired: _Fired | None = None
        self.current_predicate: str | None = None  # the subgoal being worked on (set by the env)
        self._drop_until = -1
        self._steps = 0

    @property
    def description(self) -> str:
        return self.fired.detail if self.fired else f"{self.spec.kind} at step {self.spec.trigger_step} (not fired yet)"

    def forcing_open(self) -> bool:
        return self._steps < self._drop_until

    def after_step(self, steps_executed: int) -> None:
        self._steps = steps_executed
        if self.fired is None:
            if steps_executed >= self.spec.trigger_step:
                self._fire(steps_executed)
        elif not self.fired.settled and steps_executed >= self.fired.step + SETTLE_STEPS:
            ws = self.scene.world_state()
            self.fired.settled = {name: (ws.object_poses[name][0].copy(), ws.object_poses[name][1].copy()) for name in self.fired.objects}

    def reapply(self, restored_time_s: float) -> None:
        """After a restore to `restored_time_s`: a state from before the event gets the
        event's lasting effect back (objects where it left them)."""
        fired = self.fired
        if fired is None or restored_time_s >= fired.sim_time_s or not fired.settled:
            return
        for name, (pos, quat) in fired.settled.items():
            self._place(name, pos, quat)
        logger.debug("perturbation %s re-applied after a restore to t=%.2f s", fired.detail, restored_time_s)

    # -- the events ---------------------------------------------------------------------
    def _fire(self, step: int) -> None:
        kind = self.spec.kind
        ws = self.scene.world_state()
        geometry = self.task.geometry
        movable = [o.name for o in self.task.objects if geometry.objects[o.name].movable]
        held = [name for name in movable if grasped(ws, geometry, name)]
        if kind == "grasp_dropped" and not held:
            return  # nothing in hand yet: wait for a grasp (fires at the next step that has one)
        if kind == "grasp_dropped":
            self._drop_until = step + DROP_STEPS
            objects, detail = (held[0],), f"grasp_dropped: {held[0]} released at step {step}"
        else:
            name = self._target_object(movable, held) if kind == "target_noise" else None
            if name is None:
                free = [m for m in movable if m not in held]
                if not free:
                    return
                name = free[int(self.rng.integers(len(free)))]
            lo, hi = (0.03, 0.06) if kind == "target_noise" else (0.06, 0.10)
            distance = float(self.rng.uniform(lo, hi))
            angle = float(self.rng.uniform(0.0, 2.0 * np.pi))
            pos, quat = ws.object_poses[name]
            new = pos.copy()
            new[0] = np.clip(pos[0] + distance * np.cos(angle), WORKSPACE_X_M[0] + 0.03, WORKSPACE_X_M[1] - 0.03)
            new[1] = np.clip(pos[1] + distance * np.sin(angle), WORKSPACE_Y_M[0] + 0.03, WORKSPACE_Y_M[1] - 0.03)
            new[2] = pos[2] + 0.005  # lift a hair so it does not start interpenetrating the table
            self._place(name, new, quat)
            objects = (name,)
            detail = f"{kind}: {name} moved {np.linalg.norm(new[:2] - pos[:2]) * 100:.1f} cm at step {step}"
        self.fired = _Fired(step, self.scene.sim_time_s, detail, objects)
        logger.info("perturbation %s", detail)

    def _target_object(self, movable: list[str], held: list[str]) -> str | None:
        """The current subgoal's placement target when it is a movable object (a bowl, a
        plate, a cube to stack on), else None (fall back to displacing an object)."""
        if self.current_predicate is None:
            return None
        call = parse_predicate(self.current_predicate)
        if len(call.args) == 2 and call.args[1] in movable and call.args[1] not in held:
            return call.args[1]
        return None

    def _place(self, name: str, pos: np.ndarray, quat: np.ndarray) -> None:
        body = self.scene.body_ids[name]
        cid = self.scene.client_id
        p.resetBasePositionAndOrientation(body, pos.tolist(), quat.tolist(), physicsClientId=cid)
        p.resetBaseVelocity(body, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], physicsClientId=cid)
