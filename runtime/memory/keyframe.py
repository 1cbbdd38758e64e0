"""Keyframe records of the Episodic Memory Module (EMM).

HELM writes a keyframe at subgoal boundaries, gripper open/close events and verifier
alarms (plus manual marks). A keyframe's key is its image embedding and the embedding of
the subgoal text; its value is what the verifier and the harness controller need later:
robot and object states, the simulator's state handle (a rollback target in sim), and
whether the keyframe was confirmed good (`verified`), which makes it a rollback target.

Records are immutable and validated on construction, so a bad value is refused where it
enters (a ValueError naming the field) instead of surfacing later as a wrong retrieval.
`to_record` / `from_record` convert everything except the embeddings to and from a
JSON-serialisable dict; the store keeps embeddings in matrices of its own.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("subgoal_boundary", "gripper_event", "verifier_alarm", "manual")

# A quaternion further than this from unit norm is a caller bug (e.g. wxyz/xyzw mix-ups keep
# the norm, but a raw rotation-matrix row or a zero vector does not).
_QUATERNION_NORM_TOLERANCE = 1e-3


def _vector(value: ArrayLike, name: str, length: int | None = None, dtype: type = np.float64) -> NDArray:
    """A finite, read-only 1-D copy of `value`; ValueError naming `name` otherwise."""
    try:
        array = np.array(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric vector, got {value!r}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} must have {length} elements, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist() if array.size <= 8 else 'non-finite entries'}")
    array.flags.writeable = False
    return array


def _quaternion(value: ArrayLike, name: str) -> NDArray[np.float64]:
    quat = _vector(value, name, 4)
    norm = float(np.linalg.norm(quat))
    if abs(norm - 1.0) > _QUATERNION_NORM_TOLERANCE:
        raise ValueError(f"{name} must be a unit quaternion (x, y, z, w), got norm {norm:.6g}: {quat.tolist()}")
    return quat


def _finite_number(value: Any, name: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return number


@dataclass(frozen=True, eq=False)
class RobotState:
    """Robot state at the keyframe (metres, radians; quaternion xyzw, world frame)."""

    joint_positions: NDArray[np.float64]  # (n_joints,)
    ee_position: NDArray[np.float64]  # (3,)
    ee_quaternion: NDArray[np.float64]  # (4,) xyzw
    gripper_width: float  # metres between the fingers

    def __post_init__(self) -> None:
        object.__setattr__(self, "joint_positions", _vector(self.joint_positions, "robot.joint_positions"))
        object.__setattr__(self, "ee_position", _vector(self.ee_position, "robot.ee_position", 3))
        object.__setattr__(self, "ee_quaternion", _quaternion(self.ee_quaternion, "robot.ee_quaternion"))
        object.__setattr__(self, "gripper_width", _finite_number(self.gripper_width, "robot.gripper_width", 0.0))

    def to_record(self) -> dict[str, Any]:
        return {"joint_positions": self.joint_positions.tolist(), "ee_position": self.ee_position.tolist(),
                "ee_quaternion": self.ee_quaternion.tolist(), "gripper_width": self.gripper_width}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RobotState) and self.to_record() == other.to_record()

    __hash__ = None  # type: ignore[assignment]  # compared by value, holds arrays


@dataclass(frozen=True, eq=False)
class ObjectPose:
    """Pose of a named object (metres; quaternion xyzw, world frame)."""

    position: NDArray[np.float64]  # (3,)
    quaternion: NDArray[np.float64]  # (4,) xyzw

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", _vector(self.position, "position", 3))
        object.__setattr__(self, "quaternion", _quaternion(self.quaternion, "quaternion"))

    def to_record(self) -> dict[str, Any]:
        return {"position": self.position.tolist(), "quaternion": self.quaternion.tolist()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPose) and self.to_record() == other.to_record()

    __hash__ = None  # type: ignore[assignment]  # compared by value, holds arrays


def _object_pose(name: str, value: Any) -> ObjectPose:
    """Accept an ObjectPose, a (position, quaternion) pair as `sim.world_state` gives it, or
    a {"position", "quaternion"} mapping; errors name `objects.<name>`."""
    try:
        if isinstance(value, ObjectPose):
            return value
        if isinstance(value, Mapping):
            return ObjectPose(value["position"], value["quaternion"])
        position, quaternion = value
        return ObjectPose(position, quaternion)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"objects.{name}: expected (position (3,), quaternion xyzw (4,)), got {value!r} ({exc})") from exc


def _relative_image_path(value: Any) -> str | None:
    """The image path must stay inside the store directory: relative, no '..'."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"image_path must be a non-empty string or None, got {value!r}")
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"image_path must be relative to the store directory without '..', got {value!r}")
    return posix.as_posix()


@dataclass(frozen=True, eq=False)
class Keyframe:
    """One episodic-memory entry. Embeddings are stored as float32 (the index's precision)."""

    episode: str
    step: int  # control-step index within the episode
    sim_time_s: float  # simulated (or robot) time of the keyframe, seconds
    kind: str  # one of KINDS
    subgoal: str  # the subgoal text the text embedding encodes
    image_embedding: NDArray[np.float32]  # (D_img,)
    text_embedding: NDArray[np.float32]  # (D_txt,)
    robot: RobotState
    objects: Mapping[str, ObjectPose] = field(default_factory=dict)
    verified: bool = False  # confirmed good by the verifier/controller: a rollback target
    sim_state: int | str | None = None  # opaque handle from the sim backend; never interpreted here
    image_path: str | None = None  # relative to the store directory
    meta: Mapping[str, Any] = field(default_factory=dict)  # JSON-serialisable extras

    def __post_init__(self) -> None:
        if not isinstance(self.episode, str) or not self.episode:
            raise ValueError(f"episode must be a non-empty string, got {self.episode!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, np.integer)) or self.step < 0:
            raise ValueError(f"step must be an integer >= 0, got {self.step!r}")
        object.__setattr__(self, "step", int(self.step))
        object.__setattr__(self, "sim_time_s", _finite_number(self.sim_time_s, "sim_time_s", 0.0))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not isinstance(self.subgoal, str):
            raise ValueError(f"subgoal must be a string, got {self.subgoal!r}")
        if not isinstance(self.verified, (bool, np.bool_)):
            raise ValueError(f"verified must be a bool, got {self.verified!r}")
        object.__setattr__(self, "verified", bool(self.verified))
        for name in ("image_embedding", "text_embedding"):
            embedding = _vector(getattr(self, name), name, dtype=np.float32)
            # A zero vector has no direction: cosine similarity is undefined for it.
            if not np.any(embedding):
                raise ValueError(f"{name} must be non-zero (cosine similarity needs a direction)")
            object.__setattr__(self, name, embedding)
        if not isinstance(self.robot, RobotState):
            raise ValueError(f"robot must be a RobotState, got {type(self.robot).__name__}")
        if not isinstance(self.objects, Mapping):
            raise ValueError(f"objects must be a mapping name -> pose, got {self.objects!r}")
        objects: dict[str, ObjectPose] = {}
        for name, pose in self.objects.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"objects: names must be non-empty strings, got {name!r}")
            objects[name] = _object_pose(name, pose)
        object.__setattr__(self, "objects", objects)
        # bool is an int subclass: a True handle is almost certainly a mistake.
        handle = self.sim_state
        if handle is not None and (isinstance(handle, bool) or not isinstance(handle, (int, str))):
            raise ValueError(f"sim_state must be an int or str handle or None, got {self.sim_state!r}")
        object.__setattr__(self, "image_path", _relative_image_path(self.image_path))
        if not isinstance(self.meta, Mapping):
            raise ValueError(f"meta must be a mapping, got {self.meta!r}")
        try:
            # Round-trip through JSON: what is kept is exactly what a save/load gives back.
            meta = json.loads(json.dumps(dict(self.meta), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta must be JSON-serialisable (finite numbers, string keys): {exc}") from exc
        object.__setattr__(self, "meta", meta)

    def to_record(self) -> dict[str, Any]:
        """Everything but the embeddings, as a JSON-serialisable dict (floats round-trip exactly)."""
        return {
            "episode": self.episode, "step": self.step, "sim_time_s": self.sim_time_s, "kind": self.kind,
            "subgoal": self.subgoal, "verified": self.verified, "robot": self.robot.to_record(),
            "objects": {name: pose.to_record() for name, pose in self.objects.items()},
            "sim_state": self.sim_state, "image_path": self.image_path, "meta": self.meta,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], image_embedding: ArrayLike, text_embedding: ArrayLike) -> Keyframe:
        """Inverse of `to_record`; a missing or unknown field is a ValueError naming it."""
        if not isinstance(record, Mapping):
            raise ValueError(f"keyframe record must be a mapping, got {type(record).__name__}")
        expected = {"episode", "step", "sim_time_s", "kind", "subgoal", "verified", "robot", "objects",
                    "sim_state", "image_path", "meta"}
        missing, unknown = sorted(expected - set(record)), sorted(set(record) - expected)
        if missing or unknown:
            raise ValueError(f"keyframe record: missing field(s) {missing}, unknown field(s) {unknown}")
        robot = record["robot"]
        if not isinstance(robot, Mapping):
            raise ValueError(f"robot must be a mapping, got {robot!r}")
        try:
            robot_state = RobotState(**robot)
        except TypeError as exc:
            raise ValueError(f"robot: {exc}") from exc
        fields = {name: record[name] for name in expected - {"robot"}}
        return cls(robot=robot_state, image_embedding=image_embedding, text_embedding=text_embedding, **fields)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Keyframe) and self.to_record() == other.to_record()
                and np.array_equal(self.image_embedding, other.image_embedding)
                and np.array_equal(self.text_embedding, other.text_embedding))

    __hash__ = None  # type: ignore[assignment]  # compared by value, holds arrays
