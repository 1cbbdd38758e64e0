"""The harness's request/answer exchange with the policy node (RosChunkProposer): a request
that DDS replaced before the policy node got it is sent again, and the answer to it is
taken; no answer at all ends in a clear error."""
import json
import threading
import time

import numpy as np
import pytest

from policies.base import Observation
from sim.tasks.suite import get_task

TASK = get_task("pick_place_bowl")


class EnvStub:
    """What the proposer reads of RosHarnessEnv."""

    def __init__(self):
        self.task, self.subgoal_index, self.restores, self.aborted = TASK, 0, 0, ""

    def require_task(self):
        return self.task

    def set_subgoal(self, subgoal, index):
        self.subgoal_index = index


def observation(t_s: float = 1.0) -> Observation:
    return Observation(np.zeros(9), t_s, TASK, 0, None)


@pytest.mark.timeout(60)
def test_a_lost_request_is_sent_again_and_answered(ros_node):
    from trajectory_msgs.msg import JointTrajectory

    from runtime.nodes import msg_convert as mc
    from runtime.nodes.harness_ros_env import RosChunkProposer
    from sim.panda import JOINT_NAMES

    answers = ros_node.create_publisher(JointTrajectory, "policy/proposed_action", 10)
    sent = []

    def answer(value: float, request: int):
        msg = mc.trajectory_msg(JOINT_NAMES, np.full((2, 9), value), np.array([0.1, 0.2]), sent[-1]["stamp"])
        msg.header.frame_id = f"request {request}"
        answers.publish(msg)

    def publish_subgoal(msg):  # the policy node: never sees the first copy, answers the second
        sent.append(json.loads(msg.data))
        if len(sent) == 2:
            answer(0.7, 99)  # an answer to another request is not taken
            threading.Timer(0.05, lambda: answer(0.1, sent[-1]["request"])).start()

    proposer = RosChunkProposer(ros_node, EnvStub(), publish_subgoal, proposal_timeout_s=10.0, resend_after_s=0.3)
    deadline = time.monotonic() + 10.0
    while answers.get_subscription_count() == 0:  # the proposer's subscription is matched
        assert time.monotonic() < deadline
        time.sleep(0.05)
    chunk = proposer.propose(observation(), TASK.subgoals[0], 1)
    assert np.allclose(chunk.positions, 0.1) and proposer.resends >= 1
    assert sent[0] == sent[1] and sent[0]["attempt"] == 1  # the same request, not a new one


@pytest.mark.timeout(60)
def test_no_answer_within_the_timeout_is_an_error(ros_node):
    from runtime.nodes.harness_ros_env import HarnessEnvError, RosChunkProposer

    sent = []
    proposer = RosChunkProposer(ros_node, EnvStub(), sent.append, proposal_timeout_s=0.8, resend_after_s=0.3)
    with pytest.raises(HarnessEnvError, match="no proposal from the policy node for request 1"):
        proposer.propose(observation(), TASK.subgoals[0], 0)
    assert len(sent) >= 2 and proposer.resends == len(sent) - 1
    with pytest.raises(ValueError, match="resend_after_s must be a finite number > 0"):
        RosChunkProposer(ros_node, EnvStub(), sent.append, resend_after_s=0.0)
