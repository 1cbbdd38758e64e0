"""Tactile pads on a fixed-base Panda squeezing a fixed cube with known finger forces."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pybullet_data
import pytest

from sim.sensors._geometry import quat_to_matrix
from sim.sensors.tactile import TactileConfig, TactileSensor, panda_finger_pads

ARM_HOME = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)  # gripper pointing down
FINGER_JOINTS = (9, 10)
HAND_LINK = 8


@pytest.fixture
def client(request: pytest.FixtureRequest) -> int:
    cid = p.connect(p.DIRECT)
    request.addfinalizer(lambda: p.disconnect(cid))
    p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
    return cid


@pytest.fixture
def panda(client: int) -> int:
    """Fixed-base Panda, no gravity, arm held at home, fingers free and 3 cm open."""
    robot = p.loadURDF("franka_panda/panda.urdf", useFixedBase=True, physicsClientId=client)
    for joint, q in enumerate(ARM_HOME):
        p.resetJointState(robot, joint, q, physicsClientId=client)
        p.setJointMotorControl2(
            robot, joint, p.POSITION_CONTROL, targetPosition=q, force=500.0, physicsClientId=client
        )
    for joint in FINGER_JOINTS:
        p.resetJointState(robot, joint, 0.03, physicsClientId=client)
        # Switch the default velocity motor off so torque control acts alone.
        p.setJointMotorControl2(robot, joint, p.VELOCITY_CONTROL, force=0.0, physicsClientId=client)
    return robot


def _hand_frame(cid: int, robot: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    state = p.getLinkState(robot, HAND_LINK, computeForwardKinematics=True, physicsClientId=cid)
    return np.asarray(state[4]), quat_to_matrix(state[5]), state[5]


def _pad_world(cid: int, pad: TactileSensor) -> tuple[np.ndarray, np.ndarray]:
    """Pad centre and outward normal in the world."""
    state = p.getLinkState(pad.body_id, pad.link_index, computeForwardKinematics=True, physicsClientId=cid)
    rot = quat_to_matrix(state[5])
    return np.asarray(state[4]) + rot @ pad.center_local, rot @ pad.pad_axes_local[2]


def _fixed_box(cid: int, robot: int, offset_hand, half_extents) -> int:
    """Static box, aligned with the hand, centred between the pads + offset (hand frame)."""
    pads = panda_finger_pads(cid, robot)
    mid = (_pad_world(cid, pads[0])[0] + _pad_world(cid, pads[1])[0]) / 2.0
    _, hand_rot, hand_quat = _hand_frame(cid, robot)
    col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half_extents, physicsClientId=cid)
    return p.createMultiBody(
        0, col, -1, basePosition=mid + hand_rot @ np.asarray(offset_hand), baseOrientation=hand_quat,
        physicsClientId=cid,
    )


def _drive_fingers(cid: int, robot: int, force: float, steps: int = 240) -> None:
    """Push both fingers with ``force`` N along their joint axes (negative closes)."""
    for _ in range(steps):
        for joint in FINGER_JOINTS:
            p.setJointMotorControl2(robot, joint, p.TORQUE_CONTROL, force=force, physicsClientId=cid)
        p.stepSimulation(physicsClientId=cid)


def _contact_normal_force(cid: int, pad: TactileSensor) -> float:
    contacts = p.getContactPoints(bodyA=pad.body_id, linkIndexA=pad.link_index, physicsClientId=cid)
    return float(sum(c[9] for c in contacts))


def _centre_of_pressure(grid: np.ndarray, cfg: TactileConfig) -> tuple[float, float]:
    """(u, v) in metres of the force-weighted taxel centres."""
    u = ((np.arange(cfg.cols) + 0.5) / cfg.cols - 0.5) * cfg.pad_size_m[0]
    v = ((np.arange(cfg.rows) + 0.5) / cfg.rows - 0.5) * cfg.pad_size_m[1]
    total = grid.sum()
    return float(grid.sum(axis=0) @ u / total), float(grid.sum(axis=1) @ v / total)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": 0}, "TactileConfig.rows must be an int >= 1, got 0"),
        ({"cols": 2.5}, "TactileConfig.cols must be an int >= 1, got 2.5"),
        ({"pad_size_m": (0.018, -0.01)}, "TactileConfig.pad_size_m"),
        ({"sigma_m": 0.0}, "TactileConfig.sigma_m must be > 0, got 0.0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TactileConfig(**kwargs)


def test_sensor_rejects_bad_pad_axes(client: int, panda: int) -> None:
    with pytest.raises(ValueError, match="perpendicular"):
        TactileSensor(TactileConfig(), client, panda, 9, (0, 0, 0.045), (0, -1, 0), (0, 1, 1))


def test_panda_pads_face_each_other_on_the_finger_surface(client: int, panda: int) -> None:
    left, right = panda_finger_pads(client, panda)
    names = [p.getJointInfo(panda, s.link_index, physicsClientId=client)[12] for s in (left, right)]
    assert names == [b"panda_leftfinger", b"panda_rightfinger"]
    (c_left, n_left), (c_right, n_right) = _pad_world(client, left), _pad_world(client, right)
    gap = c_right - c_left
    assert np.linalg.norm(gap) == pytest.approx(0.06, abs=1e-6)  # 2 x 3 cm opening
    np.testing.assert_allclose(n_left, gap / np.linalg.norm(gap), atol=1e-6)
    np.testing.assert_allclose(n_right, -n_left, atol=1e-6)
    # Both pads share the rows direction (towards the fingertip) and mirror u.
    np.testing.assert_allclose(left.pad_axes_local[1], right.pad_axes_local[1])
    # A ray from the midpoint hits each finger's collision shape at its pad,
    # within the ~1 mm collision margin, also at the pad corners.
    mid = (c_left + c_right) / 2.0
    for pad, centre in ((left, c_left), (right, c_right)):
        state = p.getLinkState(panda, pad.link_index, computeForwardKinematics=True, physicsClientId=client)
        rot = quat_to_matrix(state[5])
        for du in (-0.008, 0.0, 0.008):
            for dv in (-0.008, 0.0, 0.008):
                shift = rot @ (pad.pad_axes_local[0] * du + pad.pad_axes_local[1] * dv)
                target = centre + shift
                hit = p.rayTest(mid + shift, target + (target - mid - shift), physicsClientId=client)[0]
                assert (hit[0], hit[1]) == (panda, pad.link_index)
                assert np.linalg.norm(np.asarray(hit[3]) - target) < 1.5e-3


def test_no_contact_reads_zero(client: int, panda: int) -> None:
    _drive_fingers(client, panda, 0.0, steps=10)
    for pad in panda_finger_pads(client, panda):
        grid = pad.read()
        assert grid.shape == (4, 4) and grid.dtype == np.float32
        assert not grid.any()


@pytest.mark.parametrize("cfg", [TactileConfig(), TactileConfig(rows=6, cols=3, sigma_m=1e-4)])
def test_squeeze_sums_to_contact_normal_force(client: int, panda: int, cfg: TactileConfig) -> None:
    force = 10.0
    _fixed_box(client, panda, (0.0, 0.0, 0.0), (0.006, 0.012, 0.003))
    _drive_fingers(client, panda, -force)
    for pad in panda_finger_pads(client, panda, cfg):
        grid = pad.read()
        assert grid.shape == (cfg.rows, cfg.cols) and np.all(np.isfinite(grid))
        contact = _contact_normal_force(client, pad)
        assert grid.sum() == pytest.approx(contact, rel=1e-5)
        # At rest each pad carries its finger's joint force.
        assert contact == pytest.approx(force, rel=0.05)


@pytest.mark.parametrize("axis", ["towards_tip", "across"])
def test_centre_of_pressure_follows_the_contact(client: int, panda: int, axis: str) -> None:
    cfg = TactileConfig()
    cops = {}
    for shift in (-0.005, 0.005):
        # Hand z runs along the fingers towards the tip (pad v); hand x is
        # pad u on the left finger and -u on the right one.
        offset = (0.0, 0.0, shift) if axis == "towards_tip" else (shift, 0.0, 0.0)
        half = (0.006, 0.012, 0.003) if axis == "towards_tip" else (0.003, 0.012, 0.006)
        box = _fixed_box(client, panda, offset, half)
        for joint in FINGER_JOINTS:
            p.resetJointState(panda, joint, 0.03, physicsClientId=client)
        _drive_fingers(client, panda, -10.0)
        cops[shift] = [_centre_of_pressure(pad.read(), cfg) for pad in panda_finger_pads(client, panda, cfg)]
        p.removeBody(box, physicsClientId=client)
    for side, sign in ((0, 1.0), (1, -1.0)):
        (u_lo, v_lo), (u_hi, v_hi) = cops[-0.005][side], cops[0.005][side]
        if axis == "towards_tip":
            assert v_lo < -0.002 and v_hi > 0.002
        else:
            assert sign * u_lo < -0.002 and sign * u_hi > 0.002


def test_contact_on_the_back_of_a_finger_is_not_on_the_pad(client: int, panda: int) -> None:
    left, _ = panda_finger_pads(client, panda)
    # Finger mesh depth: the back face is 26.4 mm behind the pad (hand +y side).
    _fixed_box(client, panda, (0.0, 0.03 + 0.0264 + 0.004, 0.0), (0.006, 0.004, 0.004))
    _drive_fingers(client, panda, 10.0)  # opening pushes the left finger's back into the box
    assert _contact_normal_force(client, left) > 1.0
    assert not left.read().any()
