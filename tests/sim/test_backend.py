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
