"""The policy node as a real process: malformed images are dropped with a warning and the
node keeps working — it still proposes actions from valid inputs afterwards."""
import json
import threading
import time

import numpy as np
import pytest

from runtime.launcher import NodeAction, NodeProcessGroup

TASK, SEED = "tray_then_close_drawer", 1_000_000


@pytest.mark.timeout(120)
def test_bad_images_are_dropped_and_node_keeps_running(ros_env, ros_node, tmp_path):
    from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from helmstack_interfaces.msg import WorldState
    from runtime.nodes import msg_convert as mc
    from sim.panda import JOINT_NAMES
    from sim.scene import TabletopScene
    from sim.tasks.suite import get_task

    scene = TabletopScene()
    world = scene.reset(get_task(TASK), SEED)
    q = world.joint_positions
    scene.close()

    proposals = []
    ros_node.create_subscription(JointTrajectory, "/policy/proposed_action", proposals.append, 10)
    image_pub = ros_node.create_publisher(Image, "/camera/front/image_raw", qos_profile_sensor_data)
    clock_pub = ros_node.create_publisher(Clock, "/clock", 10)
    js_pub = ros_node.create_publisher(JointState, "/joint_states", 10)
    gt_pub = ros_node.create_publisher(WorldState, "/sim/ground_truth", 10)
    sub_pub = ros_node.create_publisher(String, "/harness/subgoal", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))

    node = NodeAction(pkg="helmstack", executable="policy_node", name="policy", parameters=[{"use_sim_time": True}])
    with NodeProcessGroup([node], env=ros_env, log_dir=tmp_path) as group:
        deadline = time.monotonic() + 60
        while image_pub.get_subscription_count() == 0 or sub_pub.get_subscription_count() == 0:
            assert time.monotonic() < deadline and not group.poll(), group.poll()
            time.sleep(0.1)
        bad_encoding = mc.image_msg(np.zeros((128, 128, 3), np.uint8), "rgb8", 0.0, "cam")
        bad_encoding.encoding = "bgr16"
        wrong_size = mc.image_msg(np.zeros((32, 48, 3), np.uint8), "rgb8", 0.0, "cam")
        truncated = mc.image_msg(np.zeros((128, 128, 3), np.uint8), "rgb8", 0.0, "cam")
        truncated.data = truncated.data[:100]
        for msg in (bad_encoding, wrong_size, truncated) * 3:  # best effort: repeat, any may be the first seen
            image_pub.publish(msg)
            time.sleep(0.1)

        # Valid inputs after the bad ones: the node must still act on them.
        sub_pub.publish(String(data=json.dumps({"task_id": TASK, "index": 0, "name": "x"})))
        stop = threading.Event()

        def feed():
            t = 0.0
            while not stop.is_set():
                t += 0.05
                clock_pub.publish(Clock(clock=mc.stamp(t)))
                js_pub.publish(mc.joint_state_msg(JOINT_NAMES, q, np.zeros(9), np.zeros(9), t))
                gt_pub.publish(mc.world_state_msg(world.object_poses, world.fixture_joints, t))
                image_pub.publish(mc.image_msg(np.zeros((128, 128, 3), np.uint8), "rgb8", t, "cam"))
                time.sleep(0.05)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = time.monotonic() + 30
        while not proposals:
            assert time.monotonic() < deadline, (tmp_path / "policy.log").read_text()[-2000:]
            time.sleep(0.1)
        stop.set()
        feeder.join()
        assert group.poll() == []
    log = (tmp_path / "policy.log").read_text()
    # Warnings are throttled (a broken camera would flood the log): the first one is there.
    assert "dropped image: image encoding 'bgr16'" in log or "dropped image: image size 32x48" in log or \
        "dropped image: image data length" in log
    chunk = proposals[-1]
    assert list(chunk.joint_names) == list(JOINT_NAMES) and len(chunk.points) >= 1
    assert all(np.all(np.isfinite(p.positions)) for p in chunk.points)
