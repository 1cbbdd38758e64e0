"""sim:=false with the example Franka configuration: the graph talks to a robot's own
topics. A test double stands in for the robot's drivers (joint_state_broadcaster and two
joint trajectory controllers); the launch file's remaps and the robot parameters must
route safe commands onto those topics, split into arm and fingers."""
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.launcher import NodeProcessGroup, load_launch_file

ROOT = Path(__file__).resolve().parents[2]
ARM_TOPIC = "/joint_trajectory_controller/joint_trajectory"
FINGER_TOPIC = "/finger_trajectory_controller/joint_trajectory"
NAMES = [f"panda_joint{i}" for i in range(1, 8)] + ["panda_finger_joint1", "panda_finger_joint2"]
HOME = [0.0, -0.5, 0.0, -2.0, 0.0, 1.5, 0.8, 0.03, 0.03]


@pytest.mark.timeout(120)
def test_real_mode_routes_commands_to_the_robot_controllers(ros_env, ros_node, tmp_path):
    from builtin_interfaces.msg import Duration
    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    plan = load_launch_file(ROOT / "launch/helmstack.launch.yaml", {
        "sim": "false",
        "robot_params": str(ROOT / "launch/config/robots/franka_panda.yaml"),
        "command_topic": ARM_TOPIC,
        "gripper_command_topic": FINGER_TOPIC,
        "joint_states_topic": "/franka/joint_states",
    })
    assert "sim_bridge" not in [n.name for n in plan.nodes]
    got = {ARM_TOPIC: [], FINGER_TOPIC: []}
    for topic in got:
        ros_node.create_subscription(JointTrajectory, topic, got[topic].append, 10)
    joint_states = ros_node.create_publisher(JointState, "/franka/joint_states", 10)
    raw = ros_node.create_publisher(JointTrajectory, "/robot/command_raw", 10)
    stop = threading.Event()

    def driver():  # the robot's joint_state_broadcaster
        while not stop.is_set():
            joint_states.publish(JointState(name=NAMES, position=HOME))
            time.sleep(0.05)

    threading.Thread(target=driver, daemon=True).start()
    with NodeProcessGroup(plan.nodes, env=ros_env, log_dir=tmp_path) as group:
        deadline = time.monotonic() + 60
        while raw.get_subscription_count() == 0 or ros_node.count_publishers(FINGER_TOPIC) == 0:
            assert time.monotonic() < deadline and not group.poll(), group.poll()
            time.sleep(0.1)
        time.sleep(0.5)
        target = np.array(HOME) + [0.02, 0, 0, 0, 0, 0, 0, -0.01, -0.01]
        msg = JointTrajectory(joint_names=NAMES,
                              points=[JointTrajectoryPoint(positions=target.tolist(), time_from_start=Duration(sec=1))])
        raw.publish(msg)
        while not (got[ARM_TOPIC] and got[FINGER_TOPIC]):
            assert time.monotonic() < deadline, {k: len(v) for k, v in got.items()}
            time.sleep(0.05)
        stop.set()
        assert group.poll() == []
    arm, fingers = got[ARM_TOPIC][0], got[FINGER_TOPIC][0]
    assert list(arm.joint_names) == NAMES[:7] and list(fingers.joint_names) == NAMES[7:]
    np.testing.assert_allclose(arm.points[0].positions, target[:7], atol=1e-9)
    np.testing.assert_allclose(fingers.points[0].positions, target[7:], atol=1e-9)
