"""sim_bridge: runs the pybullet robot and speaks the robot's topics (sim:=true only).

Publishes cameras (image_raw, depth, camera_info), LiDAR points, events, tactile arrays,
joint_states, the simulator's ground truth and /clock; executes joint trajectories from
`robot/command` (after the safety node). A lifecycle node: configure builds the
simulator, activate starts the stepping thread. With `autostart` it does both itself.
Physics runs at most `real_time_factor` times real time (<= 0: as fast as it can);
everything is stamped with simulation time.

Snapshots for the HELM harness's rollback: `sim/save_state` and `sim/restore_state`
(helmstack_interfaces/srv) run between two control ticks (they take the stepping lock).
A restore publishes the restored joint_states, ground truth and /clock at once, stamped one
control period after the last published tick (ROS time never runs backwards; the whole
graph's timers and caches follow /clock), and nothing stepped before it is published
after it. At most `max_snapshots` snapshots live at a time: saving one more discards the
oldest, with a warning. A reset (`sim/reset_task`) invalidates every handle.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import rclpy
from rclpy._rclpy_pybind11 import RCLError
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState, PointCloud2
from trajectory_msgs.msg import JointTrajectory

from helmstack_interfaces.msg import EventPacket, TactileArray, WorldState
from helmstack_interfaces.srv import ResetTask, RestoreState, SaveState
from runtime.config import ConfigError, load_config
from runtime.nodes import msg_convert as mc
from runtime.nodes.common import autostart, declare_number, run_node
from sim.backend import PybulletRobot, SimConfig, SimStep
from sim.tasks.suite import UnknownTaskError


class SimBridge(LifecycleNode):
    def __init__(self, **kwargs) -> None:
        super().__init__("sim_bridge", **kwargs)
        self.declare_parameter("config_file", "")
        self.declare_parameter("task_id", "")
        self.declare_parameter("seed", 0)
        declare_number(self, "real_time_factor", 1.0)
        self.declare_parameter("autostart", True)
        # Lockstep: after publishing a tick, wait for the command it causes before stepping
        # on (bounded by lockstep_timeout_s). Used to measure sensor-to-command latency.
        self.declare_parameter("lockstep", False)
        declare_number(self, "lockstep_timeout_s", 1.0)
        self.declare_parameter("max_snapshots", 16)
        self._commanded = threading.Event()
        self._published_at: float | None = None
        self.command_latencies_s: list[float] = []
        self.lockstep_timeouts = 0
        # Simulation time never runs backwards on the ROS side (timers and caches of every
        # node follow /clock): a reset starts the scene at 0, so stamps add an offset.
        self._time_offset_s = 0.0
        self._last_stamp_s = 0.0
        self._command_stamp = None  # header stamp of the last command applied (echoed in ground truth)
        self._episode = 0
        self._robot: PybulletRobot | None = None
        self.setup_error = ""
        self._lock = threading.Lock()  # the simulator: stepping, commands, reset, save/restore
        # Publishing: a tick stepped before a restore or reset is not published after it.
        self._publish_lock = threading.Lock()
        self._generation = 0  # bumped (under _lock) by every restore and reset
        self._snapshots: deque[int] = deque()  # live handles, oldest first
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        if self.get_parameter("autostart").value:
            autostart(self, "configure failed")

    # -- lifecycle ---------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        path = self.get_parameter("config_file").value
        try:
            config = load_config(SimConfig, path or None)
        except ConfigError as exc:
            self.setup_error = f"bad sim config: {exc}"
            self.get_logger().error(self.setup_error)
            return TransitionCallbackReturn.FAILURE
        max_snapshots = self.get_parameter("max_snapshots").value
        if isinstance(max_snapshots, bool) or not isinstance(max_snapshots, int) or max_snapshots < 1:
            self.setup_error = f"sim_bridge: parameter max_snapshots must be an integer >= 1, got {max_snapshots!r}"
            self.get_logger().error(self.setup_error)
            return TransitionCallbackReturn.FAILURE
        self._robot = PybulletRobot(config)
        task_id = self.get_parameter("task_id").value
        if task_id:
            try:
                self._robot.reset(task_id, int(self.get_parameter("seed").value))
            except UnknownTaskError as exc:
                self.setup_error = str(exc)
                self.get_logger().error(self.setup_error)
                return TransitionCallbackReturn.FAILURE
        sensor_qos = qos_profile_sensor_data
        self._pub = {
            "clock": self.create_publisher(Clock, "/clock", 10),
            "joint_states": self.create_publisher(JointState, "joint_states", 10),
            "ground_truth": self.create_publisher(WorldState, "sim/ground_truth", 10),
            "lidar": self.create_publisher(PointCloud2, "lidar/points", sensor_qos),
            "events": self.create_publisher(EventPacket, "events", sensor_qos),
            "tactile": self.create_publisher(TactileArray, "tactile", sensor_qos),
        }
        for cam in ("front", "wrist"):
            self._pub[f"{cam}/image"] = self.create_publisher(Image, f"camera/{cam}/image_raw", sensor_qos)
            self._pub[f"{cam}/depth"] = self.create_publisher(Image, f"camera/{cam}/depth", sensor_qos)
            self._pub[f"{cam}/info"] = self.create_publisher(CameraInfo, f"camera/{cam}/camera_info", sensor_qos)
        self.create_subscription(JointTrajectory, "robot/command", self._on_command, QoSProfile(depth=10))
        self.create_service(ResetTask, "sim/reset_task", self._on_reset)
        self.create_service(SaveState, "sim/save_state", self._on_save_state)
        self.create_service(RestoreState, "sim/restore_state", self._on_restore_state)
        self.get_logger().info(f"simulator ready (task {task_id or 'none yet'})")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="sim_step", daemon=True)
        self._thread.start()
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_thread()
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        self._stop_thread()
        if self._robot is not None:
            self._robot.close()
            self._robot = None

    def _stop_thread(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    # -- callbacks ---------------------------------------------------------------------
    def _on_command(self, msg: JointTrajectory) -> None:
        try:
            names, positions, times = mc.trajectory_from_msg(msg)
            order = [names.index(n) for n in PybulletRobot.joint_names]
        except (mc.MessageError, ValueError) as exc:
            self.get_logger().warning(f"dropped command: {exc}")
            return
        with self._lock:
            if self._robot is not None and self._robot.task_id is not None:
                self._robot.command(positions[:, order], times)
                self._command_stamp = msg.header.stamp
        if self._published_at is not None:
            self.command_latencies_s.append(time.perf_counter() - self._published_at)
            self._published_at = None
            self._commanded.set()

    def _on_reset(self, request: ResetTask.Request, response: ResetTask.Response) -> ResetTask.Response:
        try:
            with self._lock:
                self._robot.reset(request.task_id, int(request.seed))
                self._time_offset_s = self._last_stamp_s
                self._episode += 1
                self._generation += 1
                self._snapshots.clear()  # the backend has invalidated them
                response.episode = self._episode
            response.success, response.message = True, f"loaded {request.task_id} seed {request.seed} (episode {self._episode})"
        except UnknownTaskError as exc:
            response.success, response.message = False, str(exc)
        self.get_logger().info(response.message)
        return response

    def _on_save_state(self, request: SaveState.Request, response: SaveState.Response) -> SaveState.Response:
        response.handle = -1
        max_snapshots = int(self.get_parameter("max_snapshots").value)
        with self._lock:
            if self._robot is None or self._robot.task_id is None:
                response.success, response.message = False, "no task loaded: call sim/reset_task first"
                return response
            handle = self._robot.save_state()
            self._snapshots.append(handle)
            dropped = []
            while len(self._snapshots) > max_snapshots:
                oldest = self._snapshots.popleft()
                self._robot.discard_state(oldest)
                dropped.append(oldest)
            t = self._last_stamp_s
        if dropped:
            self.get_logger().warning(f"more than max_snapshots={max_snapshots} snapshots: discarded the oldest, "
                                      f"handle(s) {dropped}")
        response.success, response.handle = True, handle
        response.message = f"saved state {handle} at t={t:.3f} s"
        self.get_logger().debug(response.message)
        return response

    def _on_restore_state(self, request: RestoreState.Request,
                          response: RestoreState.Response) -> RestoreState.Response:
        with self._lock:
            if self._robot is None or self._robot.task_id is None:
                response.success, response.message = False, "no task loaded: call sim/reset_task first"
                return response
            try:
                step = self._robot.restore_state(int(request.handle))
            except KeyError as exc:
                response.success, response.message = False, exc.args[0] if exc.args else str(exc)
                self.get_logger().warning(f"restore refused: {response.message}")
                return response
            t = self._last_stamp_s + 1.0 / self._robot.config.control_hz
            self._time_offset_s = t - step.sim_time_s
            self._last_stamp_s = t
            self._generation += 1
            episode = self._episode
        with self._publish_lock:
            try:
                self._publish(step, t, episode)
            except RCLError:  # shutting down
                pass
        response.success, response.stamp = True, mc.stamp(t)
        response.message = f"restored state {request.handle} (sim time {step.sim_time_s:.3f} s) at t={t:.3f} s"
        self.get_logger().info(response.message)
        return response

    # -- stepping ----------------------------------------------------------------------
    def _loop(self) -> None:
        rtf = float(self.get_parameter("real_time_factor").value)
        lockstep = bool(self.get_parameter("lockstep").value)
        lockstep_timeout_s = float(self.get_parameter("lockstep_timeout_s").value)
        wall0 = time.monotonic()
        sim0 = None
        while self._running.is_set() and rclpy.ok():
            with self._lock:
                if self._robot is None or self._robot.task_id is None:
                    step = None
                else:
                    step = self._robot.step()
                    t = step.sim_time_s + self._time_offset_s
                    self._last_stamp_s = t
                    episode = self._episode
                    generation = self._generation
            if step is None:
                time.sleep(0.05)
                continue
            self._commanded.clear()
            if lockstep:
                self._published_at = time.perf_counter()
            with self._publish_lock:
                if generation != self._generation:
                    continue  # a restore or reset came in between: this tick's world is gone
                try:
                    self._publish(step, t, episode)
                except RCLError:  # context shut down under us (Ctrl-C): stop stepping
                    break
            if lockstep and not self._commanded.wait(lockstep_timeout_s):
                self.lockstep_timeouts += 1  # a command still arriving before the next tick counts
            if rtf > 0:
                if sim0 is None:
                    sim0, wall0 = t, time.monotonic()
                ahead = (t - sim0) / rtf - (time.monotonic() - wall0)
                if ahead > 0:
                    time.sleep(ahead)

    def _publish(self, s: SimStep, t: float, episode: int) -> None:
        self._pub["clock"].publish(Clock(clock=mc.stamp(t)))
        self._pub["joint_states"].publish(
            mc.joint_state_msg(PybulletRobot.joint_names, s.joint_positions, s.joint_velocities, s.joint_efforts, t)
        )
        self._pub["ground_truth"].publish(
            mc.world_state_msg(s.world.object_poses, s.world.fixture_joints, t, episode, self._command_stamp))
        for cam, frame in s.cameras.items():
            frame_id = f"camera_{cam}_optical_frame"
            self._pub[f"{cam}/image"].publish(mc.image_msg(frame.rgb, "rgb8", t, frame_id))
            self._pub[f"{cam}/depth"].publish(mc.image_msg(frame.depth_m, "32FC1", t, frame_id))
            h, w = frame.depth_m.shape
            self._pub[f"{cam}/info"].publish(mc.camera_info_msg(frame.K, w, h, t, frame_id))
        if s.lidar is not None:
            self._pub["lidar"].publish(mc.pointcloud_msg(s.lidar.points, s.lidar.ring, t, "lidar"))
        if s.events is not None:
            e = s.events
            # Event times are absolute (EventPacket.msg): the same clock as the header.
            self._pub["events"].publish(mc.event_packet_msg(e.x, e.y, e.t_s + (t - s.sim_time_s), e.polarity, e.width,
                                                            e.height, t, "event_camera_optical_frame"))
        if s.tactile is not None:
            self._pub["tactile"].publish(mc.tactile_msg(s.tactile, t, "finger_pads"))


def main() -> int:
    return run_node(SimBridge)


if __name__ == "__main__":
    raise SystemExit(main())
