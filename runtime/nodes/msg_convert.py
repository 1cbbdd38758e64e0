"""Conversions between ROS 2 messages and the numpy/dataclass types the cores use.

Every `*_from_msg` validates what it reads and raises MessageError with a reason, so a
node can log the reason, drop the message and keep running (DESIGN.md rule 5).
"""
from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import Pose
from sensor_msgs.msg import CameraInfo, Image, JointState, PointCloud2, PointField
from std_msgs.msg import Header
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from helmstack_interfaces.msg import EventPacket as EventPacketMsg
from helmstack_interfaces.msg import TactileArray, WorldState as WorldStateMsg
from sim.world_state import WorldState


class MessageError(ValueError):
    """A received message cannot be used; the text says why."""


# -- time -------------------------------------------------------------------------------
def stamp(t_s: float) -> Time:
    sec = int(np.floor(t_s))
    return Time(sec=sec, nanosec=int(round((t_s - sec) * 1e9)) % 1_000_000_000)


def to_seconds(t: Time | Duration) -> float:
    return t.sec + t.nanosec * 1e-9


def duration(t_s: float) -> Duration:
    sec = int(np.floor(t_s))
    return Duration(sec=sec, nanosec=int(round((t_s - sec) * 1e9)) % 1_000_000_000)


def header(t_s: float, frame_id: str) -> Header:
    return Header(stamp=stamp(t_s), frame_id=frame_id)


# -- images -----------------------------------------------------------------------------
_ENCODINGS = {"rgb8": (np.uint8, 3), "mono8": (np.uint8, 1), "32FC1": (np.float32, 1)}


def image_msg(array: np.ndarray, encoding: str, t_s: float, frame_id: str) -> Image:
    dtype, channels = _ENCODINGS[encoding]
    array = np.ascontiguousarray(array, dtype=dtype)
    h, w = array.shape[:2]
    msg = Image(header=header(t_s, frame_id), height=h, width=w, encoding=encoding, is_bigendian=0)
    msg.step = w * channels * np.dtype(dtype).itemsize
    msg.data = array.tobytes()
    return msg


def image_from_msg(msg: Image, expected_encoding: str, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an Image to (H, W[, C]); wrong encoding/size/length → MessageError."""
    if msg.encoding != expected_encoding:
        raise MessageError(f"image encoding {msg.encoding!r}, expected {expected_encoding!r}")
    if expected_size is not None and (msg.height, msg.width) != tuple(expected_size):
        raise MessageError(f"image size {msg.height}x{msg.width}, expected {expected_size[0]}x{expected_size[1]}")
    dtype, channels = _ENCODINGS[expected_encoding]
    row = msg.width * channels * np.dtype(dtype).itemsize
    if msg.height == 0 or msg.width == 0 or msg.step != row or len(msg.data) != row * msg.height:
        raise MessageError(f"image data length {len(msg.data)} does not match {msg.height}x{msg.width} {msg.encoding} (step {msg.step})")
    array = np.frombuffer(bytes(msg.data), dtype=dtype).reshape(msg.height, msg.width, channels)
    if dtype == np.float32 and not np.all(np.isfinite(array) | np.isinf(array)):
        raise MessageError("depth image contains NaN")
    return array[..., 0] if channels == 1 else array


def camera_info_msg(K: np.ndarray, width: int, height: int, t_s: float, frame_id: str) -> CameraInfo:
    msg = CameraInfo(header=header(t_s, frame_id), width=width, height=height, distortion_model="plumb_bob")
    msg.k = [float(v) for v in np.asarray(K, dtype=np.float64).reshape(-1)]
    msg.d = [0.0] * 5
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    P = np.zeros((3, 4))
    P[:, :3] = K
    msg.p = [float(v) for v in P.reshape(-1)]
    return msg


# -- point clouds -----------------------------------------------------------------------
def pointcloud_msg(points: np.ndarray, ring: np.ndarray, t_s: float, frame_id: str) -> PointCloud2:
    """(N, 3) float32 xyz + (N,) uint16 ring → PointCloud2 (the usual LiDAR driver layout)."""
    n = int(points.shape[0])
    cloud = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("ring", "<u2")])
    cloud["x"], cloud["y"], cloud["z"] = points[:, 0], points[:, 1], points[:, 2]
    cloud["ring"] = ring
    fields = [
        PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1),
        PointField(name="y", offset=4, datatype=PointField.FLOAT32, count=1),
        PointField(name="z", offset=8, datatype=PointField.FLOAT32, count=1),
        PointField(name="ring", offset=12, datatype=PointField.UINT16, count=1),
    ]
    return PointCloud2(
        header=header(t_s, frame_id), height=1, width=n, fields=fields, is_bigendian=False,
        point_step=cloud.dtype.itemsize, row_step=cloud.dtype.itemsize * n, data=cloud.tobytes(), is_dense=True,
    )


def points_from_msg(msg: PointCloud2) -> np.ndarray:
    """PointCloud2 with float32 x, y, z fields → (N, 3) float32."""
    offsets = {f.name: f.offset for f in msg.fields if f.datatype == PointField.FLOAT32}
    if not {"x", "y", "z"} <= set(offsets):
        raise MessageError(f"point cloud lacks float32 x/y/z fields: {[f.name for f in msg.fields]}")
    n = msg.width * msg.height
    if len(msg.data) != n * msg.point_step:
        raise MessageError(f"point cloud data length {len(msg.data)} != {n} points x {msg.point_step} bytes")
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(n, msg.point_step)
    cols = [raw[:, offsets[a]:offsets[a] + 4].copy().view("<f4")[:, 0] for a in "xyz"]
    return np.stack(cols, axis=1)


# -- joints and trajectories ------------------------------------------------------------
def joint_state_msg(names, positions, velocities, efforts, t_s: float) -> JointState:
    return JointState(
        header=header(t_s, ""), name=list(names),
        position=[float(v) for v in positions], velocity=[float(v) for v in velocities], effort=[float(v) for v in efforts],
    )


def joint_positions_from_msg(msg: JointState, names) -> np.ndarray:
    """Positions in `names` order; missing joints or non-finite values → MessageError."""
    if len(msg.position) != len(msg.name):
        raise MessageError(f"joint_states has {len(msg.name)} names but {len(msg.position)} positions")
    index = {n: i for i, n in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise MessageError(f"joint_states lacks joints {missing}")
    q = np.array([msg.position[index[n]] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(q)):
        raise MessageError("joint_states contains non-finite positions")
    return q


def trajectory_msg(names, positions: np.ndarray, times_s: np.ndarray, t_s: float) -> JointTrajectory:
    msg = JointTrajectory(header=header(t_s, ""), joint_names=list(names))
    msg.points = [
        JointTrajectoryPoint(positions=[float(v) for v in q], time_from_start=duration(float(t)))
        for q, t in zip(np.asarray(positions), np.asarray(times_s))
    ]
    return msg


def trajectory_from_msg(msg: JointTrajectory) -> tuple[list[str], np.ndarray, np.ndarray]:
    """→ (joint names, positions (T, n), times (T,)). Shape problems → MessageError;
    value problems (NaN, limits) are the safety filter's job, so they pass through."""
    n = len(msg.joint_names)
    if n == 0 or not msg.points:
        raise MessageError("trajectory has no joints or no points")
    bad = [i for i, pt in enumerate(msg.points) if len(pt.positions) != n]
    if bad:
        raise MessageError(f"trajectory points {bad} do not have {n} positions")
    positions = np.array([list(pt.positions) for pt in msg.points], dtype=np.float64)
    times = np.array([to_seconds(pt.time_from_start) for pt in msg.points], dtype=np.float64)
    return list(msg.joint_names), positions, times


# -- helmstack interfaces ---------------------------------------------------------------
def stamp_ns(t: Time) -> int:
    """A stamp as integer nanoseconds: exact, so stamps can be compared for equality."""
    return int(t.sec) * 1_000_000_000 + int(t.nanosec)


def world_state_msg(object_poses: dict, fixture_joints: dict, t_s: float, episode: int = 0,
                    command_stamp: Time | None = None) -> WorldStateMsg:
    msg = WorldStateMsg(header=header(t_s, "world"), episode=int(episode))
    if command_stamp is not None:
        msg.command_stamp = command_stamp
    msg.object_names = list(object_poses)
    msg.object_poses = [_pose(pos, quat) for pos, quat in object_poses.values()]
    msg.joint_names = list(fixture_joints)
    msg.joint_positions = [float(v) for v in fixture_joints.values()]
    return msg


def world_state_from_msg(msg: WorldStateMsg) -> tuple[dict, dict, float]:
    """→ (object poses {name: (pos (3,), quat xyzw (4,))}, fixture joints {name: m}, t_s)."""
    if len(msg.object_names) != len(msg.object_poses) or len(msg.joint_names) != len(msg.joint_positions):
        raise MessageError("world state names and values differ in length")
    poses = {}
    for name, pose in zip(msg.object_names, msg.object_poses):
        pos = np.array([pose.position.x, pose.position.y, pose.position.z])
        quat = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w])
        if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(quat))):
            raise MessageError(f"world state pose of {name!r} is not finite")
        poses[name] = (pos, quat)
    joints = dict(zip(msg.joint_names, (float(v) for v in msg.joint_positions)))
    return poses, joints, to_seconds(msg.header.stamp)


def world_state_from_parts(poses: dict, joints: dict, q: np.ndarray, t_s: float, kinematics) -> WorldState:
    """The WorldState the cores use, from world_state_from_msg()'s parts and joint positions."""
    return WorldState.from_observation(list(poses), list(poses.values()), list(joints), list(joints.values()), q, t_s, kinematics)


def _pose(pos, quat) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in pos)
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(v) for v in quat)
    return pose


def event_packet_msg(x, y, t_s_array, polarity, width: int, height: int, t_s: float, frame_id: str) -> EventPacketMsg:
    msg = EventPacketMsg(header=header(t_s, frame_id), width=int(width), height=int(height))
    msg.x = np.asarray(x, dtype=np.uint16)
    msg.y = np.asarray(y, dtype=np.uint16)
    msg.t_ns = np.round(np.asarray(t_s_array, dtype=np.float64) * 1e9).astype(np.int64)
    msg.polarity = np.asarray(polarity, dtype=np.int8)
    return msg


def tactile_msg(pads: dict[str, np.ndarray], t_s: float, frame_id: str) -> TactileArray:
    grids = list(pads.values())
    rows, cols = grids[0].shape
    msg = TactileArray(header=header(t_s, frame_id), sensor_names=list(pads), rows=rows, cols=cols)
    msg.forces = np.concatenate([g.astype(np.float32).reshape(-1) for g in grids])
    return msg
