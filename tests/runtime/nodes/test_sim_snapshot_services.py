"""Simulator snapshots over DDS: sim_bridge's sim/save_state and sim/restore_state services,
driven through the harness's ROS environment (runtime/nodes/harness_ros_env.py) against a
real sim_bridge and safety node in their own processes.

The robot moves, the world is rolled back, and what arrives over the topics afterwards is
the old state again (stamps keep running forwards); bad handles, handles from before a
reset and more snapshots than `max_snapshots` are refused with clear reasons; on a real
robot (sim:=false) a rollback is a slow trajectory back to the recorded joint positions,
checked here with the simulator standing in for the robot's drivers.
"""
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.launcher import NodeAction, NodeProcessGroup

ROOT = Path(__file__).resolve().parents[3]
TASK, SEED = "pick_place_bowl", 1_000_000
# Only what the harness reads: joint states and ground truth (no cameras, LiDAR, events).
LIGHT_SIM = """physics_hz: 240
control_hz: 20
sensors:
  enable_front_camera: false
  enable_wrist_camera: false
  enable_lidar: false
  enable_event_camera: false
"""


def sim_nodes(tmp_path: Path, max_snapshots: int = 4) -> list[NodeAction]:
    config = tmp_path / "sim.yaml"
    config.write_text(LIGHT_SIM)
    sim = NodeAction(pkg="helmstack", executable="sim_bridge_node", name="sim_bridge", parameters=[{
        "config_file": str(config), "task_id": TASK, "seed": SEED, "real_time_factor": 4.0,
        "max_snapshots": max_snapshots}])
    safety = NodeAction(pkg="helmstack", executable="safety_node", name="safety", parameters=[{
        "config_file": str(ROOT / "launch/config/panda_safety.yaml"), "use_sim_time": True}])
    return [sim, safety]


def wait_until_commands_flow(env, node, group) -> None:
    """The whole command path is up: harness -> safety -> sim_bridge. DDS drops what a
    publisher sends before its subscriber is matched, and the test only sees the graph, not
    whether safety and sim_bridge matched each other: hold commands go out until the
    simulator reports one taken on (the env's execute waits for exactly that)."""
    from policies.base import ActionChunk

    wait_for(lambda: env._cmd.get_subscription_count() >= 1 and node.count_publishers("/robot/command") >= 1
             and node.count_subscribers("/robot/command") >= 1, group, what="command path")
    hold = ActionChunk(env.observe().joint_positions[None, :], np.array([0.1]))
    deadline = time.monotonic() + 30.0
    while not env.execute(hold).completed:
        assert time.monotonic() < deadline, "no command reached the simulator through the safety node in 30 s"


def wait_for(predicate, group, timeout_s=60.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        dead = group.poll()
        assert not dead, f"node(s) exited: {dead}"
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        time.sleep(0.1)


def sweep(env, q: np.ndarray, dq0: float, duration_s: float) -> None:
    """Turn the base joint by dq0 in chunks of 0.25 s, as a policy does: the safety node's
    watchdog holds the arm when no command came for 0.5 s, however long a trajectory is."""
    from policies.base import ActionChunk

    n = int(round(duration_s / 0.25))
    for k in range(n):
        start, end = q.copy(), q.copy()
        start[0] += dq0 * k / n
        end[0] += dq0 * (k + 1) / n
        times = np.array([0.125, 0.25])
        report = env.execute(ActionChunk(np.stack([(start + end) / 2, end]), times))
        assert report.completed


@pytest.fixture
def robot_env(ros_env, ros_node, tmp_path):
    """(env, group, ros_node, log dir): a simulator episode and the harness's env over it."""
    from rclpy.callback_groups import ReentrantCallbackGroup

    from runtime.nodes.harness_ros_env import RosHarnessEnv
    from sim.tasks.suite import get_task

    with NodeProcessGroup(sim_nodes(tmp_path), env=ros_env, log_dir=tmp_path / "logs") as group:
        env = RosHarnessEnv(ros_node, sim=True, callback_group=ReentrantCallbackGroup(), use_images=False,
                            stall_timeout_s=20.0)
        env.begin_episode(get_task(TASK), episode=None)
        wait_for(lambda: env._world_seq > 0 and env._joints, group, what="first world state")
        wait_until_commands_flow(env, ros_node, group)
        yield env, group, ros_node, tmp_path / "logs"
        env.close()


@pytest.mark.timeout(120)
def test_rollback_over_dds_returns_the_old_world(robot_env):
    from runtime.nodes.harness_ros_env import HarnessEnvError
    from helmstack_interfaces.srv import ResetTask

    env, group, node, logs = robot_env
    before = env.observe()
    handle = env.snapshot()
    assert isinstance(handle, int)
    sweep(env, before.joint_positions, 0.5, 1.0)
    moved = env.observe()
    assert moved.sim_time_s >= before.sim_time_s + 1.0
    assert moved.joint_positions[0] - before.joint_positions[0] > 0.4  # the arm really went

    env.restore(handle)
    after = env.observe()
    assert after.sim_time_s > moved.sim_time_s  # ROS time never runs backwards
    np.testing.assert_allclose(after.joint_positions, before.joint_positions, atol=2e-3)
    for name, (pos, _) in before.world.object_poses.items():
        np.testing.assert_allclose(after.world.object_poses[name][0], pos, atol=2e-3, err_msg=name)
    assert env.restores == 1

    # The same snapshot can be restored again after moving once more.
    sweep(env, after.joint_positions, -0.4, 1.0)
    assert env.observe().joint_positions[0] < before.joint_positions[0] - 0.3
    env.restore(handle)
    np.testing.assert_allclose(env.observe().joint_positions, before.joint_positions, atol=2e-3)

    with pytest.raises(HarnessEnvError, match="refused handle 4242: unknown state handle 4242"):
        env.restore(4242)
    with pytest.raises(HarnessEnvError, match="handle is an int"):
        env.restore("4242")

    # A reset invalidates every handle: restoring one from before it is refused.
    client = node.create_client(ResetTask, "/sim/reset_task")
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(ResetTask.Request(task_id=TASK, seed=SEED + 1))
    wait_for(future.done, group, what="reset")
    assert future.result().success
    with pytest.raises(HarnessEnvError, match="taken before the last reset"):
        env.restore(handle)
    assert group.poll() == []
    log = (logs / "sim_bridge.log").read_text()
    assert f"restored state {handle}" in log and "restore refused" in log


@pytest.mark.timeout(120)
def test_live_snapshots_are_bounded(robot_env):
    from runtime.nodes.harness_ros_env import HarnessEnvError

    env, group, _, logs = robot_env
    handles = [env.snapshot() for _ in range(6)]  # max_snapshots=4
    assert handles == sorted(set(handles))
    for oldest in handles[:2]:
        with pytest.raises(HarnessEnvError, match=f"state handle {oldest}: it was discarded"):
            env.restore(oldest)
    env.restore(handles[2])
    env.restore(handles[-1])
    wait_for(lambda: "discarded the oldest" in (logs / "sim_bridge.log").read_text(), group, 10, "warning")


@pytest.mark.timeout(120)
def test_real_robot_rollback_drives_back_to_the_recorded_pose(ros_env, ros_node, tmp_path):
    """sim:=false: no simulator services; the snapshot is the measured joint positions and a
    restore is a slow trajectory back through the safety node. The simulator only stands
    in for the robot's drivers (same topics)."""
    from rclpy.callback_groups import ReentrantCallbackGroup

    from runtime.nodes.harness_ros_env import HarnessEnvError, RobotPose, RosHarnessEnv
    from sim.tasks.suite import get_task

    with NodeProcessGroup(sim_nodes(tmp_path), env=ros_env, log_dir=tmp_path / "logs") as group:
        env = RosHarnessEnv(ros_node, sim=False, callback_group=ReentrantCallbackGroup(), use_images=False,
                            stall_timeout_s=20.0, restore_speed_rad_s=0.5)
        try:
            env.begin_episode(get_task(TASK), episode=None)
            wait_for(lambda: env._world_seq > 0 and env._joints, group, what="first world state")
            wait_until_commands_flow(env, ros_node, group)
            pose = env.snapshot()
            assert isinstance(pose, RobotPose)
            sweep(env, pose.joint_positions, 0.6, 1.0)
            assert env.observe().joint_positions[0] - pose.joint_positions[0] > 0.4
            started = env.observe().sim_time_s
            env.restore(pose)
            back = env.observe()
            np.testing.assert_allclose(back.joint_positions[:7], pose.joint_positions[:7], atol=0.02)
            assert back.sim_time_s - started >= 0.6 / 0.5 - 0.1  # slow: no faster than restore_speed_rad_s
            with pytest.raises(HarnessEnvError, match="a snapshot is a RobotPose"):
                env.restore(3)
            assert group.poll() == []
        finally:
            env.close()


@pytest.mark.timeout(60)
def test_bad_max_snapshots_refuses_to_start(ros_env, helmstack_interfaces, tmp_path):
    nodes = sim_nodes(tmp_path, max_snapshots=0)[:1]
    with NodeProcessGroup(nodes, env=ros_env, log_dir=tmp_path / "logs") as group:
        deadline = time.monotonic() + 45
        while not group.poll():
            assert time.monotonic() < deadline, "sim_bridge kept running with max_snapshots=0"
            time.sleep(0.1)
        assert group.poll() == [("sim_bridge", 2)]
    assert "max_snapshots must be an integer >= 1, got 0" in (tmp_path / "logs/sim_bridge.log").read_text()
