"""TabletopScene, the Panda helpers and WorldState: determinism, save/restore, tracking,
world-state contents, and that hand-written constants match the loaded assets."""
import math

import numpy as np
import pybullet as p
import pybullet_data
import pytest

from sim.panda import (
    GRASP_LINK_NAME,
    HOME_Q,
    JOINT_NAMES,
    POSITION_LOWER,
    POSITION_UPPER,
    VELOCITY_LIMIT,
    IKError,
    PandaKinematics,
    load_panda,
    read_urdf_position_limits,
    top_down_quaternion,
)
from sim.scene import DRAWER_URDF, FRONT_CAMERA_POSE, TabletopScene
from sim.tasks import geometry as geo
from sim.tasks.suite import get_task
from sim.world_state import WorldState

SEED = 1_000_003


@pytest.fixture(scope="module")
def kinematics():
    k = PandaKinematics()
    yield k
    k.close()


@pytest.fixture(scope="module")
def scene():
    s = TabletopScene()
    yield s
    s.close()


def _snapshot(scene: TabletopScene) -> np.ndarray:
    """Every body's base pose and the robot/drawer joint positions and velocities, flat."""
    ws = scene.world_state()
    parts = [np.concatenate(ws.object_poses[n]) for n in sorted(ws.object_poses)]
    q, dq, _ = scene.joint_state()
    parts += [q, dq, np.array(sorted(ws.fixture_joints.values()))]
    return np.concatenate(parts)


def _wiggle(scene: TabletopScene, steps: int) -> None:
    """A fixed command sequence that moves every arm joint and the fingers."""
    for k in range(steps):
        q = HOME_Q.copy()
        q[:7] += 0.25 * np.sin(0.15 * k + np.arange(7))
        q[7:] = 0.02 + 0.015 * math.sin(0.2 * k)
        scene.apply_joint_targets(q)
        scene.step_control()


def test_constants_match_urdf():
    cid = p.connect(p.DIRECT)
    try:
        body, idx = load_panda(cid)
        lower, upper = read_urdf_position_limits(cid, body, idx)
        names = [p.getJointInfo(body, j, physicsClientId=cid)[1].decode() for j in idx.joints]
    finally:
        p.disconnect(cid)
    assert tuple(names) == JOINT_NAMES
    np.testing.assert_allclose(lower, POSITION_LOWER)
    np.testing.assert_allclose(upper, POSITION_UPPER)
    assert VELOCITY_LIMIT.shape == (9,) and np.all(VELOCITY_LIMIT > 0)
    assert np.all((HOME_Q >= POSITION_LOWER) & (HOME_Q <= POSITION_UPPER))


def test_drawer_urdf_matches_geometry():
    cid = p.connect(p.DIRECT)
    try:
        body = p.loadURDF(str(DRAWER_URDF), useFixedBase=True, physicsClientId=cid)
        info = p.getJointInfo(body, 0, physicsClientId=cid)
        assert info[1].decode() == "drawer_slide" and info[9] == pytest.approx(geo.DRAWER_TRAVEL_M)
        margin = 0.005  # AABBs include pybullet's contact margin
        lo, hi = p.getAABB(body, 0, physicsClientId=cid)  # drawer link at slide 0
        handle_front_x = geo.DRAWER_HANDLE_CENTRE_M[0] - geo.DRAWER_HANDLE_SIZE_M[0] / 2
        assert lo[0] == pytest.approx(handle_front_x, abs=margin)
        assert hi[2] == pytest.approx(geo.DRAWER_PANEL_TOP_M, abs=margin)
        assert hi[1] == pytest.approx(0.125, abs=margin)
        clo, chi = p.getAABB(body, -1, physicsClientId=cid)
        assert chi[0] == pytest.approx(geo.DRAWER_CABINET_M[0] / 2, abs=margin)
        assert chi[2] == pytest.approx(geo.DRAWER_CABINET_M[2], abs=margin)
        assert clo[0] == pytest.approx(geo.DRAWER_FRONT_X_M, abs=margin)
        # Pulled out, the exposed interior's floor is where the geometry says.
        p.resetJointState(body, 0, 0.15, physicsClientId=cid)
        x0, x1 = geo.drawer_exposed_inner_x(0.15)
        hit = p.rayTest([(x0 + x1) / 2, 0.0, 0.3], [(x0 + x1) / 2, 0.0, 0.0], physicsClientId=cid)[0]
        assert hit[0] == body and hit[1] == 0 and hit[3][2] == pytest.approx(geo.DRAWER_FLOOR_TOP_M, abs=1e-3)
    finally:
        p.disconnect(cid)


def test_tray_geometry_matches_asset():
    cid = p.connect(p.DIRECT)
    try:
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
        p.loadURDF("tray/traybox.urdf", useFixedBase=True, globalScaling=geo.TRAY_SCALE, physicsClientId=cid)
        floor = p.rayTest([0, 0, 0.2], [0, 0, -0.1], physicsClientId=cid)[0][3][2]
        assert floor == pytest.approx(geo.TRAY_FLOOR_TOP_M, abs=1e-3)
        z = geo.TRAY_FLOOR_TOP_M + 0.005
        for direction in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            wall = p.rayTest([0, 0, z], [0.3 * direction[0], 0.3 * direction[1], z], physicsClientId=cid)[0][3]
            # The predicate's inner footprint lies inside the slanted walls.
            assert geo.TRAY_INNER_HALF_M[0] <= abs(wall[0] + wall[1]) <= geo.TRAY_INNER_HALF_M[0] + 0.015
    finally:
        p.disconnect(cid)


def test_ik_is_millimetre_accurate(kinematics):
    q = HOME_Q[:7].copy()
    for x, y, z, yaw in [(0.45, 0.0, 0.3, 0.0), (0.6, -0.3, 0.02, 0.7), (0.35, 0.3, 0.15, -1.2), (0.7, 0.1, 0.05, 1.5)]:
        q = kinematics.ik([x, y, z], top_down_quaternion(yaw), q)
        pos, quat = kinematics.fk(q)
        assert np.linalg.norm(pos - [x, y, z]) < 0.002
        assert abs(np.dot(quat, top_down_quaternion(yaw))) > 0.9999
        assert np.all(q >= POSITION_LOWER[:7]) and np.all(q <= POSITION_UPPER[:7])
    with pytest.raises(IKError):
        kinematics.ik([2.0, 0.0, 0.3], top_down_quaternion(0.0), HOME_Q)


def test_same_seed_gives_identical_trajectories(scene):
    task = get_task("drawer_then_stack")
    start = scene.reset(task, SEED).position("red_cube")
    _wiggle(scene, 40)
    first = _snapshot(scene)
    other = TabletopScene()
    try:
        other.reset(task, SEED)
        _wiggle(other, 40)
        np.testing.assert_array_equal(_snapshot(other), first)
    finally:
        other.close()
    scene.reset(task, SEED)  # re-reset of a used scene: no history leaks in
    _wiggle(scene, 40)
    np.testing.assert_array_equal(_snapshot(scene), first)
    assert not np.allclose(scene.reset(task, SEED + 1).position("red_cube"), start)


def test_save_restore_returns_to_identical_state(scene):
    scene.reset(get_task("bowl_then_stack"), SEED)
    _wiggle(scene, 10)
    saved = _snapshot(scene)
    t_saved = scene.sim_time_s
    handle = scene.save_state()
    _wiggle(scene, 25)
    after_first = _snapshot(scene)
    scene.restore_state(handle)
    np.testing.assert_array_equal(_snapshot(scene), saved)
    assert scene.sim_time_s == t_saved
    _wiggle(scene, 25)  # replaying the same commands reproduces the same future
    np.testing.assert_array_equal(_snapshot(scene), after_first)
    scene.discard_state(handle)
    with pytest.raises(KeyError):
        scene.restore_state(handle)


def test_joint_targets_are_tracked(scene):
    scene.reset(get_task("tray_two_cubes"), SEED)
    target = HOME_Q.copy()
    target[:7] += np.array([0.3, 0.2, -0.2, 0.3, 0.2, -0.2, 0.4])
    target[7:] = 0.015
    scene.apply_joint_targets(target)
    for _ in range(30):  # 1.5 s
        t = scene.step_control()
    q, dq, effort = scene.joint_state()
    assert t == pytest.approx(1.5)
    np.testing.assert_allclose(q, target, atol=0.01)
    assert abs(q[7] - q[8]) < 1e-3
    assert np.all(np.abs(dq) < 0.05) and effort.shape == (9,)
    with pytest.raises(ValueError, match="9 entries"):
        scene.apply_joint_targets(np.zeros(7))
    with pytest.raises(ValueError, match="finite"):
        scene.apply_joint_targets(np.full(9, np.nan))


def test_world_state_contents(scene, kinematics):
    task = get_task("drawer_put_block")
    ws = scene.reset(task, SEED)
    assert set(ws.object_poses) == {o.name for o in task.objects} == set(scene.body_ids)
    assert set(ws.fixture_joints) == {"drawer"} and ws.fixture_joints["drawer"] == pytest.approx(0.0, abs=1e-3)
    block = ws.position("yellow_block")
    spec = task.object("yellow_block")
    assert spec.region.x_m[0] <= block[0] <= spec.region.x_m[1] and spec.region.y_m[0] <= block[1] <= spec.region.y_m[1]
    assert block[2] == pytest.approx(geo.DEFAULT_MOVABLE_SIZE_M["block"][2] / 2, abs=2e-3)  # resting on the table
    ee_p, ee_q = scene.link_pose(GRASP_LINK_NAME)
    np.testing.assert_allclose(ws.ee_position, ee_p)
    assert ws.gripper_width == pytest.approx(0.0778, abs=1e-3)
    assert ws.sim_time_s == 0.0
    np.testing.assert_array_equal(WorldState.from_scene(scene).position("drawer"), ws.position("drawer"))
    hand_p, _ = scene.link_pose("panda_hand")
    assert hand_p[2] > ws.ee_position[2]
    # The ROS-side path: names + poses + joint positions -> the same WorldState via FK.
    names = list(ws.object_poses)
    rebuilt = WorldState.from_observation(
        names,
        np.array([np.concatenate(ws.object_poses[n]) for n in names]),
        list(ws.fixture_joints),
        list(ws.fixture_joints.values()),
        ws.joint_positions,
        ws.sim_time_s,
        kinematics,
    )
    np.testing.assert_allclose(rebuilt.ee_position, ws.ee_position, atol=1e-6)
    assert abs(np.dot(rebuilt.ee_quaternion, ws.ee_quaternion)) > 1 - 1e-9
    assert rebuilt.gripper_width == pytest.approx(ws.gripper_width)
    assert rebuilt.fixture_joints == ws.fixture_joints
    with pytest.raises(ValueError, match="joint_positions"):
        WorldState.from_observation(names, [ws.object_poses[n] for n in names], [], [], np.zeros(7), 0.0, kinematics)
    eye, target = FRONT_CAMERA_POSE
    assert eye[0] > target[0] and eye[2] > target[2]


def test_drawer_slides_and_reset_state(scene):
    task = get_task("tray_then_close_drawer")
    spec = task.object("drawer")
    ws = scene.reset(task, SEED)
    lo, hi = spec.initial_joint_m
    assert lo - 1e-3 <= ws.fixture_joints["drawer"] <= hi + 1e-3
    with pytest.raises(ValueError, match="seed"):
        scene.reset(task, -1)
    with pytest.raises(ValueError, match="control_hz"):
        TabletopScene(physics_hz=240, control_hz=7)
