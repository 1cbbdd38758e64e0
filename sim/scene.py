"""The simulated tabletop: a table, a Franka Panda and a task's objects and fixtures.

`TabletopScene` is a DIRECT pybullet world stepped at `physics_hz` and commanded at
`control_hz` (joint position targets, held for physics_hz / control_hz substeps). It is
deterministic for a (task, seed): `reset` rebuilds the world from scratch
(resetSimulation) in a fixed order, samples the initial state from the seed only, and
nothing reads the wall clock or global random state; so the same seed and the same
command sequence give identical trajectories.

World frame: the robot base is at the origin on the table top (z = 0), the workspace lies
in front of it (+x). Movable objects are small coloured boxes; fixtures (bowl, tray,
plate, drawer cabinet) are static bodies; goal regions are drawn as flat, collision-free
markers. Cameras are mounted by the sensor modules (client id + pose); this module gives
them `FRONT_CAMERA_POSE` and `link_pose("panda_hand")` for a wrist mount.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np
import pybullet as p
import pybullet_data
from numpy.typing import ArrayLike, NDArray

from sim.panda import HOME_Q, JOINT_NAMES, N_JOINTS, PandaArm
from sim.tasks.geometry import (
    BOWL_FLOOR_M,
    BOWL_OUTER_M,
    BOWL_WALL_M,
    PLATE_RADIUS_M,
    PLATE_THICKNESS_M,
    TABLE_TOP_Z_M,
    TRAY_SCALE,
    MOVABLE_MASS_KG,
)
from sim.tasks.sampling import sample_initial_state
from sim.tasks.spec import COLORS_RGBA, ObjectSpec, TaskSpec
from sim.world_state import WorldState

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).with_name("assets")
DRAWER_URDF = ASSETS_DIR / "drawer.urdf"
ROBOT_BASE_POSITION_M = (0.0, 0.0, TABLE_TOP_Z_M)

# Table: a slab whose top is z = 0, the robot sits 0.3 m from its back edge.
TABLE_CENTRE_M = (0.35, 0.0, TABLE_TOP_Z_M - 0.025)
TABLE_HALF_EXTENTS_M = (0.65, 0.75, 0.025)
TABLE_RGBA = (0.82, 0.74, 0.62, 1.0)

# Contact parameters: grippy objects on a moderately slippery table (pushes slide).
OBJECT_LATERAL_FRICTION = 1.0
OBJECT_SPINNING_FRICTION = 0.002
TABLE_LATERAL_FRICTION = 0.5
# The drawer slide resists like a real runner: a velocity motor at 0 with a force cap.
DRAWER_FRICTION_FORCE_N = 2.0
# Time given to objects to settle at reset before sim time starts at 0.
SETTLE_S = 0.25


class CameraPose(NamedTuple):
    """A camera looking from `eye_m` at `target_m` (world frame, world +z is image up);
    unpacks as ``eye, target = FRONT_CAMERA_POSE``."""

    eye_m: tuple[float, float, float]
    target_m: tuple[float, float, float]


# Facing the robot from across the table, high enough to see into the containers and the
# whole sampled workspace (x 0.25-0.8 m, |y| <= 0.42 m).
FRONT_CAMERA_POSE = CameraPose(eye_m=(1.15, 0.0, 0.62), target_m=(0.48, 0.0, 0.0))


@dataclass
class _SavedState:
    bullet_state: int
    physics_steps: int
    targets: NDArray[np.float64]


class TabletopScene:
    """A pybullet tabletop for one task at a time (see module docstring)."""

    def __init__(self, physics_hz: int = 240, control_hz: int = 20):
        if isinstance(physics_hz, bool) or not isinstance(physics_hz, int) or physics_hz <= 0:
            raise ValueError(f"physics_hz must be a positive int, got {physics_hz!r}")
        if isinstance(control_hz, bool) or not isinstance(control_hz, int) or control_hz <= 0:
            raise ValueError(f"control_hz must be a positive int, got {control_hz!r}")
        if physics_hz % control_hz:
            raise ValueError(f"physics_hz ({physics_hz}) must be a multiple of control_hz, got control_hz={control_hz}")
        self.physics_hz = physics_hz
        self.control_hz = control_hz
        self.substeps = physics_hz // control_hz
        self.client_id = p.connect(p.DIRECT)
        self.task: TaskSpec | None = None
        self.seed: int | None = None
        self.robot_id = -1
        self.table_id = -1
        self.body_ids: dict[str, int] = {}
        self.region_marker_ids: dict[str, int] = {}
        self._arm: PandaArm | None = None
        self._drawer_joint: dict[str, int] = {}
        self._targets = HOME_Q.copy()
        self._sim_time_s = 0.0
        self._physics_steps = 0
        self._saved: dict[int, _SavedState] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            p.disconnect(self.client_id)
            self._closed = True

    def __enter__(self) -> TabletopScene:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def sim_time_s(self) -> float:
        return self._sim_time_s

    @property
    def arm(self) -> PandaArm:
        if self._arm is None:
            raise RuntimeError("TabletopScene.reset(task, seed) must be called first")
        return self._arm

    def reset(self, task: TaskSpec, seed: int) -> WorldState:
        """Rebuild the world for `task` with the initial state drawn from `seed`.

        Saved states from before the reset are invalid afterwards (and are dropped).
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        cid = self.client_id
        for handle in list(self._saved):
            self.discard_state(handle)
        p.resetSimulation(physicsClientId=cid)
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        p.setTimeStep(1.0 / self.physics_hz, physicsClientId=cid)
        p.setPhysicsEngineParameter(numSolverIterations=80, deterministicOverlappingPairs=1, physicsClientId=cid)
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
        self.task, self.seed = task, int(seed)
        self.body_ids, self.region_marker_ids, self._drawer_joint = {}, {}, {}

        self._build_table()
        self._arm = PandaArm(cid, ROBOT_BASE_POSITION_M)
        self.robot_id = self._arm.body_id
        init = sample_initial_state(task, int(seed))
        for name, region in task.regions.items():
            self.region_marker_ids[name] = self._build_region_marker(region.x_m, region.y_m, region.color or "grey")
        fixtures = [o for o in task.objects if not o.geometry.movable]
        movables = [o for o in task.objects if o.geometry.movable]
        for obj in fixtures + movables:
            placement = init.placements[obj.name]
            self.body_ids[obj.name] = self._build_object(obj, placement.xy_m, placement.yaw_rad)
        for name, slide in init.fixture_joints.items():
            p.resetJointState(self.body_ids[name], self._drawer_joint[name], slide, 0.0, physicsClientId=cid)

        self._targets = HOME_Q.copy()
        self.arm.reset_joints(self._targets)
        for _ in range(int(round(SETTLE_S * self.physics_hz))):
            p.stepSimulation(physicsClientId=cid)
        self._sim_time_s = 0.0
        self._physics_steps = 0
        logger.debug("reset task %s seed %d: bodies %s", task.task_id, seed, self.body_ids)
        return self.world_state()

    # -- building ----------------------------------------------------------------------
    def _build_table(self) -> None:
        cid = self.client_id
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS_M, physicsClientId=cid)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS_M, rgbaColor=TABLE_RGBA, physicsClientId=cid)
        self.table_id = p.createMultiBody(0, col, vis, basePosition=TABLE_CENTRE_M, physicsClientId=cid)
        p.changeDynamics(self.table_id, -1, lateralFriction=TABLE_LATERAL_FRICTION, physicsClientId=cid)
        # A floor far below catches anything knocked off the table.
        floor = p.createCollisionShape(p.GEOM_PLANE, physicsClientId=cid)
        p.createMultiBody(0, floor, -1, basePosition=(0, 0, -0.75), physicsClientId=cid)

    def _build_region_marker(self, x_m: tuple[float, float], y_m: tuple[float, float], color: str) -> int:
        half = ((x_m[1] - x_m[0]) / 2, (y_m[1] - y_m[0]) / 2, 0.0005)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=COLORS_RGBA[color], physicsClientId=self.client_id)
        centre = ((x_m[0] + x_m[1]) / 2, (y_m[0] + y_m[1]) / 2, TABLE_TOP_Z_M + 0.0005)
        return p.createMultiBody(0, -1, vis, basePosition=centre, physicsClientId=self.client_id)

    def _build_object(self, obj: ObjectSpec, xy_m: tuple[float, float], yaw_rad: float) -> int:
        cid = self.client_id
        rgba = COLORS_RGBA[obj.color]
        quat = p.getQuaternionFromEuler([0.0, 0.0, yaw_rad])
        if obj.kind in ("cube", "block"):
            half = [s / 2 for s in obj.geometry.size_m]
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=rgba, physicsClientId=cid)
            pos = (xy_m[0], xy_m[1], TABLE_TOP_Z_M + half[2] + 0.0005)
            body = p.createMultiBody(MOVABLE_MASS_KG, col, vis, basePosition=pos, baseOrientation=quat, physicsClientId=cid)
            p.changeDynamics(
                body, -1, lateralFriction=OBJECT_LATERAL_FRICTION, spinningFriction=OBJECT_SPINNING_FRICTION, rollingFriction=0.0, physicsClientId=cid
            )
            return body
        pos = (xy_m[0], xy_m[1], TABLE_TOP_Z_M)
        if obj.kind == "bowl":
            return self._build_open_box(pos, quat, rgba)
        if obj.kind == "plate":
            col = p.createCollisionShape(p.GEOM_CYLINDER, radius=PLATE_RADIUS_M, height=PLATE_THICKNESS_M, collisionFramePosition=[0, 0, PLATE_THICKNESS_M / 2], physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_CYLINDER, radius=PLATE_RADIUS_M, length=PLATE_THICKNESS_M, rgbaColor=rgba, visualFramePosition=[0, 0, PLATE_THICKNESS_M / 2], physicsClientId=cid)
            body = p.createMultiBody(0, col, vis, basePosition=pos, baseOrientation=quat, physicsClientId=cid)
            p.changeDynamics(body, -1, lateralFriction=OBJECT_LATERAL_FRICTION, physicsClientId=cid)
            return body
        if obj.kind == "tray":
            body = p.loadURDF("tray/traybox.urdf", pos, quat, useFixedBase=True, globalScaling=TRAY_SCALE, physicsClientId=cid)
            # Drop the dark texture so the spec's colour is what cameras see.
            p.changeVisualShape(body, -1, rgbaColor=rgba, textureUniqueId=-1, physicsClientId=cid)
            return body
        if obj.kind == "drawer":
            body = p.loadURDF(str(DRAWER_URDF), pos, quat, useFixedBase=True, physicsClientId=cid)
            joint = 0
            self._drawer_joint[obj.name] = joint
            p.setJointMotorControl2(body, joint, p.VELOCITY_CONTROL, targetVelocity=0.0, force=DRAWER_FRICTION_FORCE_N, physicsClientId=cid)
            return body
        raise ValueError(f"object {obj.name!r}: cannot build kind {obj.kind!r}")

    def _build_open_box(self, pos: tuple[float, float, float], quat: tuple[float, ...], rgba: tuple[float, float, float, float]) -> int:
        """A bowl-like open container: a floor and four walls, base frame on the table."""
        cid = self.client_id
        ox, oy, oz = BOWL_OUTER_M
        t = BOWL_WALL_M
        wall_h = oz - BOWL_FLOOR_M
        parts = [
            ((ox / 2, oy / 2, BOWL_FLOOR_M / 2), (0.0, 0.0, BOWL_FLOOR_M / 2)),
            ((t / 2, oy / 2, wall_h / 2), (ox / 2 - t / 2, 0.0, BOWL_FLOOR_M + wall_h / 2)),
            ((t / 2, oy / 2, wall_h / 2), (-ox / 2 + t / 2, 0.0, BOWL_FLOOR_M + wall_h / 2)),
            ((ox / 2 - t, t / 2, wall_h / 2), (0.0, oy / 2 - t / 2, BOWL_FLOOR_M + wall_h / 2)),
            ((ox / 2 - t, t / 2, wall_h / 2), (0.0, -oy / 2 + t / 2, BOWL_FLOOR_M + wall_h / 2)),
        ]
        halves = [list(h) for h, _ in parts]
        offsets = [list(o) for _, o in parts]
        col = p.createCollisionShapeArray([p.GEOM_BOX] * len(parts), halfExtents=halves, collisionFramePositions=offsets, physicsClientId=cid)
        vis = p.createVisualShapeArray([p.GEOM_BOX] * len(parts), halfExtents=halves, visualFramePositions=offsets, physicsClientId=cid)
        body = p.createMultiBody(0, col, vis, basePosition=pos, baseOrientation=quat, physicsClientId=cid)
        p.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=cid)
        p.changeDynamics(body, -1, lateralFriction=OBJECT_LATERAL_FRICTION, physicsClientId=cid)
        return body

    # -- control -----------------------------------------------------------------------
    def apply_joint_targets(self, q: ArrayLike) -> None:
        """Position targets for the 9 joints (JOINT_NAMES order), held until the next call.

        Targets are clipped to the joint limits; both fingers get their mean target.
        """
        q = np.asarray(q, dtype=float).reshape(-1)
        if q.size != N_JOINTS:
            raise ValueError(f"joint targets must have {N_JOINTS} entries ({', '.join(JOINT_NAMES)}), got {q.size}")
        if not np.all(np.isfinite(q)):
            raise ValueError(f"joint targets must be finite, got {q.tolist()}")
        self._targets = self.arm.apply_targets(q)

    def step_control(self) -> float:
        """Advance one control period (physics_hz / control_hz substeps); returns sim time (s)."""
        return self._step(self.substeps)

    def step_physics(self, duration_s: float) -> float:
        """Advance by `duration_s` rounded to whole physics steps (at least one), for
        callers that interleave sensing within a control period; returns sim time (s)."""
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s!r}")
        return self._step(max(1, int(round(duration_s * self.physics_hz))))

    def _step(self, n_steps: int) -> float:
        if self._arm is None:
            raise RuntimeError("TabletopScene.reset(task, seed) must be called first")
        for _ in range(n_steps):
            p.stepSimulation(physicsClientId=self.client_id)
        # Counted in steps so the clock never accumulates rounding error.
        self._physics_steps += n_steps
        self._sim_time_s = self._physics_steps / self.physics_hz
        return self._sim_time_s

    # -- observation -------------------------------------------------------------------
    def joint_state(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """(positions, velocities, efforts), each (9,) in JOINT_NAMES order."""
        return self.arm.joint_state()

    def link_pose(self, link_name: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """World pose (position, xyzw quaternion) of a Panda link, e.g. "panda_hand"."""
        return self.arm.link_pose(link_name)

    def ee_pose(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        return self.arm.ee_pose()

    def fixture_joint_positions(self) -> dict[str, float]:
        """Slide position (m) of every drawer, keyed by the drawer's object name."""
        return {
            name: float(p.getJointState(self.body_ids[name], joint, physicsClientId=self.client_id)[0])
            for name, joint in self._drawer_joint.items()
        }

    def world_state(self) -> WorldState:
        q, _, _ = self.joint_state()
        poses = {}
        for name, body in self.body_ids.items():
            pos, quat = p.getBasePositionAndOrientation(body, physicsClientId=self.client_id)
            poses[name] = (np.array(pos), np.array(quat))
        ee_p, ee_q = self.arm.ee_pose()
        return WorldState(
            object_poses=poses,
            fixture_joints=self.fixture_joint_positions(),
            ee_position=ee_p,
            ee_quaternion=ee_q,
            gripper_width=self.arm.gripper_width(),
            sim_time_s=self._sim_time_s,
            joint_positions=q,
        )

    # -- save / restore ----------------------------------------------------------------
    def save_state(self) -> int:
        """Snapshot physics, sim time and the held joint targets; returns a handle."""
        handle = p.saveState(physicsClientId=self.client_id)
        self._saved[handle] = _SavedState(handle, self._physics_steps, self._targets.copy())
        return handle

    def restore_state(self, handle: int) -> None:
        """Return to a snapshot taken by `save_state` since the last reset."""
        if handle not in self._saved:
            raise KeyError(f"unknown state handle {handle}; valid handles: {sorted(self._saved)}")
        saved = self._saved[handle]
        p.restoreState(stateId=saved.bullet_state, physicsClientId=self.client_id)
        self._physics_steps = saved.physics_steps
        self._sim_time_s = saved.physics_steps / self.physics_hz
        self._targets = self.arm.apply_targets(saved.targets)

    def discard_state(self, handle: int) -> None:
        """Free a snapshot."""
        saved = self._saved.pop(handle)
        p.removeState(saved.bullet_state, physicsClientId=self.client_id)

    @property
    def joint_targets(self) -> NDArray[np.float64]:
        """The joint targets currently held by the controller."""
        return self._targets.copy()

