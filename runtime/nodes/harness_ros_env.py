"""The HELM harness controller's collaborators over ROS: the robot (`RosHarnessEnv`) and
the policy node (`RosChunkProposer`).

The controller (runtime/harness_controller.py) is a core: it drives a `HarnessEnv` and a
`ChunkProposer` and never sees a message. These two classes are those protocols spoken
over the graph's topics (DESIGN.md, "The node graph"), so the harness node runs the same
controller that benchmarks run in-process over `sim.harness_env.SceneHarnessEnv`.

RosHarnessEnv
  observe        the latest joint_states + sim/ground_truth (+ the front camera image) as a
                 `policies.base.Observation`, stamped with the world state's time.
  execute        publishes the chunk on `robot/command_raw` (the safety node checks it) and
                 waits, in simulation time, until the chunk's duration has passed or the
                 current subgoal's predicate holds; a world that stops arriving for
                 `stall_timeout_s` wall seconds raises (the controller then holds). The
                 duration counts from the first world state whose `command_stamp` is the
                 chunk's own stamp (every command gets a new one): delivery through the
                 safety node takes a variable while, and timing from the send would end a
                 chunk before it had run, or before it had even arrived. A chunk the robot
                 does not take on within `command_ack_timeout_s` (rejected by the safety
                 node) is reported cut short. World states that never carry a command stamp
                 (a source that does not track commands) are timed from the send.
                 When a commanded row opens or closes the gripper (runtime.helm_memory.
                 GripperEvents), `on_gripper_event(observation, "open" | "close")` is called
                 once the world has reached that row's time: keyframes for episodic memory.
  subgoal_done   the subgoal's predicate on the latest world state.
  snapshot /     sim (`sim:=true`): the sim_bridge services `sim/save_state` and
  restore        `sim/restore_state`; a restore returns once the restored state has arrived.
                 Real robot (`sim:=false`): a snapshot is the measured joint positions and a
                 restore drives the arm back to them with a slow joint trajectory (at most
                 `restore_speed_rad_s` per joint) and checks it got there. The trajectory
                 goes out in short consecutive segments: the safety node's watchdog holds
                 the arm when no command came within its timeout (0.5 s for the Panda),
                 however long the last trajectory was. Objects are not put back on a robot:
                 the controller re-plans from what is observed there.
  hold           a hold trajectory: the arm at its measured position, the fingers at their
                 last commanded targets (holding the fingers at their *measured* width would
                 relax the squeeze on a grasped object, and drop it).

RosChunkProposer
  Each `propose(observation, subgoal, attempt)` is one request: the subgoal JSON on the
  latched `harness/subgoal` topic with the pass-through fields (task_id, index, name) plus
  ``attempt``, ``request`` (a sequence number), ``episode``, ``seed``, ``rollbacks`` (how
  many restores so far: the policy forgets its history when it changes) and ``stamp`` (the
  observation's time, s). The policy node answers every request once, on
  `policy/proposed_action`, with a chunk stamped no earlier than ``stamp``; the proposer
  takes the first such chunk that arrives after the request, and raises when none comes
  within `proposal_timeout_s` wall seconds. The topic keeps one message (latched), so DDS
  may replace a request the policy node has not received yet: without an answer the same
  request goes out again every `resend_after_s`; the policy node computes one answer per
  request number (sent again for a repeated request) and names the request in the answer's
  `header.frame_id`, which the proposer checks.

Subgoals are the task's own `SubgoalSpec`s; after a re-plan they are matched back to the
task's subgoal list by predicate (the policy acts on a task subgoal index). Waiting is
interruptible: `abort()` (goal canceled, node closing) makes the waits raise.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from helmstack_interfaces.msg import WorldState as WorldStateMsg
from helmstack_interfaces.srv import RestoreState, SaveState
from policies.base import ActionChunk, Observation
from runtime.harness_controller import ExecutionReport
from runtime.helm_memory import GripperEvents
from runtime.nodes import msg_convert as mc
from sim.panda import JOINT_NAMES, N_ARM_JOINTS, PandaKinematics
from sim.tasks.predicates import evaluate, parse_predicate
from sim.tasks.spec import SubgoalSpec, TaskSpec
from sim.world_state import WorldState

logger = logging.getLogger(__name__)

HOLD_TIME_S = 0.1  # the hold point's time_from_start (as the safety node's own hold)
RESTORE_SEGMENT_S = 0.25  # real-robot restore: one command per segment, well inside the safety watchdog's timeout
RESTORE_TOLERANCE_RAD = 0.02  # real-robot restore: arm joints within this of the recorded pose
RESTORE_SETTLE_S = 1.0  # real-robot restore: time after the last segment to get within tolerance


class HarnessEnvError(RuntimeError):
    """The robot side cannot do what the controller asked (no world state, a service
    refused, the goal was canceled); the controller turns it into HOLD with this text."""


@dataclass(frozen=True)
class RobotPose:
    """A real-robot snapshot: the joint positions (JOINT_NAMES order) to drive back to."""

    joint_positions: np.ndarray
    stamp_s: float


@dataclass(frozen=True)
class _World:
    stamp_s: float
    seq: int
    state: WorldState
    command_ns: int = 0  # the stamp of the last command the robot took on (0: none reported)


class RosHarnessEnv:
    """`runtime.harness_controller.HarnessEnv` over the robot's topics (module docstring).

    `node` owns the subscriptions, publisher and service clients; give them a reentrant
    `callback_group` when the controller runs inside one of the node's callbacks.
    """

    def __init__(
        self,
        node: Node,
        *,
        sim: bool = True,
        callback_group=None,
        stall_timeout_s: float = 5.0,
        service_timeout_s: float = 10.0,
        restore_speed_rad_s: float = 0.3,
        command_ack_timeout_s: float = 2.0,
        use_images: bool = True,
        image_size: tuple[int, int] = (128, 128),
    ) -> None:
        for name, value in (("stall_timeout_s", stall_timeout_s), ("service_timeout_s", service_timeout_s),
                            ("restore_speed_rad_s", restore_speed_rad_s), ("command_ack_timeout_s", command_ack_timeout_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"RosHarnessEnv.{name} must be a finite number > 0, got {value!r}")
        self.node = node
        self.sim = bool(sim)
        self.stall_timeout_s = float(stall_timeout_s)
        self.service_timeout_s = float(service_timeout_s)
        self.restore_speed_rad_s = float(restore_speed_rad_s)
        self.command_ack_timeout_s = float(command_ack_timeout_s)
        self.image_size = tuple(image_size)
        self._kin = PandaKinematics()
        self._cond = threading.Condition()
        self._joints: deque[tuple[int, np.ndarray]] = deque(maxlen=16)  # (stamp ns, q), oldest first
        # poses, fixture joints, t_s, episode, command stamp (ns; 0: none)
        self._world_raw: tuple[dict, dict, float, int, int] | None = None
        self._acks_commands = self.sim  # the simulator echoes command stamps; other sources once seen
        self._last_stamp_ns = 0
        self._world_seq = 0
        self._world: _World | None = None
        self._image: np.ndarray | None = None
        self._episode: int | None = None
        self._aborted = ""
        self.task: TaskSpec | None = None
        self.subgoal: SubgoalSpec | None = None
        self.subgoal_index = 0
        self.restores = 0
        self._last_command: np.ndarray | None = None
        self._gripper = GripperEvents()
        self.on_gripper_event: Callable[[Observation, str], None] | None = None
        self._cmd = node.create_publisher(JointTrajectory, "robot/command_raw", 10)
        node.create_subscription(JointState, "joint_states", self._on_joint_states, 10, callback_group=callback_group)
        node.create_subscription(WorldStateMsg, "sim/ground_truth", self._on_world, 10, callback_group=callback_group)
        if use_images:
            node.create_subscription(Image, "camera/front/image_raw", self._on_image, qos_profile_sensor_data,
                                     callback_group=callback_group)
        self._save = node.create_client(SaveState, "sim/save_state", callback_group=callback_group) if self.sim else None
        self._restore = node.create_client(RestoreState, "sim/restore_state", callback_group=callback_group) if self.sim else None

    # -- episode bookkeeping -------------------------------------------------------------
    def begin_episode(self, task: TaskSpec, episode: int | None) -> None:
        """A new goal: `task`'s world, only ground truth of simulator `episode` (None: any)."""
        with self._cond:
            self.task = task
            self._episode = episode
            self._aborted = ""
            self.subgoal, self.subgoal_index = None, 0
            self.restores = 0
            self._last_command = None
            self._world = None
            self._gripper.reset()
            self._cond.notify_all()

    def set_subgoal(self, subgoal: SubgoalSpec, index: int) -> None:
        """The subgoal being worked on (the proposer says, as in sim.harness_env)."""
        self.subgoal, self.subgoal_index = subgoal, int(index)

    def abort(self, reason: str) -> None:
        """Make every current and later wait raise (goal canceled, node closing)."""
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()

    @property
    def aborted(self) -> str:
        """Why waiting was aborted ("" while it is not)."""
        return self._aborted

    def close(self) -> None:
        self.abort("the harness is shutting down")
        self._kin.close()

    # -- inputs --------------------------------------------------------------------------
    def _on_joint_states(self, msg: JointState) -> None:
        try:
            q = mc.joint_positions_from_msg(msg, JOINT_NAMES)
        except mc.MessageError as exc:
            self.node.get_logger().warning(f"dropped joint_states: {exc}", throttle_duration_sec=2.0)
            return
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._cond:
            self._joints.append((stamp_ns, q))
            self._cond.notify_all()

    def _on_world(self, msg: WorldStateMsg) -> None:
        try:
            poses, joints, t_s = mc.world_state_from_msg(msg)
        except mc.MessageError as exc:
            self.node.get_logger().warning(f"dropped ground truth: {exc}", throttle_duration_sec=2.0)
            return
        with self._cond:
            command_ns = mc.stamp_ns(msg.command_stamp)
            self._acks_commands = self._acks_commands or command_ns != 0
            self._world_raw = (poses, joints, t_s, int(msg.episode), command_ns)
            self._world_seq += 1
            self._cond.notify_all()

    def _on_image(self, msg: Image) -> None:
        try:
            image = mc.image_from_msg(msg, "rgb8", self.image_size)
        except mc.MessageError as exc:
            self.node.get_logger().warning(f"dropped front image: {exc}", throttle_duration_sec=2.0)
            return
        self._image = image

    # -- waiting for the world -----------------------------------------------------------
    def _joint_positions_for(self, stamp_s: float) -> np.ndarray | None:
        """Joint positions of the same tick as a world state (the newest when none matches)."""
        if not self._joints:
            return None
        target = int(round(stamp_s * 1e9))
        for stamp_ns, q in reversed(self._joints):
            if abs(stamp_ns - target) < 1000:  # same tick (stamps agree to the nanosecond)
                return q
        return self._joints[-1][1]

    def _usable(self, after_seq: int, min_stamp_s: float | None) -> bool:
        if self._world_seq <= after_seq or self._world_raw is None or not self._joints:
            return False
        _, _, t_s, episode, _ = self._world_raw
        if self._episode is not None and episode != self._episode:
            return False  # a state from before the last reset, still in flight
        return min_stamp_s is None or t_s >= min_stamp_s - 1e-9

    def wait_world(self, after_seq: int = 0, min_stamp_s: float | None = None,
                   timeout_s: float | None = None) -> _World:
        """The next usable world state newer than `after_seq` (and stamped at or after
        `min_stamp_s`); raises HarnessEnvError after `timeout_s` (default: stall_timeout_s)."""
        timeout = self.stall_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            ok = self._cond.wait_for(lambda: self._aborted or self._usable(after_seq, min_stamp_s), timeout=timeout)
            if self._aborted:
                raise HarnessEnvError(self._aborted)
            if not ok:
                raise HarnessEnvError(f"no world state for {timeout:.1f} s: the simulator or a sensor node stopped")
            poses, joints, t_s, _, command_ns = self._world_raw
            q = self._joint_positions_for(t_s)
            self._world = _World(t_s, self._world_seq, mc.world_state_from_parts(poses, joints, q, t_s, self._kin),
                                 command_ns)
            return self._world

    def latest_world(self) -> _World:
        """The newest usable world state (waits for a first one)."""
        with self._cond:
            if self._world is not None and self._world.seq == self._world_seq:
                return self._world
        return self.wait_world(after_seq=0)

    def _latest_q(self) -> np.ndarray:
        """The newest measured joint positions. Not interruptible: holding after an abort
        is exactly what must still work."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._joints), timeout=self.stall_timeout_s):
                raise HarnessEnvError(f"no joint_states for {self.stall_timeout_s:.1f} s: cannot hold")
            return self._joints[-1][1].copy()

    def require_task(self) -> TaskSpec:
        if self.task is None:
            raise HarnessEnvError("no task: begin_episode(task, episode) first")
        return self.task

    # -- HarnessEnv ----------------------------------------------------------------------
    def observe(self) -> Observation:
        task = self.require_task()
        world = self.latest_world()
        images = {"front": self._image} if self._image is not None else {}
        return Observation(world.state.joint_positions.copy(), world.stamp_s, task, self.subgoal_index,
                           world.state, images)

    def execute(self, chunk: ActionChunk) -> ExecutionReport:
        task = self.require_task()
        positions = np.asarray(chunk.positions, dtype=np.float64)
        times_s = np.asarray(chunk.times_s, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != len(JOINT_NAMES) or positions.shape[0] == 0:
            raise HarnessEnvError(f"chunk must be (T >= 1, {len(JOINT_NAMES)}) joint targets, got {positions.shape}")
        world = self._start_trajectory(positions, times_s)
        if world is None:
            return ExecutionReport(False, f"the robot did not take the chunk on within {self.command_ack_timeout_s:g} s "
                                          "(rejected by the safety node?)")
        start_s = world.stamp_s
        deadline_s = start_s + float(times_s[-1])
        events = []  # (time, "open" | "close") of rows that change the gripper, fired as the world gets there
        for t, row in zip(times_s, positions):
            what = self._gripper.update(row[N_ARM_JOINTS:])
            if what is not None:
                events.append((start_s + float(t), what))
        call = parse_predicate(self.subgoal.predicate) if self.subgoal is not None else None
        seq = world.seq
        while True:
            world = self.wait_world(after_seq=seq)
            seq = world.seq
            while events and world.stamp_s >= events[0][0] - 1e-9:
                _, what = events.pop(0)
                if self.on_gripper_event is not None:
                    self.on_gripper_event(self.observe(), what)
            if call is not None and evaluate(call, world.state, task.geometry):
                return ExecutionReport(True, f"subgoal {self.subgoal.name!r} reached during the chunk")
            if world.stamp_s >= deadline_s - 1e-9:
                return ExecutionReport(True)

    def subgoal_done(self, subgoal: SubgoalSpec) -> bool:
        task = self.require_task()
        return bool(evaluate(parse_predicate(subgoal.predicate), self.latest_world().state, task.geometry))

    def snapshot(self) -> int | RobotPose:
        if not self.sim:
            world = self.latest_world()
            return RobotPose(world.state.joint_positions.copy(), world.stamp_s)
        response = self._call(self._save, SaveState.Request(), "sim/save_state")
        if not response.success:
            raise HarnessEnvError(f"sim/save_state refused: {response.message}")
        return int(response.handle)

    def restore(self, handle: int | RobotPose) -> None:
        if isinstance(handle, RobotPose):
            self._drive_back(handle)
        elif not self.sim:
            raise HarnessEnvError(f"on a real robot a snapshot is a RobotPose, got {handle!r}")
        else:
            if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)):
                raise HarnessEnvError(f"a simulator snapshot handle is an int, got {handle!r}")
            response = self._call(self._restore, RestoreState.Request(handle=int(handle)), "sim/restore_state")
            if not response.success:
                raise HarnessEnvError(f"sim/restore_state refused handle {handle}: {response.message}")
            # Return once the restored state is what observe() sees.
            self.wait_world(min_stamp_s=mc.to_seconds(response.stamp))
            self._last_command = None
            self._gripper.reset()
        self.restores += 1

    def hold(self) -> None:
        q = self._latest_q()
        target = q.copy()
        if self._last_command is not None:
            target[N_ARM_JOINTS:] = self._last_command[N_ARM_JOINTS:]
        with self._cond:
            stamp = self._world.stamp_s if self._world is not None else 0.0
        self._send(target[None, :], np.array([HOLD_TIME_S]), stamp)

    # -- helpers -------------------------------------------------------------------------
    def _send(self, positions: np.ndarray, times_s: np.ndarray, stamp_s: float) -> int:
        """Publish a trajectory; returns its stamp (ns), unique to it: never one used before."""
        now = self.node.get_clock().now().nanoseconds * 1e-9
        msg = mc.trajectory_msg(JOINT_NAMES, positions, times_s, max(now, stamp_s))
        stamp = max(mc.stamp_ns(msg.header.stamp), self._last_stamp_ns + 1)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        self._last_stamp_ns = stamp
        self._cmd.publish(msg)
        self._last_command = positions[-1].copy()
        return stamp

    def _start_trajectory(self, positions: np.ndarray, times_s: np.ndarray) -> _World | None:
        """Send a trajectory; returns the world state its duration counts from: the first
        one that reports it taken on (or, from a source that reports no commands, the one
        at the send). None when it was not taken on within `command_ack_timeout_s` wall s."""
        world = self.latest_world()
        stamp = self._send(positions, times_s, world.stamp_s)
        if not self._acks_commands:
            return world
        deadline = time.monotonic() + self.command_ack_timeout_s
        seq = 0
        while True:
            world = self.wait_world(after_seq=seq)
            seq = world.seq
            if world.command_ns == stamp:
                return world
            if time.monotonic() > deadline:
                return None

    def _call(self, client, request, name: str):
        if not client.wait_for_service(timeout_sec=self.service_timeout_s):
            raise HarnessEnvError(f"service {name} not available within {self.service_timeout_s:.0f} s "
                                  "(is sim_bridge running?)")
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        deadline = time.monotonic() + self.service_timeout_s
        while not done.wait(0.05):
            if self._aborted:
                client.remove_pending_request(future)
                raise HarnessEnvError(self._aborted)
            if time.monotonic() > deadline:
                client.remove_pending_request(future)
                raise HarnessEnvError(f"service {name} did not answer within {self.service_timeout_s:.0f} s")
        return future.result()

    def _drive_back(self, pose: RobotPose) -> None:
        """Real robot: a slow joint trajectory back to `pose`, in segments, then check."""
        start = self.latest_world()
        q0, q1 = start.state.joint_positions.copy(), np.asarray(pose.joint_positions, dtype=np.float64)
        travel = float(np.max(np.abs(q1[:N_ARM_JOINTS] - q0[:N_ARM_JOINTS])))
        duration = max(travel / self.restore_speed_rad_s, 0.5)
        segments = max(1, math.ceil(duration / RESTORE_SEGMENT_S))
        world = start
        for k in range(segments):
            a, b = k / segments, (k + 1) / segments
            seg_s = duration / segments
            steps = max(2, math.ceil(seg_s / 0.05))
            fractions = a + (b - a) * np.arange(1, steps + 1) / steps
            positions = q0[None, :] + fractions[:, None] * (q1 - q0)[None, :]
            times = seg_s * np.arange(1, steps + 1) / steps
            world = self._start_trajectory(positions, times)
            if world is None:
                raise HarnessEnvError(f"driving back to the recorded pose: the robot did not take segment {k + 1} on "
                                      f"within {self.command_ack_timeout_s:g} s (rejected by the safety node?)")
            end_s = world.stamp_s + seg_s
            while world.stamp_s < end_s - 1e-9:
                world = self.wait_world(after_seq=world.seq)
        settle_end = world.stamp_s + RESTORE_SETTLE_S
        while True:
            error = float(np.max(np.abs(world.state.joint_positions[:N_ARM_JOINTS] - q1[:N_ARM_JOINTS])))
            if error <= RESTORE_TOLERANCE_RAD:
                return
            if world.stamp_s >= settle_end:
                raise HarnessEnvError(f"could not drive the arm back to the recorded pose: still {error:.3f} rad away "
                                      f"after {duration + RESTORE_SETTLE_S:.1f} s")
            world = self.wait_world(after_seq=world.seq)


class RosChunkProposer:
    """`runtime.harness_controller.ChunkProposer` over the policy node (module docstring)."""

    def __init__(self, node: Node, env: RosHarnessEnv, publish_subgoal: Callable[[String], None], *,
                 callback_group=None, proposal_timeout_s: float = 10.0, resend_after_s: float = 1.0) -> None:
        for name, value in (("proposal_timeout_s", proposal_timeout_s), ("resend_after_s", resend_after_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"RosChunkProposer.{name} must be a finite number > 0, got {value!r}")
        self.node = node
        self.env = env
        self.publish_subgoal = publish_subgoal
        self.proposal_timeout_s = float(proposal_timeout_s)
        self.resend_after_s = float(resend_after_s)
        self._cond = threading.Condition()
        self._waiting_for: tuple[str, int] | None = None  # (answer frame_id, min stamp ns)
        self._answer: JointTrajectory | None = None
        self._request = 0
        self.episode = 0
        self.seed = 0
        self.requests = 0
        self.resends = 0
        node.create_subscription(JointTrajectory, "policy/proposed_action", self._on_proposal, 10,
                                 callback_group=callback_group)

    def begin_episode(self, episode: int, seed: int) -> None:
        self.episode, self.seed = int(episode), int(seed)

    def _on_proposal(self, msg: JointTrajectory) -> None:
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._cond:
            if (self._waiting_for is None or self._answer is not None or msg.header.frame_id != self._waiting_for[0]
                    or stamp_ns < self._waiting_for[1]):
                return  # nobody asked, already answered, or an answer to another request
            self._answer = msg
            self._cond.notify_all()

    def propose(self, observation: Observation, subgoal: SubgoalSpec, attempt: int) -> ActionChunk:
        task = self.env.require_task()
        index = task_subgoal_index(task, subgoal, self.env.subgoal_index)
        self.env.set_subgoal(subgoal, index)
        # The observation was taken before the proposer learnt the subgoal: give it the index.
        observation.subgoal_index = index
        min_stamp_ns = int(round(observation.sim_time_s * 1e9))
        with self._cond:
            self._request += 1
            request = self._request
            self._waiting_for, self._answer = (f"request {request}", min_stamp_ns), None
        message = String(data=json.dumps({
            "task_id": task.task_id, "index": index, "name": subgoal.name, "attempt": int(attempt),
            "request": request, "episode": self.episode, "seed": self.seed, "rollbacks": self.env.restores,
            "stamp": observation.sim_time_s,
        }))
        self.publish_subgoal(message)
        self.requests += 1
        deadline = time.monotonic() + self.proposal_timeout_s
        resend_at = time.monotonic() + self.resend_after_s
        with self._cond:
            while self._answer is None:
                if self.env.aborted:
                    self._waiting_for = None
                    raise HarnessEnvError(self.env.aborted)
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiting_for = None
                    raise HarnessEnvError(f"no proposal from the policy node for request {request} "
                                          f"(subgoal {subgoal.name!r}, attempt {attempt}) within "
                                          f"{self.proposal_timeout_s:.1f} s")
                if time.monotonic() >= resend_at:
                    self.publish_subgoal(message)
                    self.resends += 1
                    resend_at += self.resend_after_s
                self._cond.wait(min(left, 0.1))
            msg, self._waiting_for, self._answer = self._answer, None, None
        try:
            names, positions, times = mc.trajectory_from_msg(msg)
            order = [names.index(n) for n in JOINT_NAMES]
        except (mc.MessageError, ValueError) as exc:
            raise HarnessEnvError(f"unusable proposal for request {request}: {exc}") from exc
        return ActionChunk(positions[:, order], times)


def task_subgoal_index(task: TaskSpec, subgoal: SubgoalSpec, hint: int = 0) -> int:
    """Index in `task.subgoals` of `subgoal` (the same spec, else the same predicate; the
    match at or after `hint` first). Raises HarnessEnvError when the task has none."""
    same = [i for i, s in enumerate(task.subgoals) if s == subgoal]
    if not same:
        try:
            key = str(parse_predicate(subgoal.predicate))
        except (ValueError, AttributeError) as exc:
            raise HarnessEnvError(f"subgoal {subgoal!r} has no valid predicate: {exc}") from exc
        same = [i for i, s in enumerate(task.subgoals) if str(parse_predicate(s.predicate)) == key]
    if not same:
        raise HarnessEnvError(f"subgoal {subgoal.name!r} ({subgoal.predicate}) is not one of task "
                              f"{task.task_id!r}'s subgoals: the policy cannot act on it")
    later = [i for i in same if i >= hint]
    return later[0] if later else same[0]
