"""The pybullet robot backend: trajectories are followed by interpolation from the
current target, sensors fire at their own rates in simulation time."""
import numpy as np
import pytest

from sim.backend import PybulletRobot, SensorRig, SimConfig, _event_slices
from sim.sensors.camera import CameraConfig
from sim.sensors.event_camera import EventCameraConfig
from sim.sensors.lidar import LidarConfig


@pytest.fixture(scope="module")
def robot():
    rig = SensorRig(
        front_camera=CameraConfig(width=32, height=32, rate_hz=10.0),
        wrist_camera=CameraConfig(width=32, height=32, rate_hz=5.0),
        lidar=LidarConfig(num_channels=4, horizontal_resolution_deg=10.0, rate_hz=5.0),
        event_camera=EventCameraConfig(width=32, height=32, render_rate_hz=40.0),
    )
    r = PybulletRobot(SimConfig(sensors=rig))
    yield r
    r.close()


def test_sensors_fire_at_their_rates(robot):
    first = robot.reset("pick_place_bowl", 1_000_000)
    assert set(first.cameras) == {"front", "wrist"} and first.lidar is not None
    steps = [robot.step() for _ in range(8)]  # 0.4 s at 20 Hz
    assert sum("front" in s.cameras for s in steps) == 4  # 10 Hz
    assert sum("wrist" in s.cameras for s in steps) == 2  # 5 Hz
    assert sum(s.lidar is not None for s in steps) == 2  # 5 Hz
    assert all(s.events is not None and s.tactile is not None for s in steps)
    assert steps[-1].sim_time_s == pytest.approx(0.4)
    frame = steps[1].cameras["front"]
    assert frame.rgb.shape == (32, 32, 3) and frame.depth_m.shape == (32, 32)


def test_trajectory_is_followed_and_moving_arm_makes_events(robot):
    start = robot.reset("pick_place_bowl", 1_000_000)
    q0 = start.joint_positions.copy()
    target = q0.copy()
    target[0] += 0.3  # base joint: sweeps the arm through the event camera's view
    robot.command(np.stack([q0 + (target - q0) * 0.5, target]), np.array([0.5, 1.0]))
    halfway = [robot.step() for _ in range(10)][-1]
    assert halfway.joint_positions[0] == pytest.approx(q0[0] + 0.15, abs=0.03)
    events = sum(len(s.events) for s in [robot.step() for _ in range(20)])
    assert robot.step().joint_positions[0] == pytest.approx(target[0], abs=0.01)
    assert events > 0


def test_bad_trajectories_are_refused(robot):
    robot.reset("pick_place_bowl", 1_000_000)
    with pytest.raises(ValueError):
        robot.command(np.zeros((2, 7)), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        robot.command(np.zeros((2, 9)), np.array([0.1]))


def test_event_render_slices_cover_one_control_period():
    assert _event_slices(SimConfig()) == [6, 6]  # 40 Hz renders within a 20 Hz tick of 12 substeps
    fast = SimConfig(sensors=SensorRig(event_camera=EventCameraConfig(render_rate_hz=1000.0)))
    assert _event_slices(fast) == [1] * 12  # never finer than one physics step
    with pytest.raises(ValueError, match="multiple"):
        SimConfig(physics_hz=240, control_hz=7)


# -- snapshots -------------------------------------------------------------------------------
def _record(robot, n):
    """n steps as comparable data: joints, object poses, which sensors fired, their data."""
    out = []
    for _ in range(n):
        s = robot.step()
        out.append({
            "t": s.sim_time_s,
            "q": s.joint_positions.copy(),
            "dq": s.joint_velocities.copy(),
            "poses": {k: np.concatenate(v) for k, v in s.world.object_poses.items()},
            "cameras": {k: f.rgb.copy() for k, f in s.cameras.items()},
            "lidar": None if s.lidar is None else s.lidar.points.copy(),
            "events": (s.events.x.copy(), s.events.y.copy(), s.events.t_s.copy(), s.events.polarity.copy()),
            "tactile": {k: v.copy() for k, v in s.tactile.items()},
        })
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x["t"] == y["t"], i
        np.testing.assert_allclose(x["q"], y["q"], rtol=0, atol=1e-9, err_msg=f"step {i}")
        np.testing.assert_allclose(x["dq"], y["dq"], rtol=0, atol=1e-9, err_msg=f"step {i}")
        assert x["poses"].keys() == y["poses"].keys()
        for name in x["poses"]:
            np.testing.assert_allclose(x["poses"][name], y["poses"][name], rtol=0, atol=1e-9, err_msg=f"step {i} {name}")
        assert x["cameras"].keys() == y["cameras"].keys(), f"step {i}: rate gates fired differently"
        for cam in x["cameras"]:
            np.testing.assert_array_equal(x["cameras"][cam], y["cameras"][cam])
        assert (x["lidar"] is None) == (y["lidar"] is None), f"step {i}: lidar gate fired differently"
        if x["lidar"] is not None:
            np.testing.assert_allclose(x["lidar"], y["lidar"], rtol=0, atol=1e-9)
        for u, v in zip(x["events"], y["events"]):
            np.testing.assert_array_equal(u, v, err_msg=f"step {i}: events differ")
        for pad in x["tactile"]:
            np.testing.assert_allclose(x["tactile"][pad], y["tactile"][pad], rtol=0, atol=1e-6)


def _sweep(robot, dq0=0.4, duration_s=1.0):
    """Command a base-joint sweep (through the event camera's view) from the current state."""
    q = robot.step().joint_positions.copy()
    target = q.copy()
    target[0] += dq0
    robot.command(np.stack([q + (target - q) * 0.5, target]), np.array([duration_s / 2, duration_s]))
    return target


def test_stepping_after_restore_reproduces_stepping_after_save(robot):
    robot.reset("pick_place_bowl", 1_000_000)
    _sweep(robot)
    for _ in range(3):  # mid-trajectory, between sensor ticks
        robot.step()
    saved_t = robot.scene.sim_time_s
    handle = robot.save_state()
    after_save = _record(robot, 12)  # crosses the trajectory's end and several camera/LiDAR ticks
    assert sum(len(s["events"][0]) for s in after_save) > 0  # the arm moves in view: a real event check
    assert any(s["cameras"] for s in after_save) and any(s["lidar"] is not None for s in after_save)

    restored = robot.restore_state(handle)
    assert restored.sim_time_s == saved_t and robot.scene.sim_time_s == saved_t
    assert not restored.cameras and restored.lidar is None  # nothing was due at the snapshot
    _assert_same(after_save, _record(robot, 12))
    # The snapshot survives a restore unchanged: a second rollback replays the same future.
    robot.restore_state(handle)
    _assert_same(after_save, _record(robot, 12))


def test_restore_returns_the_saved_world(robot):
    start = robot.reset("pick_place_bowl", 1_000_000)
    handle = robot.save_state()
    _sweep(robot, dq0=0.6)
    moved = _record(robot, 15)[-1]
    assert abs(moved["q"][0] - start.joint_positions[0]) > 0.3
    back = robot.restore_state(handle)
    np.testing.assert_allclose(back.joint_positions, start.joint_positions, rtol=0, atol=1e-9)
    for name, (pos, quat) in start.world.object_poses.items():
        np.testing.assert_allclose(back.world.object_poses[name][0], pos, rtol=0, atol=1e-9)
        np.testing.assert_allclose(back.world.object_poses[name][1], quat, rtol=0, atol=1e-9)
    assert back.world.sim_time_s == start.sim_time_s == 0.0


def test_no_spurious_event_burst_after_a_jump(robot):
    """Save with the arm at rest, sweep it through the event camera's view, jump back: the
    first steps after the jump see a still scene, so they must emit what the steps after the
    save emitted (nothing), not the difference between the moved and the restored frame."""
    robot.reset("pick_place_bowl", 1_000_000)
    for _ in range(4):
        robot.step()
    handle = robot.save_state()
    still = [len(robot.step().events) for _ in range(3)]
    robot.restore_state(handle)
    _sweep(robot, dq0=0.6, duration_s=0.6)
    moving = sum(len(robot.step().events) for _ in range(12))
    assert moving > 50  # the sweep is visible to the event camera
    robot.restore_state(handle)
    after_jump = [len(robot.step().events) for _ in range(3)]
    assert after_jump == still
    assert sum(after_jump) <= 5  # the still scene emits (next to) nothing


def test_bad_handles_are_refused_with_clear_errors(robot):
    robot.reset("pick_place_bowl", 1_000_000)
    with pytest.raises(KeyError, match="unknown state handle 987654: no snapshot was given this handle"):
        robot.restore_state(987654)
    with pytest.raises(KeyError, match="must be an int"):
        robot.restore_state("0")
    kept, dropped = robot.save_state(), robot.save_state()
    assert robot.state_handles == [kept, dropped]
    robot.discard_state(dropped)
    with pytest.raises(KeyError, match=f"state handle {dropped}: it was discarded"):
        robot.restore_state(dropped)
    with pytest.raises(KeyError, match="discarded"):
        robot.discard_state(dropped)
    robot.step()
    robot.reset("pick_place_bowl", 1_000_001)
    # A reset invalidates every snapshot: restoring one taken before it is refused.
    assert robot.state_handles == []
    with pytest.raises(KeyError, match=f"state handle {kept}: it was taken before the last reset"):
        robot.restore_state(kept)
    fresh = robot.save_state()
    assert fresh > dropped  # handles are never reused, so an old one can never alias a new state
    robot.restore_state(fresh)


def test_save_before_reset_is_refused():
    robot = PybulletRobot(SimConfig(sensors=SensorRig(enable_front_camera=False, enable_wrist_camera=False,
                                                      enable_lidar=False, enable_event_camera=False)))
    try:
        with pytest.raises(RuntimeError, match="before reset"):
            robot.save_state()
        with pytest.raises(KeyError, match="unknown state handle 0"):
            robot.restore_state(0)
    finally:
        robot.close()
