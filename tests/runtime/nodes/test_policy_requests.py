"""The policy node answering the HELM harness's requests, as a real process over DDS.

A subgoal message with an `attempt` asks for exactly one chunk: the node answers each
request once (no streaming), no earlier than the state the harness observed, with the
policy's own chunk for attempt 0 and a different, resampled one for a later attempt;
malformed requests are dropped with a warning and the node keeps serving.
"""
import json
import threading
import time

import numpy as np
import pytest

from runtime.launcher import NodeAction, NodeProcessGroup

TASK, SEED = "pick_place_bowl", 1_000_000


@pytest.mark.timeout(120)
def test_one_proposal_per_request_and_bad_requests_are_dropped(ros_env, ros_node, tmp_path):
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import JointState
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
    ros_node.create_subscription(JointTrajectory, "/policy/proposed_action", proposals.append, 50)
    clock_pub = ros_node.create_publisher(Clock, "/clock", 10)
    js_pub = ros_node.create_publisher(JointState, "/joint_states", 10)
    gt_pub = ros_node.create_publisher(WorldState, "/sim/ground_truth", 10)
    sub_pub = ros_node.create_publisher(String, "/harness/subgoal", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    now = {"t": 0.0}
    stop = threading.Event()

    def feed():  # the simulator's ticks, 20 Hz of sim time
        while not stop.is_set():
            now["t"] += 0.05
            t = now["t"]
            clock_pub.publish(Clock(clock=mc.stamp(t)))
            js_pub.publish(mc.joint_state_msg(JOINT_NAMES, q, np.zeros(9), np.zeros(9), t))
            gt_pub.publish(mc.world_state_msg(world.object_poses, world.fixture_joints, t))
            time.sleep(0.02)

    def request(**fields):
        body = {"task_id": TASK, "index": 0, "name": "pick up the red cube", "attempt": 0, "request": 1,
                "episode": 1, "seed": 7, "rollbacks": 0, "stamp": now["t"]}
        body.update(fields)
        sub_pub.publish(String(data=json.dumps(body)))
        return body

    def wait_count(n, timeout_s=20.0):
        deadline = time.monotonic() + timeout_s
        while len(proposals) < n:
            assert time.monotonic() < deadline, (tmp_path / "policy.log").read_text()[-2000:]
            time.sleep(0.05)

    node = NodeAction(pkg="helmstack", executable="policy_node", name="policy", parameters=[{"use_sim_time": True}])
    with NodeProcessGroup([node], env=ros_env, log_dir=tmp_path) as group:
        deadline = time.monotonic() + 60
        while sub_pub.get_subscription_count() == 0 or gt_pub.get_subscription_count() == 0:
            assert time.monotonic() < deadline and not group.poll(), group.poll()
            time.sleep(0.1)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            time.sleep(1.0)  # the node has seen the clock and the world
            first = request()
            wait_count(1)
            time.sleep(1.0)  # the clock runs on: a streaming node would propose again and again
            assert len(proposals) == 1
            answer = proposals[0]
            assert mc.to_seconds(answer.header.stamp) >= first["stamp"] - 1e-6  # stamps are whole nanoseconds
            chunk0 = np.array([p.positions for p in answer.points])

            # Attempt 1 of the same subgoal: one more answer, a resampled (different) chunk.
            request(attempt=1, request=2, stamp=now["t"])
            wait_count(2)
            chunk1 = np.array([p.positions for p in proposals[1].points])
            assert chunk1.shape == chunk0.shape and not np.allclose(chunk1[:, :7], chunk0[:, :7])

            # A request stamped ahead of the world is answered only once the world catches up.
            ahead = now["t"] + 1.0
            request(request=3, stamp=ahead)
            wait_count(3)
            assert mc.to_seconds(proposals[2].header.stamp) >= ahead - 1e-6

            # Malformed requests: dropped with a warning, no answer, the node keeps serving.
            # The topic is latched with depth 1, so DDS may replace a request the node has not
            # received yet by the next one: each goes out (again, if need be) until its warning
            # is in the node's log.
            for bad, warning in (({"attempt": "one"}, "request field 'attempt' must be an integer, got 'one'"),
                                 ({"attempt": -1}, "attempt and rollbacks must be >= 0"),
                                 ({"stamp": "now"}, "request field 'stamp' must be a finite number"),
                                 ({"index": 7}, "has 3 subgoals, no index 7"),
                                 ({"request": None}, "request field 'request' must be an integer, got None")):
                deadline = time.monotonic() + 20.0
                while warning not in (tmp_path / "policy.log").read_text():
                    assert time.monotonic() < deadline, f"no warning {warning!r} in the policy node's log"
                    request(**bad)
                    time.sleep(0.5)
            time.sleep(0.5)
            assert len(proposals) == 3
            request(request=9, stamp=now["t"])
            wait_count(4)
            assert proposals[3].header.frame_id == "request 9"
            # Sent again while the harness waits (its answer may have been lost): the same
            # answer again, not a new chunk.
            request(request=9, stamp=now["t"])
            wait_count(5)
            time.sleep(0.5)
            assert len(proposals) == 5 and group.poll() == []
            assert proposals[4].header == proposals[3].header and proposals[4].points == proposals[3].points
        finally:
            stop.set()
            feeder.join()
