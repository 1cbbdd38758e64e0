"""The Franka Emika Panda of pybullet_data: joint order, limits, control and kinematics.

Every other part of the stack (scene, expert, ROS joint states and trajectory commands)
uses the nine joints in `JOINT_NAMES` order: seven arm joints, then the two finger joints.
Position limits are the URDF's (constants here, a test checks them against the loaded
file); velocity limits are the Franka datasheet values (arm) and the Franka Hand's finger
speed. The grasp frame is the URDF's `panda_grasptarget` link, between the finger pads.

`PandaKinematics` owns a private DIRECT pybullet client holding only the robot, so IK and
FK can be used without access to a simulated world (the scripted expert only reads
observations; `WorldState.from_observation` reconstructs the end-effector pose by FK).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import pybullet as p
import pybullet_data
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

PANDA_URDF = "franka_panda/panda.urdf"

JOINT_NAMES: tuple[str, ...] = (
    "panda_joint1",
    "panda_joint2",
    "panda_joint3",
    "panda_joint4",
    "panda_joint5",
    "panda_joint6",
    "panda_joint7",
    "panda_finger_joint1",
    "panda_finger_joint2",
)
N_JOINTS = len(JOINT_NAMES)
N_ARM_JOINTS = 7
GRASP_LINK_NAME = "panda_grasptarget"
HAND_LINK_NAME = "panda_hand"

# From panda.urdf (rad for the arm, m for each finger).
POSITION_LOWER = np.array([-2.9671, -1.8326, -2.9671, -3.1416, -2.9671, -0.0873, -2.9671, 0.0, 0.0])
POSITION_UPPER = np.array([2.9671, 1.8326, 2.9671, 0.0, 2.9671, 3.8223, 2.9671, 0.04, 0.04])
# Franka datasheet joint velocity limits (rad/s); fingers: 50 mm/s each (Franka Hand).
VELOCITY_LIMIT = np.array([2.1750, 2.1750, 2.1750, 2.1750, 2.6100, 2.6100, 2.6100, 0.05, 0.05])
# Motor force/torque limits used by the position controller (URDF efforts; N·m, N).
EFFORT_LIMIT = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0, 20.0, 20.0])

# Franka's "ready" pose, gripper open: hand pointing down, grasp frame at about
# (0.31, 0, 0.49) m in the base frame, clear of the workspace and the front camera's view.
HOME_Q = np.array([0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4, 0.04, 0.04])

# Each finger's pad sits this far inside its joint position (closest points of the
# collision mesh at grasp height), so the pad distance is q_finger1 + q_finger2 - 2 * inset.
FINGER_PAD_INSET_M = 0.0011
MAX_GRIPPER_WIDTH_M = 2 * (POSITION_UPPER[7] - FINGER_PAD_INSET_M)

# IK acceptance: the brief for the expert is millimetre-accurate placement.
IK_POSITION_TOLERANCE_M = 0.002
IK_ORIENTATION_TOLERANCE_RAD = 0.02


class IKError(RuntimeError):
    """IK did not reach the tolerance; `best_q` and its errors are attached."""

    def __init__(self, message: str, best_q: NDArray[np.float64], position_error_m: float, orientation_error_rad: float):
        super().__init__(message)
        self.best_q = best_q
        self.position_error_m = position_error_m
        self.orientation_error_rad = orientation_error_rad


def gripper_width_from_joints(finger_positions_m: ArrayLike) -> float:
    """Pad-to-pad distance (m) from the two finger joint positions."""
    f = np.asarray(finger_positions_m, dtype=float)
    return float(max(0.0, f[0] + f[1] - 2 * FINGER_PAD_INSET_M))


def finger_target_for_width(width_m: float) -> float:
    """Per-finger joint target giving a pad-to-pad distance of `width_m` (clipped to limits)."""
    return float(np.clip(width_m / 2 + FINGER_PAD_INSET_M, POSITION_LOWER[7], POSITION_UPPER[7]))


def top_down_quaternion(yaw_rad: float) -> NDArray[np.float64]:
    """xyzw quaternion of a grasp frame pointing straight down, fingers closing along
    the world direction (-sin(yaw), cos(yaw))."""
    return np.array(p.getQuaternionFromEuler([math.pi, 0.0, yaw_rad]))


def quaternion_angle_rad(q_a: ArrayLike, q_b: ArrayLike) -> float:
    """Angle of the rotation between two xyzw quaternions."""
    dot = abs(float(np.dot(np.asarray(q_a, dtype=float), np.asarray(q_b, dtype=float))))
    return 2.0 * math.acos(min(1.0, dot))


@dataclass(frozen=True)
class PandaIndices:
    """pybullet joint/link indices of a loaded Panda, in `JOINT_NAMES` order."""

    joints: tuple[int, ...]
    grasp_link: int
    hand_link: int
    links_by_name: dict[str, int]


def load_panda(client_id: int, base_position_m: ArrayLike = (0.0, 0.0, 0.0)) -> tuple[int, PandaIndices]:
    """Load the Panda with a fixed base into `client_id`; return its body id and indices."""
    p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=client_id)
    body = p.loadURDF(
        PANDA_URDF,
        basePosition=list(np.asarray(base_position_m, dtype=float)),
        useFixedBase=True,
        flags=p.URDF_USE_INERTIA_FROM_FILE,
        physicsClientId=client_id,
    )
    by_joint: dict[str, int] = {}
    links: dict[str, int] = {}
    for j in range(p.getNumJoints(body, physicsClientId=client_id)):
        info = p.getJointInfo(body, j, physicsClientId=client_id)
        by_joint[info[1].decode()] = j
        links[info[12].decode()] = j
    indices = PandaIndices(
        joints=tuple(by_joint[name] for name in JOINT_NAMES),
        grasp_link=links[GRASP_LINK_NAME],
        hand_link=links[HAND_LINK_NAME],
        links_by_name=links,
    )
    return body, indices


def read_urdf_position_limits(client_id: int, body: int, indices: PandaIndices) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(lower, upper) position limits of the loaded URDF, in `JOINT_NAMES` order."""
    infos = [p.getJointInfo(body, j, physicsClientId=client_id) for j in indices.joints]
    return np.array([i[8] for i in infos]), np.array([i[9] for i in infos])


class PandaKinematics:
    """FK and accurate IK for the Panda on a private DIRECT client (no world, no contacts).

    The robot base must be where the scene puts it (`base_position_m`, identity rotation).
    """

    def __init__(self, base_position_m: ArrayLike = (0.0, 0.0, 0.0)):
        self._client = p.connect(p.DIRECT)
        self._body, self._idx = load_panda(self._client, base_position_m)
        # IK uses the body's movable DoFs (9, fingers included) for its null-space lists.
        self._ranges = (POSITION_UPPER - POSITION_LOWER).tolist()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            p.disconnect(self._client)
            self._closed = True

    def __enter__(self) -> PandaKinematics:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- kinematics ----------------------------------------------------------------
    def _set_q(self, q: ArrayLike) -> None:
        """Teleport the arm (7 values) or arm and fingers (9 values, JOINT_NAMES order)."""
        q = np.asarray(q, dtype=float).reshape(-1)
        if q.size not in (N_ARM_JOINTS, N_JOINTS):
            raise ValueError(f"joint positions must have {N_ARM_JOINTS} or {N_JOINTS} entries, got {q.size}")
        for j, value in zip(self._idx.joints, q):
            p.resetJointState(self._body, j, float(value), physicsClientId=self._client)

    def _grasp_pose(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        s = p.getLinkState(self._body, self._idx.grasp_link, computeForwardKinematics=True, physicsClientId=self._client)
        return np.array(s[4]), np.array(s[5])

    def fk(self, q: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Grasp-frame (position m, xyzw quaternion) for 7 arm (or all 9) joint positions."""
        self._set_q(q)
        return self._grasp_pose()

    def link_pose(self, q: ArrayLike, link_name: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """World pose of any Panda link (URDF link name) at joint positions `q`."""
        if link_name not in self._idx.links_by_name:
            raise KeyError(f"unknown Panda link {link_name!r}; known: {sorted(self._idx.links_by_name)}")
        self._set_q(q)
        s = p.getLinkState(self._body, self._idx.links_by_name[link_name], computeForwardKinematics=True, physicsClientId=self._client)
        return np.array(s[4]), np.array(s[5])

    def ik(self, position: ArrayLike, quaternion: ArrayLike, q_seed: ArrayLike, max_refinements: int = 8) -> NDArray[np.float64]:
        """Arm joint positions (7,) placing the grasp frame at `position`/`quaternion` (xyzw).

        pybullet's null-space IK runs from the seed (its starting state and rest pose, which
        keeps consecutive solutions continuous and within the joint limits); then up to
        `max_refinements` damped least-squares steps bring the FK error within
        IK_POSITION_TOLERANCE_M / IK_ORIENTATION_TOLERANCE_RAD. Raises IKError (with the
        best solution attached) when it does not converge, e.g. out of reach.
        """
        target_p = np.asarray(position, dtype=float)
        target_q = np.asarray(quaternion, dtype=float)
        seed = np.asarray(q_seed, dtype=float)[:N_ARM_JOINTS]
        rest = np.concatenate([seed, HOME_Q[N_ARM_JOINTS:]])
        self._set_q(seed)
        sol = p.calculateInverseKinematics(
            self._body,
            self._idx.grasp_link,
            target_p.tolist(),
            target_q.tolist(),
            lowerLimits=POSITION_LOWER.tolist(),
            upperLimits=POSITION_UPPER.tolist(),
            jointRanges=self._ranges,
            restPoses=rest.tolist(),
            maxNumIterations=100,
            residualThreshold=1e-5,
            physicsClientId=self._client,
        )
        q = np.clip(np.array(sol[:N_ARM_JOINTS]), POSITION_LOWER[:N_ARM_JOINTS], POSITION_UPPER[:N_ARM_JOINTS])
        # pybullet's null-space IK trades accuracy for staying near the rest pose; a few
        # damped least-squares steps on the full 6-D error make it millimetre-accurate.
        err_p = err_r = math.inf
        for _ in range(max_refinements):
            pos, quat = self.fk(q)
            err_p = float(np.linalg.norm(pos - target_p))
            err_r = quaternion_angle_rad(quat, target_q)
            if err_p < IK_POSITION_TOLERANCE_M / 4 and err_r < IK_ORIENTATION_TOLERANCE_RAD / 4:
                break
            q = self._dls_step(q, target_p - pos, _rotation_error(quat, target_q))
        pos, quat = self.fk(q)
        err_p = float(np.linalg.norm(pos - target_p))
        err_r = quaternion_angle_rad(quat, target_q)
        if err_p < IK_POSITION_TOLERANCE_M and err_r < IK_ORIENTATION_TOLERANCE_RAD:
            return q
        raise IKError(
            f"IK did not converge for position {np.round(target_p, 4).tolist()}: "
            f"error {err_p * 1000:.1f} mm / {err_r:.3f} rad",
            q,
            err_p,
            err_r,
        )

    def _dls_step(self, q: NDArray[np.float64], dp: NDArray[np.float64], dr: NDArray[np.float64]) -> NDArray[np.float64]:
        """One damped least-squares update of the arm joints toward a 6-D pose error."""
        full = np.concatenate([q, HOME_Q[N_ARM_JOINTS:]]).tolist()
        zeros = [0.0] * N_JOINTS
        lin, ang = p.calculateJacobian(self._body, self._idx.grasp_link, [0.0, 0.0, 0.0], full, zeros, zeros, physicsClientId=self._client)
        jac = np.vstack([np.array(lin)[:, :N_ARM_JOINTS], np.array(ang)[:, :N_ARM_JOINTS]])
        err = np.concatenate([dp, dr])
        damping = 1e-3
        dq = jac.T @ np.linalg.solve(jac @ jac.T + damping**2 * np.eye(6), err)
        return np.clip(q + dq, POSITION_LOWER[:N_ARM_JOINTS], POSITION_UPPER[:N_ARM_JOINTS])


def _rotation_error(q_current: ArrayLike, q_target: ArrayLike) -> NDArray[np.float64]:
    """World-frame rotation vector taking `q_current` to `q_target` (both xyzw)."""
    inv = p.invertTransform([0, 0, 0], list(q_current))[1]
    _, dq = p.multiplyTransforms([0, 0, 0], list(q_target), [0, 0, 0], inv)
    axis, angle = p.getAxisAngleFromQuaternion(dq)
    if angle > math.pi:
        angle -= 2 * math.pi
    return np.asarray(axis) * angle


class PandaArm:
    """A Panda loaded in a (world) client: joint I/O, position control, grasp-frame pose."""

    # pybullet position-control gains (its velocity-constraint motor: kp on position error,
    # kd on velocity error); tuned so a 20 Hz target stream is tracked within a few mm.
    ARM_POSITION_GAIN = 0.3
    ARM_VELOCITY_GAIN = 1.0
    FINGER_POSITION_GAIN = 0.2

    def __init__(self, client_id: int, base_position_m: ArrayLike = (0.0, 0.0, 0.0)):
        self.client_id = client_id
        self.body_id, self.indices = load_panda(client_id, base_position_m)
        self._set_friction()
        self._couple_fingers()

    def _set_friction(self) -> None:
        # Fingers grip with high friction; the URDF sets lateral friction 1.0 already,
        # spinning friction lets a pinch resist object rotation about the closing axis.
        for j in self.indices.joints[N_ARM_JOINTS:]:
            p.changeDynamics(self.body_id, j, lateralFriction=1.2, spinningFriction=0.02, frictionAnchor=True, physicsClientId=self.client_id)

    def _couple_fingers(self) -> None:
        # pybullet ignores the URDF <mimic>: without a gear constraint the two fingers can
        # drift together and a held object slides off-centre along the closing axis.
        left, right = self.indices.joints[N_ARM_JOINTS], self.indices.joints[N_ARM_JOINTS + 1]
        c = p.createConstraint(
            self.body_id, left, self.body_id, right, p.JOINT_GEAR, [0, 1, 0], [0, 0, 0], [0, 0, 0], physicsClientId=self.client_id
        )
        p.changeConstraint(c, gearRatio=-1, erp=0.1, maxForce=50, physicsClientId=self.client_id)

    def reset_joints(self, q: ArrayLike) -> None:
        """Teleport to `q` (9,) with zero velocity and hold it."""
        q = np.asarray(q, dtype=float)
        for j, value in zip(self.indices.joints, q):
            p.resetJointState(self.body_id, j, float(value), 0.0, physicsClientId=self.client_id)
        self.apply_targets(q)

    def apply_targets(self, q: ArrayLike) -> NDArray[np.float64]:
        """Position-control targets (9,), clipped to the joint limits; the finger targets
        are replaced by their mean so both fingers always move symmetrically."""
        q = np.clip(np.asarray(q, dtype=float), POSITION_LOWER, POSITION_UPPER)
        q[7:9] = q[7:9].mean()
        for k, j in enumerate(self.indices.joints):
            arm = k < N_ARM_JOINTS
            p.setJointMotorControl2(
                self.body_id,
                j,
                p.POSITION_CONTROL,
                targetPosition=float(q[k]),
                force=float(EFFORT_LIMIT[k]),
                maxVelocity=float(VELOCITY_LIMIT[k]),
                positionGain=self.ARM_POSITION_GAIN if arm else self.FINGER_POSITION_GAIN,
                velocityGain=self.ARM_VELOCITY_GAIN if arm else 1.0,
                physicsClientId=self.client_id,
            )
        return q

    def joint_state(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """(positions, velocities, applied motor efforts), each (9,) in JOINT_NAMES order."""
        states = p.getJointStates(self.body_id, list(self.indices.joints), physicsClientId=self.client_id)
        return (
            np.array([s[0] for s in states]),
            np.array([s[1] for s in states]),
            np.array([s[3] for s in states]),
        )

    def link_pose(self, link_name: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """World (position, xyzw quaternion) of a Panda link (URDF link frame)."""
        if link_name not in self.indices.links_by_name:
            raise KeyError(f"unknown Panda link {link_name!r}; known: {sorted(self.indices.links_by_name)}")
        s = p.getLinkState(self.body_id, self.indices.links_by_name[link_name], computeForwardKinematics=True, physicsClientId=self.client_id)
        return np.array(s[4]), np.array(s[5])

    def ee_pose(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Grasp frame (between the finger pads) world pose."""
        return self.link_pose(GRASP_LINK_NAME)

    def gripper_width(self) -> float:
        """Pad-to-pad distance of the fingers (m)."""
        q, _, _ = self.joint_state()
        return gripper_width_from_joints(q[7:9])
