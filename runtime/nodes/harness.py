"""harness: serves the task action and runs the task subgoal by subgoal.

Two modes (parameter `mode`):

`pass_through` (the baseline HELM extends): for a goal on `harness/execute_task`
(helmstack_interfaces/action/ExecuteTask) it resets the simulator to the task's initial
state (sim only), announces each subgoal on `harness/subgoal`, forwards the policy's
proposed chunks unchanged to `robot/command_raw` (a pass-through verdict per chunk on
`harness/verdict`), checks the subgoal's success predicate on every ground-truth update,
and reports progress as action feedback and on `harness/status`. If the world state
stops arriving (a node died) the goal aborts with that reason instead of hanging.

`helm`: the same action, run by the HELM harness controller (runtime/harness_controller.py)
over the graph (runtime/nodes/harness_ros_env.py): every chunk is requested from the
policy node (subgoal JSON with an `attempt`), checked by the state verifier before it
reaches `robot/command_raw`, and a rejected chunk or a missed subgoal climbs the recovery
ladder (resample, roll the simulator back through sim/save_state / sim/restore_state, or
re-plan with runtime.planner). Parameters: `harness_config` (a YAML file whose `harness`
section is a HarnessControllerConfig and whose optional `planner` section is a
runtime.planner.PlannerConfig; empty = defaults) and `verifier` (a spec for
runtime.state_verifier.load_verifier: `rule`, or a trained state-verifier checkpoint
directory). Every controller transition goes out on `harness/status` (from, to, reason,
counters, and the transition as JSON), every verifier decision on `harness/verdict`, and
the episode's whole record (HarnessResult.as_dict()) with the final status.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import rclpy
import yaml
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
from runtime.config import ConfigError, load_config
from runtime.harness_controller import HarnessController, HarnessControllerConfig, HarnessResult, KeyframeLog, Transition
from runtime.nodes import msg_convert as mc
from runtime.nodes.common import NodeSetupError, declare_number, run_node
from runtime.planner import PlannerConfig, make_planner
from runtime.task_progress import Progress, TaskProgress
from sim.panda import JOINT_NAMES, PandaKinematics
from sim.tasks.suite import UnknownTaskError, get_task
from sim.world_state import WorldState


# The current subgoal is state, not a stream: late joiners (a restarted policy) get it.
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
MODES = ("pass_through", "helm")
# A HOLD ends an episode with the robot stopped by the harness: an error for diagnostics.
_STATUS_LEVEL = {"failed": DiagnosticStatus.WARN, "hold": DiagnosticStatus.ERROR}


def _finish_goal(goal_handle, success: bool) -> None:
    """End an ExecuteTask goal: succeeded, canceled when the client asked for it, else aborted."""
    if success:
        goal_handle.succeed()
    elif goal_handle.is_cancel_requested:
        goal_handle.canceled()
    else:
        goal_handle.abort()


@dataclass(frozen=True)
class HelmNodeConfig:
    """The `harness_config` file: `harness` (HarnessControllerConfig) and `planner`
    (PlannerConfig) sections, both optional."""

    harness: HarnessControllerConfig = field(default_factory=HarnessControllerConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)


def load_helm_config(path: str | Path | None) -> HelmNodeConfig:
    """Read a harness config YAML; errors name the file and the field (``harness.tau``)."""
    if not path:
        return HelmNodeConfig()
    origin = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: must be a mapping with a 'harness' section, got {data!r}")
    unknown = sorted(set(data) - {"harness", "planner"})
    if unknown:
        raise ConfigError(f"{origin}: unknown section(s) {unknown}; allowed: ['harness', 'planner']")
    return HelmNodeConfig(
        harness=load_config(HarnessControllerConfig, data.get("harness") or {}, root="harness", origin=origin),
        planner=load_config(PlannerConfig, data.get("planner") or {}, root="planner", origin=origin),
    )


def load_failure_predictor(spec: str):
    """runtime.state_verifier.load_verifier(spec), imported only when helm mode needs it;
    any failure becomes a NodeSetupError naming the spec."""
    try:
        from runtime.state_verifier import load_verifier
    except ImportError as exc:
        raise NodeSetupError(f"harness: cannot load verifier {spec!r}: runtime.state_verifier is not importable "
                             f"({exc})") from exc
    try:
        return load_verifier(spec)
    except Exception as exc:  # a bad path, a corrupt checkpoint, an unknown spec: refuse to start
        raise NodeSetupError(f"harness: cannot load verifier {spec!r}: {type(exc).__name__}: {exc}") from exc


class _ReportingController(HarnessController):
    """The harness controller, telling the node about every transition as it happens
    (the controller itself only records them for the end of the episode)."""

    def __init__(self, *args, on_transition, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_transition = on_transition

    def _to(self, ep, source, target, reason, p_fail=None, notable=False):
        state = super()._to(ep, source, target, reason, p_fail=p_fail, notable=notable)
        self._on_transition(ep.transitions[-1], len(ep.subgoals))
        return state


class HarnessNode(Node):
    def __init__(self) -> None:
        super().__init__("harness")
        self.declare_parameter("sim", True)
        self.declare_parameter("mode", "pass_through")
        self.declare_parameter("harness_config", "")  # helm: YAML with `harness` / `planner` sections
        self.declare_parameter("verifier", "rule")  # helm: runtime.state_verifier.load_verifier spec
        self.declare_parameter("encoder", "")  # helm: open_clip checkpoint keying episodic memory ("" = no retrieval)
        declare_number(self, "stall_timeout_s", 5.0)  # wall seconds without world state
        declare_number(self, "reset_timeout_s", 30.0)
        declare_number(self, "proposal_timeout_s", 10.0)  # helm: wall seconds for the policy to answer
        declare_number(self, "service_timeout_s", 10.0)  # helm: sim/save_state, sim/restore_state
        declare_number(self, "restore_speed_rad_s", 0.3)  # helm, sim:=false: joint speed of a rollback
        declare_number(self, "control_hz", 20.0)  # to report control steps per subgoal
        self.mode = self.get_parameter("mode").value
        if self.mode not in MODES:
            raise NodeSetupError(f"harness: parameter mode must be one of {list(MODES)}, got {self.mode!r}")
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
        self._subgoal_pub = self.create_publisher(String, "harness/subgoal", LATCHED)
        # Deep enough that a burst of controller transitions reaches a recorder whole.
        self._status = self.create_publisher(DiagnosticStatus, "harness/status", 200)
        self._verdict = self.create_publisher(VerifierVerdict, "harness/verdict", 50)
        self._reset = self.create_client(ResetTask, "sim/reset_task", callback_group=cb)
        self._env = self._proposer = self._helm = self._memory = None
        self._goals = 0
        self._last_transition_wall = time.monotonic()
        if self.mode == "helm":
            self._setup_helm(cb)
        else:
            self._cmd = self.create_publisher(JointTrajectory, "robot/command_raw", 10)
            self.create_subscription(JointTrajectory, "policy/proposed_action", self._on_proposal, 10, callback_group=cb)
            self.create_subscription(WorldStateMsg, "sim/ground_truth", self._on_world, 10, callback_group=cb)
            self.create_subscription(JointState, "joint_states", self._on_joint_states, 10, callback_group=cb)
        self._server = ActionServer(
            self, ExecuteTask, "harness/execute_task", execute_callback=self._execute,
            goal_callback=self._on_goal, cancel_callback=self._on_cancel,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self._publish_status("idle", "")

    def _make_memory(self, verifier):
        """Episodic memory keyed by the encoder when one is configured (runtime.helm_memory),
        else the controller's plain keyframe log; a verifier that reads memory needs one."""
        path = str(self.get_parameter("encoder").value).strip()
        if not path:
            if getattr(verifier, "use_memory", False):
                raise NodeSetupError("harness: the verifier reads episodic memory: set the encoder parameter "
                                     "(the open_clip checkpoint it was trained with)")
            return None
        try:
            from perception.encoder import load_encoder
            from runtime.helm_memory import HelmMemory

            return HelmMemory(load_encoder(path), control_hz=float(self.get_parameter("control_hz").value))
        except Exception as exc:  # a missing or corrupt checkpoint: refuse to start
            raise NodeSetupError(f"harness: cannot load encoder {path!r}: {type(exc).__name__}: {exc}") from exc

    def _setup_helm(self, cb) -> None:
        """Load the controller config, the verifier and the planner; refuse to start (exit 2,
        one line naming the problem) when any of them cannot be had."""
        from runtime.nodes.harness_ros_env import RosChunkProposer, RosHarnessEnv

        config = load_helm_config(self.get_parameter("harness_config").value)
        spec = str(self.get_parameter("verifier").value).strip()
        if not spec:
            raise NodeSetupError("harness: parameter verifier is empty; give 'rule' or a state-verifier checkpoint directory")
        verifier = load_failure_predictor(spec) if config.harness.mode == "verified" else None
        try:
            planner = make_planner(config.planner)
        except (ConfigError, ValueError) as exc:
            raise NodeSetupError(f"harness: cannot build the planner: {exc}") from exc
        self._memory = self._make_memory(verifier)
        self._helm = (config, verifier, planner, spec)
        try:
            self._env = RosHarnessEnv(
                self, sim=bool(self.get_parameter("sim").value), callback_group=cb,
                stall_timeout_s=float(self.get_parameter("stall_timeout_s").value),
                service_timeout_s=float(self.get_parameter("service_timeout_s").value),
                restore_speed_rad_s=float(self.get_parameter("restore_speed_rad_s").value))
            self._proposer = RosChunkProposer(self, self._env, self._subgoal_pub.publish, callback_group=cb,
                                              proposal_timeout_s=float(self.get_parameter("proposal_timeout_s").value))
        except ValueError as exc:
            raise NodeSetupError(f"harness: {exc}") from exc
        self.get_logger().info(f"helm mode: controller {config.harness.mode}, tau {config.harness.tau:g}, "
                               f"ladder {list(config.harness.ladder)}, verifier {spec!r}, "
                               f"planner {type(planner).__name__}")

    def _on_cancel(self, goal_handle) -> CancelResponse:
        if self._env is not None:
            self._env.abort("the goal was canceled")
        return CancelResponse.ACCEPT

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
        if self.mode == "helm":
            return self._execute_helm(goal_handle, task, result)
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
        _finish_goal(goal_handle, progress.success)
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

    # -- helm mode -----------------------------------------------------------------------
    def _execute_helm(self, goal_handle, task, result: ExecuteTask.Result) -> ExecuteTask.Result:
        """One episode of the harness controller over the graph (module docstring)."""
        config, verifier, planner, _ = self._helm
        env, proposer = self._env, self._proposer
        goal = goal_handle.request
        env.begin_episode(task, self._episode)
        self._goals += 1  # the policy node resets its proposer when this changes
        proposer.begin_episode(self._goals, goal.seed)
        self._goal_active = True
        try:
            try:
                env.wait_world()
            except Exception as exc:  # HarnessEnvError: nothing arrives
                result.reason = str(exc)
                goal_handle.abort()
                return result
            if goal_handle.is_cancel_requested:  # canceled before the controller started
                env.abort("the goal was canceled")

            def on_transition(transition: Transition, num_subgoals: int) -> None:
                self._report_transition(goal_handle, transition, num_subgoals)

            self._last_transition_wall = time.monotonic()
            memory = self._memory if self._memory is not None else KeyframeLog()
            if self._memory is not None:
                self._memory.start_episode(f"goal-{self._goals}-{task.task_id}-{goal.seed}")
                env.on_gripper_event = lambda obs, what: self._memory.gripper_event(obs, what, env.subgoal_index,
                                                                                    env.subgoal)
            controller = _ReportingController(
                config.harness, proposer, env, verifier=verifier, planner=planner, memory=memory,
                clock=self._now_s, on_transition=on_transition)
            outcome = controller.run(task.instruction, list(task.subgoals))
            if self._memory is not None:
                kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self._memory.episode_kinds.items()))
                self.get_logger().info(f"episodic memory: {sum(self._memory.episode_kinds.values())} keyframes "
                                       f"this episode ({kinds}), {len(self._memory.memory)} in all")
        finally:
            self._goal_active = False
        if self._closing.is_set():
            return result
        self._announce(task.task_id, -1, "")
        self._fill_result(result, outcome)
        state = {"done": "succeeded", "failed": "failed", "hold": "held"}[outcome.final_state.value]
        self._publish_status(state, outcome.reason, level=_STATUS_LEVEL.get(outcome.final_state.value, DiagnosticStatus.OK),
                             extra={"result": json.dumps(outcome.as_dict())})
        log = self.get_logger().info if outcome.success else self.get_logger().warning
        log(f"episode {state}: {outcome.reason} (chunks {outcome.chunks_executed}, rejections {outcome.rejections}, "
            f"resamples {outcome.resamples}, rollbacks {outcome.rollbacks}, replans {outcome.replans})")
        _finish_goal(goal_handle, outcome.success)
        return result

    def _fill_result(self, result: ExecuteTask.Result, outcome: HarnessResult) -> None:
        control_hz = float(self.get_parameter("control_hz").value)
        result.success = outcome.success
        result.reason = outcome.reason
        result.subgoal_names = [s.name for s in outcome.subgoals]
        result.subgoal_success = [s.outcome == "reached" for s in outcome.subgoals]
        result.subgoal_steps = [int(round(s.duration_s * control_hz)) for s in outcome.subgoals]
        result.subgoal_duration_s = [float(s.duration_s) for s in outcome.subgoals]

    def _report_transition(self, goal_handle, t: Transition, num_subgoals: int) -> None:
        """Status for every transition, a verdict for every verifier decision, feedback.
        Runs inside the controller: it must not raise."""
        now = time.monotonic()
        in_state_ms, self._last_transition_wall = (now - self._last_transition_wall) * 1e3, now
        try:
            values = {"from": t.from_state, "to": t.to_state, "reason": t.reason, "subgoal": t.subgoal,
                      "wall_ms": f"{in_state_ms:.3f}",  # wall time spent in `from` (latency accounting)
                      "subgoal_index": str(t.subgoal_index), "attempt": str(t.attempt),
                      "p_fail": "" if t.p_fail is None else f"{t.p_fail:.6g}", "resamples": str(t.resamples),
                      "rollbacks": str(t.rollbacks), "replans": str(t.replans),
                      "retries_subgoal": str(t.retries_subgoal), "retries_episode": str(t.retries_episode),
                      "seq": str(t.seq), "transition": json.dumps(t.as_dict())}
            self._publish_status(t.to_state, t.reason, level=_STATUS_LEVEL.get(t.to_state, DiagnosticStatus.OK),
                                 message=f"{t.from_state} -> {t.to_state}", extra=values)
            if t.from_state == "verify" and t.p_fail is not None:
                decision = VerifierVerdict.ACCEPT if t.to_state == "execute" else VerifierVerdict.REJECT
                self._verdict.publish(VerifierVerdict(header=mc.header(self._now_s(), ""), subgoal=t.subgoal,
                                                      p_fail=float(t.p_fail), decision=decision, reason=t.reason))
            goal_handle.publish_feedback(ExecuteTask.Feedback(
                current_subgoal=t.subgoal, subgoal_index=t.subgoal_index, num_subgoals=num_subgoals,
                harness_state=t.to_state, p_fail=float(t.p_fail or 0.0)))
        except (InvalidHandle, RCLError):  # shutdown raced us (Ctrl-C): stop the episode quietly
            self._closing.set()
            self._env.abort("the harness is shutting down")
        except Exception as exc:  # reporting must never take the robot down with it
            self.get_logger().error(f"could not report transition {t.seq}: {type(exc).__name__}: {exc}",
                                    throttle_duration_sec=2.0)

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

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
        if self._env is not None:
            self._env.close()

    def _stall_reason(self) -> str:
        return (f"no world state for {self.get_parameter('stall_timeout_s').value:.1f} s: "
                "the simulator or a sensor node stopped")

    def _world_time(self) -> float:
        return self._world[2] if self._world else 0.0

    # -- outputs -----------------------------------------------------------------------
    def _announce(self, task_id: str, index: int, name: str) -> None:
        self._subgoal_pub.publish(String(data=json.dumps({"task_id": task_id, "index": index, "name": name})))

    def _publish_status(self, state: str, detail: str, level: bytes = DiagnosticStatus.OK, message: str | None = None,
                        extra: dict[str, str] | None = None) -> None:
        status = DiagnosticStatus(level=level, name="helmstack/harness", message=message or state, hardware_id="harness")
        status.values = [KeyValue(key="state", value=state), KeyValue(key="mode", value=self.mode),
                         KeyValue(key="detail", value=detail)]
        status.values += [KeyValue(key=k, value=v) for k, v in (extra or {}).items()]
        self._status.publish(status)


def main() -> int:
    return run_node(HarnessNode, threads=4)


if __name__ == "__main__":
    raise SystemExit(main())
