"""The pybullet robot backend: a TabletopScene with its sensors, driven by joint trajectories.

This is the simulated side of the one robot interface (DESIGN.md rule 2): it accepts
joint-position trajectories (the same thing a ros2_control joint trajectory controller
accepts on the real arm), reports what it executed, and produces the sensor readings that
are due at each control tick, stamped with simulation time. `sim_bridge_node` publishes
them; benchmarks and evaluations call it directly without ROS.

Snapshots (`save_state` / `restore_state` / `discard_state`) are what the HELM harness
rolls back to. A snapshot holds everything the backend's future depends on, so stepping
after a restore reproduces stepping after the save exactly (same commands, same physics,
same sensor readings):

* the scene: pybullet's saved physics state, the sim clock and the held joint targets
  (`TabletopScene.save_state`);
* the active joint trajectory, kept relative to sim time. It is restored rather than
  cleared: the world then resumes exactly as it was at the snapshot (the arm still on
  its way to the chunk's end, not braking to a hold it never made), which makes a rollback
  reproducible and checkable; whoever restored it replaces it with their next command
  anyway, as a trajectory controller does;
* the sensor rate gates, so every sensor fires at the same ticks as after the save;
* the event camera's ESIM state (reference and previous log images, per-pixel last-event
  times): without it the first render after a jump would be compared with a frame from
  another moment and emit a burst of spurious events (or fail, the clock having gone
  back).
The tactile pads keep no state of their own (they read the contacts of the last physics
step, which the physics state restores). Handles are never reused; `reset` invalidates
every snapshot.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import pybullet as p

from sim.panda import JOINT_NAMES
from sim.scene import FRONT_CAMERA_POSE, TabletopScene
from sim.sensors.camera import Camera, CameraConfig, CameraFrame, look_at
from sim.sensors.event_camera import EventCameraConfig, EventCameraSimulator, EventPacket
from sim.sensors.lidar import Lidar, LidarConfig, LidarScan
from sim.sensors.tactile import TactileConfig, panda_finger_pads
from sim.tasks.suite import get_task
from sim.world_state import WorldState

logger = logging.getLogger(__name__)


@dataclass
class SensorRig:
    """Which sensors run and how. Rates are in simulation time."""

    front_camera: CameraConfig = field(default_factory=CameraConfig)
    wrist_camera: CameraConfig = field(default_factory=CameraConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    event_camera: EventCameraConfig = field(default_factory=lambda: EventCameraConfig(render_rate_hz=40.0))
    tactile: TactileConfig = field(default_factory=TactileConfig)
    enable_front_camera: bool = True
    enable_wrist_camera: bool = True
    enable_lidar: bool = True
    enable_event_camera: bool = True
    enable_tactile: bool = True
    # LiDAR on a mast across the table from the robot, looking back at the workspace.
    lidar_position: tuple[float, float, float] = (1.25, 0.0, 0.75)
    lidar_pitch_deg: float = 25.0  # tilt down


@dataclass
class SimConfig:
    physics_hz: int = 240
    control_hz: int = 20
    sensors: SensorRig = field(default_factory=SensorRig)

    def __post_init__(self) -> None:
        if self.physics_hz <= 0 or self.control_hz <= 0:
            raise ValueError(f"SimConfig rates must be > 0, got physics_hz={self.physics_hz}, control_hz={self.control_hz}")
        if self.physics_hz % self.control_hz:
            raise ValueError(f"SimConfig.physics_hz ({self.physics_hz}) must be a multiple of control_hz ({self.control_hz})")


@dataclass
class SimStep:
    """Everything produced by one control tick. Unset sensors were not due this tick."""

    sim_time_s: float
    joint_positions: np.ndarray  # (9,) in JOINT_NAMES order
    joint_velocities: np.ndarray
    joint_efforts: np.ndarray
    world: WorldState
    cameras: dict[str, CameraFrame] = field(default_factory=dict)  # "front" / "wrist"
    camera_poses: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    lidar: LidarScan | None = None
    events: EventPacket | None = None
    tactile: dict[str, np.ndarray] | None = None  # pad name -> (rows, cols) newtons


class _RateGate:
    """Fires every `period_s` of simulation time (first call fires)."""

    def __init__(self, rate_hz: float) -> None:
        self.period_s = 1.0 / rate_hz
        self.next_s = 0.0

    def due(self, now_s: float) -> bool:
        if now_s + 1e-9 < self.next_s:
            return False
        self.next_s = max(self.next_s + self.period_s, now_s)
        return True

    def reset(self) -> None:
        self.next_s = 0.0


@dataclass(frozen=True)
class _Snapshot:
    """What `PybulletRobot.save_state` keeps beside the scene's own saved state."""

    scene_handle: int
    sim_time_s: float
    # (trajectory start - save time, start target, positions, times); None: no trajectory.
    trajectory: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None
    gates_next_s: dict[str, float]
    events: EventCameraSimulator | None  # a private copy, never stepped


class PybulletRobot:
    """A simulated Panda on a tabletop, commanded by joint trajectories."""

    joint_names = JOINT_NAMES

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.scene = TabletopScene(physics_hz=self.config.physics_hz, control_hz=self.config.control_hz)
        rig = self.config.sensors
        cid = self.scene.client_id
        self._front = Camera(rig.front_camera, cid) if rig.enable_front_camera else None
        self._wrist = Camera(rig.wrist_camera, cid) if rig.enable_wrist_camera else None
        self._lidar = Lidar(rig.lidar, cid) if rig.enable_lidar else None
        self._events = EventCameraSimulator(rig.event_camera) if rig.enable_event_camera else None
        self._event_camera = Camera(rig.event_camera.render_camera_config(), cid) if self._events is not None else None
        self._gates: dict[str, _RateGate] = {
            "front": _RateGate(rig.front_camera.rate_hz),
            "wrist": _RateGate(rig.wrist_camera.rate_hz),
            "lidar": _RateGate(rig.lidar.rate_hz),
        }
        self._event_slices = _event_slices(self.config)
        self._tactile = None
        self._trajectory: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._snapshots: dict[int, _Snapshot] = {}
        self._next_handle = 0
        self._retired_below = 0  # handles below this were taken before the last reset
        self.task_id: str | None = None
        self.seed: int | None = None

    # -- episode -------------------------------------------------------------------------
    def reset(self, task_id: str, seed: int) -> SimStep:
        """Load `task_id` with its initial state for `seed`; raises UnknownTaskError."""
        task = get_task(task_id)
        self.scene.reset(task, seed)  # drops the scene's saved states
        self.task_id, self.seed = task_id, seed
        self._trajectory = None
        self._snapshots.clear()
        self._retired_below = self._next_handle
        for gate in self._gates.values():
            gate.reset()
        if self.config.sensors.enable_tactile:
            self._tactile = panda_finger_pads(self.scene.client_id, self.scene.robot_id, self.config.sensors.tactile)
        if self._events is not None:
            self._events.reset()
            self._events.update(self._render_event_frame(), self.scene.sim_time_s)
        q, _, _ = self.scene.joint_state()
        self.scene.apply_joint_targets(q)
        return self._observe()

    # -- commands ------------------------------------------------------------------------
    def command(self, positions: np.ndarray, times_s: np.ndarray) -> None:
        """Follow `positions (T, 9)` reached at `times_s (T,)` after now, interpolating linearly
        from the current target (as a joint trajectory controller does). Replaces any active
        trajectory. The caller (the safety layer) has already checked limits."""
        positions = np.asarray(positions, dtype=np.float64)
        times_s = np.asarray(times_s, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[1] != len(JOINT_NAMES) or times_s.shape != (positions.shape[0],):
            raise ValueError(f"trajectory must be (T, {len(JOINT_NAMES)}) with T times, got {positions.shape} and {times_s.shape}")
        start = self._current_target()
        self._trajectory = (self.scene.sim_time_s, start, positions, times_s)

    def _current_target(self) -> np.ndarray:
        if self._trajectory is None:
            return self.scene.joint_state()[0].copy()
        return self._target_at(self.scene.sim_time_s)

    def _target_at(self, now_s: float) -> np.ndarray:
        t0, start, positions, times_s = self._trajectory
        t = now_s - t0
        knots_t = np.concatenate([[0.0], times_s])
        knots_q = np.vstack([start[None, :], positions])
        if t >= knots_t[-1]:
            return knots_q[-1].copy()
        k = int(np.searchsorted(knots_t, t, side="right")) - 1
        alpha = (t - knots_t[k]) / (knots_t[k + 1] - knots_t[k])
        return (1 - alpha) * knots_q[k] + alpha * knots_q[k + 1]

    # -- stepping ------------------------------------------------------------------------
    def step(self) -> SimStep:
        """Advance one control period; render the event camera at its own rate in between."""
        if self.task_id is None:
            raise RuntimeError("PybulletRobot.step() before reset()")
        t_end = self.scene.sim_time_s + 1.0 / self.config.control_hz
        if self._trajectory is not None:
            self.scene.apply_joint_targets(self._target_at(t_end))
        events = []
        if self._events is not None:
            # Physics in slices of the event camera's render period; ESIM interpolates
            # log intensity between consecutive renders.
            for n in self._event_slices:
                self.scene.step_physics(n / self.config.physics_hz)
                events.append(self._events.update(self._render_event_frame(), self.scene.sim_time_s))
        else:
            self.scene.step_control()
        out = self._observe()
        if events:
            out.events = _concat_events(events, self.config.sensors.event_camera)
        return out

    # -- snapshots -----------------------------------------------------------------------
    def save_state(self) -> int:
        """Snapshot everything the backend's future depends on (module docstring); returns
        a handle for `restore_state` / `discard_state`. Handles are never reused."""
        if self.task_id is None:
            raise RuntimeError("PybulletRobot.save_state() before reset(): there is no episode to snapshot")
        now = self.scene.sim_time_s
        trajectory = None
        if self._trajectory is not None:
            t0, start, positions, times_s = self._trajectory
            trajectory = (t0 - now, start.copy(), positions.copy(), times_s.copy())
        handle = self._next_handle
        self._next_handle += 1
        self._snapshots[handle] = _Snapshot(
            scene_handle=self.scene.save_state(),
            sim_time_s=now,
            trajectory=trajectory,
            gates_next_s={name: gate.next_s for name, gate in self._gates.items()},
            events=copy.deepcopy(self._events),
        )
        logger.debug("saved state %d at sim time %.3f s", handle, now)
        return handle

    def restore_state(self, handle: int) -> SimStep:
        """Return to the snapshot `handle` (taken since the last reset) and report the
        restored joint and world state (no camera/LiDAR frame: none was due then). The
        snapshot stays valid: it can be restored again."""
        snap = self._snapshot(handle)
        self.scene.restore_state(snap.scene_handle)
        now = self.scene.sim_time_s
        self._trajectory = None
        if snap.trajectory is not None:
            offset, start, positions, times_s = snap.trajectory
            self._trajectory = (now + offset, start.copy(), positions.copy(), times_s.copy())
        for name, next_s in snap.gates_next_s.items():
            self._gates[name].next_s = next_s
        # Stepping must never advance the saved copy, or a second restore would differ.
        self._events = copy.deepcopy(snap.events)
        logger.debug("restored state %d (sim time %.3f s)", handle, now)
        return self._observe(sensors=False)

    def discard_state(self, handle: int) -> None:
        """Free the snapshot `handle`."""
        snap = self._snapshot(handle)
        del self._snapshots[handle]
        self.scene.discard_state(snap.scene_handle)

    @property
    def state_handles(self) -> list[int]:
        """Live snapshot handles, oldest first."""
        return sorted(self._snapshots)

    def _snapshot(self, handle: int) -> _Snapshot:
        if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)):
            raise KeyError(f"state handle must be an int, got {handle!r}")
        handle = int(handle)
        snap = self._snapshots.get(handle)
        if snap is not None:
            return snap
        if 0 <= handle < self._retired_below:
            why = "it was taken before the last reset (a reset invalidates every snapshot)"
        elif 0 <= handle < self._next_handle:
            why = "it was discarded"
        else:
            why = "no snapshot was given this handle"
        raise KeyError(f"unknown state handle {handle}: {why}; live handles: {self.state_handles}")

    def _observe(self, sensors: bool = True) -> SimStep:
        now = self.scene.sim_time_s
        q, dq, tau = self.scene.joint_state()
        out = SimStep(now, q, dq, tau, self.scene.world_state())
        if not sensors:
            return out
        if self._front is not None and self._gates["front"].due(now):
            pose = _optical_pose_look_at(*FRONT_CAMERA_POSE)
            out.cameras["front"] = self._front.render(*pose)
            out.camera_poses["front"] = pose
        if self._wrist is not None and self._gates["wrist"].due(now):
            pose = self._wrist_optical_pose()
            out.cameras["wrist"] = self._wrist.render(*pose)
            out.camera_poses["wrist"] = pose
        if self._lidar is not None and self._gates["lidar"].due(now):
            out.lidar = self._lidar.scan(*self.lidar_pose(), ignore_body_ids=(self.scene.robot_id,))
        if self._tactile is not None:
            out.tactile = {name: pad.read() for name, pad in zip(("left_finger_pad", "right_finger_pad"), self._tactile)}
        return out

    def lidar_pose(self) -> tuple[np.ndarray, np.ndarray]:
        rig = self.config.sensors
        # LiDAR frame x forward: face -x (towards the robot), pitched down.
        quat = p.getQuaternionFromEuler([0.0, np.deg2rad(rig.lidar_pitch_deg), np.pi])
        return np.asarray(rig.lidar_position, dtype=np.float64), np.asarray(quat, dtype=np.float64)

    def _wrist_optical_pose(self) -> tuple[np.ndarray, np.ndarray]:
        # The panda_hand frame has z along the approach direction: the optical axis.
        pos, quat = self.scene.link_pose("panda_hand")
        offset = np.array([0.05, 0.0, 0.0])  # 5 cm off the hand's centre, towards +x
        rot = np.array(p.getMatrixFromQuaternion(quat)).reshape(3, 3)
        return np.asarray(pos) + rot @ offset, np.asarray(quat)

    def _render_event_frame(self) -> np.ndarray:
        frame = self._event_camera.render(*_optical_pose_look_at(*FRONT_CAMERA_POSE))
        return frame.rgb

    def close(self) -> None:
        self.scene.close()


def _event_slices(config: SimConfig) -> list[int]:
    """Physics substeps between event-camera renders within one control period: the render
    rate is rounded to a whole number of renders per control tick (at least one)."""
    substeps = config.physics_hz // config.control_hz
    renders = int(min(substeps, max(1, round(config.sensors.event_camera.render_rate_hz / config.control_hz))))
    edges = np.linspace(0, substeps, renders + 1).round().astype(int)
    return [int(b - a) for a, b in zip(edges[:-1], edges[1:])]


def _optical_pose_look_at(eye, target) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(eye, dtype=np.float64), np.asarray(look_at(eye, target), dtype=np.float64)


def _concat_events(packets: list[EventPacket], cfg: EventCameraConfig) -> EventPacket:
    return EventPacket(
        x=np.concatenate([e.x for e in packets]),
        y=np.concatenate([e.y for e in packets]),
        t_s=np.concatenate([e.t_s for e in packets]),
        polarity=np.concatenate([e.polarity for e in packets]),
        width=cfg.width,
        height=cfg.height,
    )
