"""The privileged world state that predicates and the scripted expert read.

A `WorldState` is a plain snapshot: poses of every named object and fixture, fixture joint
positions (the drawer's slide, keyed by the fixture's name), the grasp-frame pose and the
gripper opening. It is built either by the scene directly (`TabletopScene.world_state()`)
or, on the ROS side, from what a node receives (`from_observation`): object poses, fixture
joint states and the robot's nine joint positions, the end-effector pose being
reconstructed by forward kinematics and the gripper width from the finger joints.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sim.panda import N_JOINTS, gripper_width_from_joints

Pose = tuple[NDArray[np.float64], NDArray[np.float64]]  # (position (3,) m, quaternion (4,) xyzw)


class ForwardKinematics(Protocol):
    def fk(self, q: ArrayLike) -> Pose: ...


class _HasWorldState(Protocol):
    def world_state(self) -> WorldState: ...


@dataclass
class WorldState:
    """Snapshot of the tabletop (all positions in metres, world frame, quaternions xyzw)."""

    object_poses: dict[str, Pose]
    fixture_joints: dict[str, float]
    ee_position: NDArray[np.float64]
    ee_quaternion: NDArray[np.float64]
    gripper_width: float
    sim_time_s: float
    joint_positions: NDArray[np.float64] = field(default_factory=lambda: np.zeros(N_JOINTS))

    def __post_init__(self) -> None:
        self.ee_position = np.asarray(self.ee_position, dtype=float).reshape(3)
        self.ee_quaternion = np.asarray(self.ee_quaternion, dtype=float).reshape(4)
        self.joint_positions = np.asarray(self.joint_positions, dtype=float).reshape(N_JOINTS)
        poses: dict[str, Pose] = {}
        for name, (pos, quat) in self.object_poses.items():
            pos_a = np.asarray(pos, dtype=float).reshape(3)
            quat_a = np.asarray(quat, dtype=float).reshape(4)
            if not (np.all(np.isfinite(pos_a)) and np.all(np.isfinite(quat_a))):
                raise ValueError(f"WorldState.object_poses[{name!r}] must be finite, got {pos_a}, {quat_a}")
            poses[name] = (pos_a, quat_a)
        self.object_poses = poses
        self.fixture_joints = {k: float(v) for k, v in self.fixture_joints.items()}
        if self.gripper_width < 0:
            raise ValueError(f"WorldState.gripper_width must be >= 0, got {self.gripper_width}")

    def position(self, name: str) -> NDArray[np.float64]:
        return self.object_poses[name][0]

    def quaternion(self, name: str) -> NDArray[np.float64]:
        return self.object_poses[name][1]

    @classmethod
    def from_observation(
        cls,
        object_names: Sequence[str],
        object_poses: Sequence[tuple[ArrayLike, ArrayLike]] | NDArray[np.float64],
        fixture_joint_names: Sequence[str],
        fixture_joint_positions: Sequence[float] | NDArray[np.float64],
        joint_positions: ArrayLike,
        sim_time_s: float,
        kinematics: ForwardKinematics,
    ) -> WorldState:
        """Build from received data. `object_poses` is one (position, quaternion) pair per
        name, or an (N, 7) array of [x, y, z, qx, qy, qz, qw] rows; `joint_positions` are
        the nine joints in JOINT_NAMES order."""
        if len(object_names) != len(object_poses):
            raise ValueError(f"object_names has {len(object_names)} entries but object_poses has {len(object_poses)}")
        if len(fixture_joint_names) != len(fixture_joint_positions):
            raise ValueError(
                f"fixture_joint_names has {len(fixture_joint_names)} entries but fixture_joint_positions has {len(fixture_joint_positions)}"
            )
        q = np.asarray(joint_positions, dtype=float).reshape(-1)
        if q.size != N_JOINTS:
            raise ValueError(f"joint_positions must have {N_JOINTS} entries (JOINT_NAMES order), got {q.size}")
        poses: dict[str, Pose] = {}
        for name, pose in zip(object_names, object_poses):
            if isinstance(pose, np.ndarray) and pose.shape == (7,):
                poses[name] = (pose[:3], pose[3:])
            else:
                poses[name] = (np.asarray(pose[0], dtype=float), np.asarray(pose[1], dtype=float))
        ee_p, ee_q = kinematics.fk(q)
        return cls(
            object_poses=poses,
            fixture_joints=dict(zip(fixture_joint_names, (float(v) for v in fixture_joint_positions))),
            ee_position=ee_p,
            ee_quaternion=ee_q,
            gripper_width=gripper_width_from_joints(q[7:9]),
            sim_time_s=float(sim_time_s),
            joint_positions=q,
        )

    @classmethod
    def from_scene(cls, scene: _HasWorldState) -> WorldState:
        """Snapshot a `TabletopScene` (delegates to `scene.world_state()`)."""
        return scene.world_state()
