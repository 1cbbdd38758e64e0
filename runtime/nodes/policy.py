"""policy: runs the configured manipulation policy and proposes action chunks.

Reads joint_states, the front camera, the current subgoal (`harness/subgoal`, a JSON
std_msgs/String: {"task_id", "index", "name"}; index -1 = idle) and, for privileged
policies in simulation, `sim/ground_truth`. Publishes `policy/proposed_action`
(trajectory_msgs/JointTrajectory, the action chunk) once per control period. Stale or
malformed inputs are dropped with a warning; no fresh input, no proposal.

Action chunking: the policy is queried when its previous chunk has played out (or the
subgoal changed), as chunked policies are trained to run; the chunk goes out whole, as
one trajectory, and the robot side interpolates it.

Requests (the HELM harness, `harness` mode `helm`): a subgoal message that carries an
``attempt`` is a request for exactly one chunk, not a subgoal to stream for. It also
carries ``request`` (its sequence number), ``episode``, ``seed``, ``rollbacks`` and
``stamp`` (the harness's observation time, s). The node computes one answer per request,
as soon as its inputs are at least as new as ``stamp``, with ``header.frame_id`` naming the
request ("request N"); a request number it has seen again (the harness re-sends while it
waits) gets that same answer again, so a lost answer is not fatal. Chunks come from
`policies.proposer.PolicyProposer`: attempt 0 is the policy's own chunk, attempt k > 0 a
resampled one. A new ``episode`` resets the proposer (seeded with ``seed``); a new
``rollbacks`` count resets the policy's history (the world went back in time, though ROS
time did not). Without ``attempt`` the node streams as described above (the `pass_through`
harness).
"""
from __future__ import annotations

import json

import numpy as np
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from helmstack_interfaces.msg import WorldState as WorldStateMsg
from policies.base import Observation
from policies.proposer import PolicyProposer
from policies.registry import make_policy
from runtime.nodes import msg_convert as mc
from runtime.nodes.common import autostart, declare_number, run_node
from sim.panda import JOINT_NAMES, PandaKinematics
from sim.tasks.suite import UnknownTaskError, get_task

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
STALE_AFTER_S = 0.5  # sim seconds; older observations are not acted on


class PolicyNode(LifecycleNode):
    def __init__(self) -> None:
        super().__init__("policy")
        self.declare_parameter("policy", "scripted_expert")
        declare_number(self, "control_hz", 20.0)
        self.declare_parameter("image_size", [128, 128])
        self.declare_parameter("autostart", True)
        self.policy = None
        self.proposer: PolicyProposer | None = None
        self._kin: PandaKinematics | None = None  # FK for the world state of privileged policies
        self.setup_error = ""
        self._request: dict | None = None  # a harness request not answered yet
        self._helm_episode: int | None = None
        self._helm_rollbacks = 0
        self._last_request: tuple[int, int] | None = None  # (episode, request) of the last harness request taken
        self._last_answer: JointTrajectory | None = None  # its answer, sent again for a repeated request
        self.answered_requests = 0
        self._q: np.ndarray | None = None
        self._world: tuple | None = None
        self._image: np.ndarray | None = None
        self._subgoal: dict | None = None
        self._task = None
        self.dropped_images = 0
        self._active = False
        self._next_query_s = 0.0  # sim time at which the current chunk has played out
        if self.get_parameter("autostart").value:
            autostart(self, "configure failed")

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        name = self.get_parameter("policy").value
        try:
            self.policy = make_policy(name, float(self.get_parameter("control_hz").value))
        except ValueError as exc:
            self.setup_error = str(exc)
            self.get_logger().error(self.setup_error)
            return TransitionCallbackReturn.FAILURE
        self.proposer = PolicyProposer(self.policy)
        self._pub = self.create_publisher(JointTrajectory, "policy/proposed_action", 10)
        self.create_subscription(JointState, "joint_states", self._on_joint_states, 10)
        self.create_subscription(String, "harness/subgoal", self._on_subgoal, LATCHED)
        self.create_subscription(Image, "camera/front/image_raw", self._on_image, qos_profile_sensor_data)
        if self.policy.requires_privileged_state:
            self._kin = PandaKinematics()
            self.create_subscription(WorldStateMsg, "sim/ground_truth", self._on_world, 10)
        self.create_timer(1.0 / float(self.get_parameter("control_hz").value), self._tick)
        self.get_logger().info(f"policy '{name}' loaded")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self._active = True
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._active = False
        return super().on_deactivate(state)

    # -- inputs ------------------------------------------------------------------------
    def _on_joint_states(self, msg: JointState) -> None:
        try:
            self._q = mc.joint_positions_from_msg(msg, JOINT_NAMES)
        except mc.MessageError as exc:
            self.get_logger().warning(f"dropped joint_states: {exc}", throttle_duration_sec=2.0)
            return
        if self._request is not None:
            self._answer_request()

    def _on_world(self, msg: WorldStateMsg) -> None:
        try:
            self._world = mc.world_state_from_msg(msg)
        except mc.MessageError as exc:
            self.get_logger().warning(f"dropped ground truth: {exc}", throttle_duration_sec=2.0)
            return
        if self._request is not None:
            self._answer_request()

    def _on_image(self, msg: Image) -> None:
        try:
            self._image = mc.image_from_msg(msg, "rgb8", tuple(self.get_parameter("image_size").value))
        except mc.MessageError as exc:
            self.dropped_images += 1
            self.get_logger().warning(f"dropped image: {exc}", throttle_duration_sec=2.0)

    def _on_subgoal(self, msg: String) -> None:
        try:
            sub = json.loads(msg.data)
            index = int(sub["index"])
            task = get_task(sub["task_id"]) if index >= 0 else None
            if task is not None and not index < len(task.subgoals):
                raise ValueError(f"task {task.task_id!r} has {len(task.subgoals)} subgoals, no index {index}")
            request = _parse_request(sub) if task is not None and "attempt" in sub else None
        except (ValueError, KeyError, TypeError, UnknownTaskError) as exc:
            self.get_logger().warning(f"dropped subgoal {msg.data!r}: {exc}")
            return
        if request is not None:
            self._on_request(request, task)
            return
        self._request = None
        if task is not None and (self._task is None or self._task.task_id != task.task_id or index == 0):
            self.policy.reset()
        self._subgoal, self._task = (sub, task) if index >= 0 else (None, None)
        self._next_query_s = 0.0  # a new subgoal is acted on at once

    def _on_request(self, request: dict, task) -> None:
        """A harness request for one chunk (module docstring): reset what must be reset,
        then answer as soon as the inputs are fresh enough. A request number seen before (the
        harness sends a request again while it waits) is not computed twice: its answer, once
        there is one, goes out again (the first may have been lost)."""
        key = (request["episode"], request["request"])
        if key == self._last_request:
            if self._last_answer is not None:
                self._pub.publish(self._last_answer)
            return
        self._last_request, self._last_answer = key, None
        if request["episode"] != self._helm_episode:
            self.proposer.reset(seed=request["seed"])
            self._helm_episode, self._helm_rollbacks = request["episode"], request["rollbacks"]
        elif request["rollbacks"] != self._helm_rollbacks:
            self.proposer.reset()  # keeps the seed: a rerun proposes the same chunks
            self._helm_rollbacks = request["rollbacks"]
        self._subgoal, self._task = None, task  # no streaming while the harness asks
        self._request = request
        self._answer_request()

    def _answer_request(self) -> None:
        request = self._request
        if not self._active or request is None or self._q is None:
            return
        now = self.get_clock().now().nanoseconds * 1e-9
        world, t_obs = None, now
        if self.policy.requires_privileged_state:
            if self._world is None or self._world[2] < request["stamp"] - 1e-9:
                return  # wait for the state the harness observed (or a newer one)
            poses, joints, t_obs = self._world
            world = mc.world_state_from_parts(poses, joints, self._q, t_obs, self._kin)
        self._request = None  # one answer per request, whatever happens below
        obs = Observation(self._q, t_obs, self._task, request["index"], world,
                          {"front": self._image} if self._image is not None else {})
        subgoal = self._task.subgoals[request["index"]]
        try:
            chunk = self.proposer.propose(obs, subgoal, request["attempt"])
        except (ValueError, RuntimeError) as exc:  # e.g. IK failure: no answer, the harness times out and holds
            self.get_logger().error(f"policy failed on request {request['request']}: {exc}")
            return
        if not np.all(np.isfinite(chunk.positions)):
            self.get_logger().error(f"policy produced non-finite actions for request {request['request']}: not published")
            return
        stamp = max(now, t_obs, request["stamp"])  # never earlier than what it answers
        answer = mc.trajectory_msg(JOINT_NAMES, chunk.positions, chunk.times_s, stamp)
        answer.header.frame_id = f"request {request['request']}"  # which request it answers
        self._last_answer = answer
        self._pub.publish(answer)
        self.answered_requests += 1

    # -- acting ------------------------------------------------------------------------
    def _tick(self) -> None:
        if self._request is not None:
            self._answer_request()
        if not self._active or self._subgoal is None or self._q is None:
            return
        now = self.get_clock().now().nanoseconds * 1e-9
        if now + 1e-6 < self._next_query_s:
            return
        world = None
        if self.policy.requires_privileged_state:
            if self._world is None:
                return
            poses, joints, t_world = self._world
            if now - t_world > STALE_AFTER_S:
                self.get_logger().warning(f"ground truth is {now - t_world:.2f} s old: not acting", throttle_duration_sec=2.0)
                return
            world = mc.world_state_from_parts(poses, joints, self._q, t_world, self._kin)
        obs = Observation(self._q, now, self._task, int(self._subgoal["index"]), world,
                          {"front": self._image} if self._image is not None else {})
        try:
            chunk = self.policy.select_action(obs)
        except (ValueError, RuntimeError) as exc:  # e.g. IK failure: propose nothing, the watchdog holds
            self.get_logger().error(f"policy failed: {exc}", throttle_duration_sec=2.0)
            return
        if not np.all(np.isfinite(chunk.positions)):
            self.get_logger().error("policy produced non-finite actions: not published")
            return
        self._pub.publish(mc.trajectory_msg(JOINT_NAMES, chunk.positions, chunk.times_s, now))
        self._next_query_s = now + float(chunk.times_s[-1])


def _parse_request(sub: dict) -> dict:
    """The request fields of a subgoal message; ValueError/KeyError/TypeError when malformed."""
    request = {"index": int(sub["index"])}
    for key in ("attempt", "request", "episode", "seed", "rollbacks"):
        value = sub[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"request field {key!r} must be an integer, got {value!r}")
        request[key] = value
    if request["attempt"] < 0 or request["rollbacks"] < 0:
        raise ValueError(f"attempt and rollbacks must be >= 0, got {request['attempt']} and {request['rollbacks']}")
    stamp = sub["stamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not np.isfinite(stamp):
        raise ValueError(f"request field 'stamp' must be a finite number of seconds, got {stamp!r}")
    request["stamp"] = float(stamp)
    return request


def main() -> int:
    return run_node(PolicyNode)


if __name__ == "__main__":
    raise SystemExit(main())
