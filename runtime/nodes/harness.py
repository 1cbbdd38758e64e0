"""harness: serves the task action and runs the task subgoal by subgoal.

Baseline (pass-through) mode, the one HELM extends: for a goal on `harness/execute_task`
(helmstack_interfaces/action/ExecuteTask) it resets the simulator to the task's initial
state (sim only), announces each subgoal on `harness/subgoal`, forwards the policy's
proposed chunks unchanged to `robot/command_raw` (a pass-through verdict per chunk on
`harness/verdict`), checks the subgoal's success predicate on every ground-truth update,
and reports progress as action feedback and on `harness/status`. If the world state
stops arriving (a node died) the goal aborts with that reason instead of hanging.
"""
from __future__ import annotations

import json
import threading
import time

import rclpy
from rclpy._rclpy_pybind11 import InvalidHandle, RCLError
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from helmstack_interfaces.action import ExecuteTask
from helmstack_interfaces.msg import VerifierVerdict, WorldState as WorldStateMsg
from helmstack_interfaces.srv import ResetTask
from runtime.nodes import msg_convert as mc
from runtime.nodes.common import NodeSetupError, declare_number, run_node
from runtime.task_progress import Progress, TaskProgress
from sim.panda import JOINT_NAMES, PandaKinematics
from sim.tasks.suite import UnknownTaskError, get_task
from sim.world_state import WorldState


# The current subgoal is state, not a stream: late joiners (a restarted policy) get it.
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class HarnessNode(Node):
    def __init__(self) -> None:
        super().__init__("harness")
        self.declare_parameter("sim", True)
        self.declare_parameter("mode", "pass_through")
        declare_number(self, "stall_timeout_s", 5.0)  # wall seconds without world state
        declare_number(self, "reset_timeout_s", 30.0)
        if self.get_parameter("mode").value != "pass_through":
            raise NodeSetupError(f"harness: mode {self.get_parameter('mode').value!r} is not available (pass_through)")
        self._kin = PandaKinematics()
        self._cond = threading.Condition()
        self._world: tuple | None = None
        self._world_episode = 0
        self._episode: int | None = None  # the simulator episode this goal runs in (sim only)
        self._world_seq = 0
        self._q = None
        self._progress: TaskProgress | None = None
        self._goal_active = False
        self._closing = threading.Event()
        cb = ReentrantCallbackGroup()
        self._cmd = self.create_publisher(JointTrajectory, "robot/command_raw", 10)
        self._subgoal_pub = self.create_publisher(String, "harness/subgoal", LATCHED)
        self._status = self.create_publisher(DiagnosticStatus, "harness/status", 10)
        self._verdict = self.create_publisher(VerifierVerdict, "harness/verdict", 10)
        self.create_subscription(JointTrajectory, "policy/proposed_action", self._on_proposal, 10, callback_group=cb)
        self.create_subscription(WorldStateMsg, "sim/ground_truth", self._on_world, 10, callback_group=cb)
        self.create_subscription(JointState, "joint_states", self._on_joint_states, 10, callback_group=cb)
        self._reset = self.create_client(ResetTask, "sim/reset_task", callback_group=cb)
        self._server = ActionServer(
            self, ExecuteTask, "harness/execute_task", execute_callback=self._execute,
            goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self._publish_status("idle", "")

    # -- inputs ------------------------------------------------------------------------
    def _on_world(self, msg: WorldStateMsg) -> None:
        try:
            world = mc.world_state_from_msg(msg)
        except mc.MessageError as exc:
            self.get_logger().warning(f"dropped ground truth: {exc}", throttle_duration_sec=2.0)
            return
        with self._cond:
            self._world = world
            self._world_episode = msg.episode
            self._world_seq += 1
            self._cond.notify_all()

    def _on_joint_states(self, msg: JointState) -> None:
        try:
            self._q = mc.joint_positions_from_msg(msg, JOINT_NAMES)
        except mc.MessageError as exc:
            self.get_logger().warning(f"dropped joint_states: {exc}", throttle_duration_sec=2.0)

    def _on_proposal(self, msg: JointTrajectory) -> None:
        if not self._goal_active:
            return
        self._cmd.publish(msg)
        verdict = VerifierVerdict(header=msg.header, subgoal=self._progress.current_name if self._progress else "",
                                  p_fail=0.0, decision=VerifierVerdict.PASS_THROUGH, reason="baseline: no verifier")
        self._verdict.publish(verdict)

    # -- the task action ---------------------------------------------------------------
    def _on_goal(self, goal: ExecuteTask.Goal) -> GoalResponse:
        return GoalResponse.REJECT if self._goal_active else GoalResponse.ACCEPT

    def _execute(self, goal_handle) -> ExecuteTask.Result:
        goal = goal_handle.request
        result = ExecuteTask.Result()
        if not goal.task_id:
            # Instruction -> subgoals needs a planner; the baseline harness runs suite tasks.
            result.reason = f"no task_id given; instruction-only goals ({goal.instruction!r}) need a planner, not available yet"
            goal_handle.abort()
            return result
        try:
            task = get_task(goal.task_id)
        except UnknownTaskError as exc:
            result.reason = str(exc)
            goal_handle.abort()
            return result
        self._episode = None
        if self.get_parameter("sim").value:
            error = self._reset_sim(goal.task_id, goal.seed)
            if error:
                result.reason = error
                goal_handle.abort()
                return result
        world, seq = self._wait_world(0)
        if world is None:
            result.reason = self._stall_reason()
            goal_handle.abort()
            return result
        progress = TaskProgress(task, start_time_s=world.sim_time_s)
        self._progress, self._goal_active = progress, True
        try:
            self._run(goal_handle, progress, seq)
        finally:
            self._goal_active = False
        if self._closing.is_set():  # the node is going away: nobody is left to tell
            return result
        self._announce(task.task_id, -1, "")
        result.success = progress.success
        result.reason = progress.reason
        result.subgoal_names = [r.name for r in progress.records]
        result.subgoal_success = [r.success for r in progress.records]
        result.subgoal_steps = [r.steps for r in progress.records]
        result.subgoal_duration_s = [r.duration_s for r in progress.records]
        self._publish_status("succeeded" if progress.success else "failed", progress.reason)
        if progress.success:
            goal_handle.succeed()
        elif goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return result

    def _run(self, goal_handle, progress: TaskProgress, seq: int) -> None:
        task = progress.task
        self._announce(task.task_id, 0, progress.current_name)
        while not progress.done:
            if goal_handle.is_cancel_requested:
                progress.fail("canceled", self._world_time())
                return
            world, seq = self._wait_world(seq)
            if world is None:
                progress.fail(self._stall_reason(), self._world_time())
                return
            state = progress.update(world)
            if state is Progress.SUBGOAL_REACHED:
                self.get_logger().info(f"subgoal {progress.index}/{len(task.subgoals)} reached: {progress.records[-1].name}")
                self._announce(task.task_id, progress.index, progress.current_name)
            elif state is Progress.FAILED:
                self.get_logger().warning(progress.reason)
            feedback = ExecuteTask.Feedback(current_subgoal=progress.current_name, subgoal_index=progress.index,
                                            num_subgoals=len(task.subgoals), harness_state="executing", p_fail=0.0)
            try:
                goal_handle.publish_feedback(feedback)
                self._publish_status("executing", progress.current_name)
            except (InvalidHandle, RCLError):  # shutdown raced us (Ctrl-C): stop quietly
                self._closing.set()
                return

    def _reset_sim(self, task_id: str, seed: int) -> str:
        timeout = float(self.get_parameter("reset_timeout_s").value)
        if not self._reset.wait_for_service(timeout_sec=timeout):
            return f"simulator reset service not available within {timeout:.0f} s (is sim_bridge running?)"
        future = self._reset.call_async(ResetTask.Request(task_id=task_id, seed=int(seed)))
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline and rclpy.ok():
            time.sleep(0.01)
        if not future.done():
            return f"simulator reset did not answer within {timeout:.0f} s"
        response = future.result()
        if not response.success:
            return f"simulator reset failed: {response.message}"
        self._episode = response.episode
        return ""

    def _wait_world(self, after_seq: int) -> tuple[WorldState | None, int]:
        """Next world state newer than `after_seq`, or None after stall_timeout_s wall time."""
        timeout = float(self.get_parameter("stall_timeout_s").value)
        with self._cond:
            # After a reset, only states of the new episode count (older ones may still be in flight).
            ok = self._cond.wait_for(
                lambda: self._closing.is_set() or (
                    self._world_seq > after_seq and self._q is not None
                    and (self._episode is None or self._world_episode == self._episode)), timeout=timeout)
            if not ok or self._closing.is_set():
                return None, after_seq
            poses, joints, t_s = self._world
            return mc.world_state_from_parts(poses, joints, self._q, t_s, self._kin), self._world_seq

    def close(self) -> None:
        """Called on shutdown: end a running goal's loop instead of publishing into a dead context."""
        with self._cond:
            self._closing.set()
            self._cond.notify_all()

    def _stall_reason(self) -> str:
        return (f"no world state for {self.get_parameter('stall_timeout_s').value:.1f} s: "
                "the simulator or a sensor node stopped")

    def _world_time(self) -> float:
        return self._world[2] if self._world else 0.0

    # -- outputs -----------------------------------------------------------------------
    def _announce(self, task_id: str, index: int, name: str) -> None:
        self._subgoal_pub.publish(String(data=json.dumps({"task_id": task_id, "index": index, "name": name})))

    def _publish_status(self, state: str, detail: str) -> None:
        status = DiagnosticStatus(level=DiagnosticStatus.OK, name="helmstack/harness", message=state, hardware_id="harness")
        status.values = [KeyValue(key="state", value=state), KeyValue(key="mode", value="pass_through"),
                         KeyValue(key="detail", value=detail)]
        self._status.publish(status)


def main() -> int:
    return run_node(HarnessNode, threads=4)


if __name__ == "__main__":
    raise SystemExit(main())
