"""safety: the last stop before the robot, in simulation and on hardware.

`robot/command_raw` (JointTrajectory) → limits / NaN / rate checks (real.safety) →
`robot/command`. Robots whose gripper has its own controller set `gripper_joints`: those
joints then go to `robot/gripper_command` and the rest to `robot/command`. No command
within `watchdog_timeout_s` → a hold command at the measured position. `robot/estop` (std_msgs/Bool): true latches the e-stop and holds, false releases.
Health goes to /diagnostics.
"""
from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool
from trajectory_msgs.msg import JointTrajectory

from real.safety import SafetyConfig, SafetyFilter, Verdict, Watchdog
from runtime.config import load_config
from runtime.nodes import msg_convert as mc
from runtime.nodes.common import NodeSetupError, declare_number, run_node

HOLD_TIME_S = 0.1  # the hold point's time_from_start


class SafetyNode(Node):
    def __init__(self) -> None:
        super().__init__("safety")
        self.declare_parameter("config_file", "")
        declare_number(self, "check_rate_hz", 50.0)
        self.declare_parameter("gripper_joints", Parameter.Type.STRING_ARRAY)  # unset: one command topic
        path = self.get_parameter("config_file").value
        if not path:
            raise NodeSetupError("safety: parameter config_file (joint limits YAML) is required")
        self.filter = SafetyFilter(load_config(SafetyConfig, path))
        self.watchdog = Watchdog(self.filter.config.watchdog_timeout_s)
        self._q: np.ndarray | None = None
        self._counts = {v.value: 0 for v in Verdict}
        self._last_reason = ""
        self._pub = self.create_publisher(JointTrajectory, "robot/command", QoSProfile(depth=10))
        names = list(self.filter.config.joint_names)
        try:
            gripper = list(self.get_parameter("gripper_joints").value)
        except ParameterUninitializedException:
            gripper = []
        unknown = [j for j in gripper if j not in names]
        if unknown:
            raise NodeSetupError(f"safety: gripper_joints {unknown} are not in the safety config's joint_names {names}")
        self._arm_idx = [i for i, n in enumerate(names) if n not in gripper]
        self._gripper_idx = [names.index(j) for j in gripper]
        self._gripper_pub = (self.create_publisher(JointTrajectory, "robot/gripper_command", QoSProfile(depth=10))
                             if gripper else None)
        self._diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(JointTrajectory, "robot/command_raw", self._on_command, 10)
        self.create_subscription(JointState, "joint_states", self._on_joint_states, 10)
        self.create_subscription(Bool, "robot/estop", self._on_estop, 10)
        self.create_timer(1.0 / self.get_parameter("check_rate_hz").value, self._check_watchdog)
        self.create_timer(1.0, self._publish_diagnostics)

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_joint_states(self, msg: JointState) -> None:
        try:
            self._q = mc.joint_positions_from_msg(msg, self.filter.config.joint_names)
        except mc.MessageError as exc:
            self.get_logger().warning(f"dropped joint_states: {exc}", throttle_duration_sec=2.0)

    def _on_command(self, msg: JointTrajectory) -> None:
        self.watchdog.feed(self._now_s())
        try:
            names, positions, times = mc.trajectory_from_msg(msg)
        except mc.MessageError as exc:
            self._record(Verdict.REJECTED, str(exc))
            self._hold()
            return
        decision = self.filter.filter(names, positions, times, self._q)
        self._record(decision.verdict, "; ".join(decision.reasons))
        if decision.verdict is Verdict.REJECTED:
            self._hold()
            return
        # The checked trajectory keeps its sender's stamp: the sender recognises its own
        # command by it when the robot reports what it took on (WorldState.command_stamp).
        self._send(decision.positions, decision.times_s, msg.header.stamp)

    def _record(self, verdict: Verdict, reason: str) -> None:
        self._counts[verdict.value] += 1
        if verdict is not Verdict.PASSED:
            self._last_reason = reason
            # rclpy ties throttling state to the call site, so one call site per severity.
            if verdict is Verdict.REJECTED:
                self.get_logger().error(f"command rejected: {reason}", throttle_duration_sec=1.0)
            else:
                self.get_logger().warning(f"command clipped: {reason}", throttle_duration_sec=5.0)

    def _on_estop(self, msg: Bool) -> None:
        if bool(msg.data) != self.filter.estop_engaged:
            self.filter.estop_engaged = bool(msg.data)
            self.get_logger().warning("E-STOP ENGAGED: holding" if msg.data else "e-stop released")
        if msg.data:
            self._hold()

    def _check_watchdog(self) -> None:
        if self.watchdog.check(self._now_s()):
            self.get_logger().warning(f"no command for {self.watchdog.timeout_s} s: holding")
            self._hold()

    def _hold(self) -> None:
        if self._q is None:
            return
        self._send(self.filter.hold(self._q), np.array([HOLD_TIME_S]))

    def _send(self, positions: np.ndarray, times_s: np.ndarray, stamp=None) -> None:
        """Publish a checked trajectory (stamped `stamp`, or now for the node's own holds):
        one topic, or arm and gripper topics when split."""
        names = self.filter.config.joint_names
        messages = [(self._pub, names, positions)] if self._gripper_pub is None else [
            (self._pub, [names[i] for i in self._arm_idx], positions[:, self._arm_idx]),
            (self._gripper_pub, [names[i] for i in self._gripper_idx], positions[:, self._gripper_idx])]
        for publisher, joint_names, points in messages:
            msg = mc.trajectory_msg(joint_names, points, times_s, self._now_s())
            if stamp is not None:
                msg.header.stamp = stamp
            publisher.publish(msg)

    def _publish_diagnostics(self) -> None:
        level = DiagnosticStatus.ERROR if self.filter.estop_engaged else (
            DiagnosticStatus.WARN if self.watchdog.holding else DiagnosticStatus.OK)
        status = DiagnosticStatus(level=level, name="helmstack/safety", message=self._last_reason or "ok", hardware_id="arm")
        status.values = [KeyValue(key=k, value=str(v)) for k, v in self._counts.items()]
        status.values += [
            KeyValue(key="estop", value=str(self.filter.estop_engaged)),
            KeyValue(key="watchdog_holding", value=str(self.watchdog.holding)),
        ]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag.publish(msg)


def main() -> int:
    return run_node(SafetyNode)


if __name__ == "__main__":
    raise SystemExit(main())
