"""Episodic memory as the HELM harness uses it: the controller's keyframe store and the
state verifier's retrieval, over one `EpisodicMemory` and one image-text encoder.

The controller writes keyframes (episode and subgoal starts: verified rollback targets
with a simulator handle; alarms and failures: unverified), the environment adds gripper
events, and the verifier asks for the k keyframes of the current episode most similar to
now: the query is the current camera image's embedding together with the current
subgoal text's embedding, the same combined key the keyframes were stored under
(runtime.memory.store). Embeddings come from an `ImageTextEncoder` (perception.encoder's
ClipEncoder: our in-domain open_clip model or a user's CLIP checkpoint).

`HelmMemory` implements `runtime.harness_controller.KeyframeStore` and
`runtime.state_verifier.MemoryContext`; keyframes keep what the verifier reads of them
(a `KeyframeView`) so retrieval never re-parses stored records. Core module: no ROS.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from policies.base import Observation
from runtime.memory import EpisodicMemory, Keyframe, MemoryConfig
from runtime.memory.keyframe import ObjectPose, RobotState
from runtime.state_verifier import KEYFRAME_KINDS, KeyframeView, VerifierInputError
from sim.world_state import WorldState

logger = logging.getLogger(__name__)

# Controller / environment kinds -> the memory's kinds (runtime.memory.keyframe.KINDS).
MEMORY_KIND = {"episode_start": "subgoal_boundary", "subgoal_start": "subgoal_boundary",
               "gripper_close": "gripper_event", "gripper_open": "gripper_event",
               "alarm": "verifier_alarm", "failure": "verifier_alarm"}


FINGER_CLOSED_BELOW_M = 0.02  # commanded mean finger opening (m) below which the gripper is closing


class GripperEvents:
    """Gripper open/close events of the commanded finger targets, for keyframes: an event is
    a change of state between consecutive commanded rows (the first row of an episode, or of
    a restored state, only sets the state). Both harness environments use it, so in-process
    and ROS episodes write the same keyframes."""

    def __init__(self) -> None:
        self.closed: bool | None = None

    def reset(self) -> None:
        self.closed = None

    def update(self, finger_targets: NDArray[np.float64]) -> str | None:
        """One commanded row's finger targets -> "close", "open" or None."""
        closed = bool(np.mean(finger_targets) < FINGER_CLOSED_BELOW_M)
        previous, self.closed = self.closed, closed
        if previous is None or previous == closed:
            return None
        return "close" if closed else "open"


class ImageTextEncoder(Protocol):
    embedding_dim: int

    def encode_images(self, images: NDArray[np.uint8]) -> NDArray[np.float32]: ...

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]: ...


@dataclass(frozen=True)
class RollbackTarget:
    """What the controller's ROLLBACK needs of a verified keyframe."""

    handle: Any
    subgoal_index: int


def memory_config_for(encoder: ImageTextEncoder, **overrides: Any) -> MemoryConfig:
    dim = int(encoder.embedding_dim)
    return MemoryConfig(image_dim=dim, text_dim=dim, **overrides)


class HelmMemory:
    """KeyframeStore + MemoryContext over an EpisodicMemory (see the module docstring)."""

    def __init__(self, encoder: ImageTextEncoder, memory: EpisodicMemory | None = None, camera: str = "front",
                 control_hz: float = 20.0) -> None:
        self.encoder = encoder
        self.memory = memory if memory is not None else EpisodicMemory(memory_config_for(encoder))
        if self.memory.config.image_dim != encoder.embedding_dim or self.memory.config.text_dim != encoder.embedding_dim:
            raise ValueError(f"the memory's key sizes ({self.memory.config.image_dim}, {self.memory.config.text_dim}) "
                             f"do not match the encoder's embedding_dim {encoder.embedding_dim}")
        self.camera = camera
        self.control_hz = float(control_hz)
        self.episode = ""
        self._views: dict[int, KeyframeView] = {}
        self._texts: dict[str, NDArray[np.float32]] = {}
        self.episode_kinds: Counter[str] = Counter()  # keyframes written this episode, by controller kind

    def start_episode(self, episode: str) -> None:
        if not isinstance(episode, str) or not episode:
            raise ValueError(f"episode must be a non-empty string, got {episode!r}")
        self.episode = episode
        self.episode_kinds = Counter()

    # -- embeddings ----------------------------------------------------------------------
    def text_embedding(self, text: str) -> NDArray[np.float32]:
        if text not in self._texts:
            self._texts[text] = np.asarray(self.encoder.encode_texts([text]), dtype=np.float32)[0]
        return self._texts[text]

    def image_embedding(self, observation: Observation) -> NDArray[np.float32]:
        image = observation.images.get(self.camera)
        if image is None:
            raise VerifierInputError(f"episodic memory keys on the {self.camera!r} camera image; the observation has {sorted(observation.images)}")
        return np.asarray(self.encoder.encode_images(np.asarray(image)[None]), dtype=np.float32)[0]

    # -- KeyframeStore (controller) --------------------------------------------------------
    def write(self, kind: str, subgoal_index: int, subgoal: Any, observation: Observation, handle: Any, verified: bool,
              image_embedding: NDArray[np.float32] | None = None) -> None:
        """A keyframe of `observation`; `image_embedding` when the caller already embedded its frame."""
        if not self.episode:
            raise RuntimeError("HelmMemory.write before start_episode()")
        if kind not in KEYFRAME_KINDS:
            raise ValueError(f"keyframe kind must be one of {list(KEYFRAME_KINDS)}, got {kind!r}")
        world = observation.world
        if world is None:
            raise VerifierInputError("HELM keyframes record the world state; the observation has none")
        keyframe = Keyframe(
            episode=self.episode,
            step=int(round(observation.sim_time_s * self.control_hz)),
            sim_time_s=float(observation.sim_time_s),
            kind=MEMORY_KIND[kind],
            subgoal=subgoal.name,
            image_embedding=self.image_embedding(observation) if image_embedding is None else image_embedding,
            text_embedding=self.text_embedding(subgoal.name),
            robot=RobotState(world.joint_positions, world.ee_position, world.ee_quaternion, world.gripper_width),
            objects={name: ObjectPose(pos, quat) for name, (pos, quat) in world.object_poses.items()},
            verified=bool(verified),
            sim_state=handle if isinstance(handle, (int, str)) and not isinstance(handle, bool) else None,
            meta={"controller_kind": kind, "subgoal_index": int(subgoal_index), "predicate": getattr(subgoal, "predicate", ""),
                  "fixture_joints": dict(world.fixture_joints)},
        )
        keyframe_id = self.memory.add(keyframe)
        self._views[keyframe_id] = KeyframeView(kind, bool(verified), float(observation.sim_time_s), int(subgoal_index), world)
        self.episode_kinds[kind] += 1

    def last_verified(self) -> RollbackTarget | None:
        found = self.memory.last_verified(self.episode)
        if found is None:
            return None
        _, keyframe = found
        return RollbackTarget(keyframe.sim_state, int(keyframe.meta["subgoal_index"]))

    def gripper_event(self, observation: Observation, what: str, subgoal_index: int, subgoal: Any) -> None:
        """An environment callback's keyframe (what: "open" | "close")."""
        self.write(f"gripper_{what}", subgoal_index, subgoal, observation, None, False)

    # -- MemoryContext (verifier) ----------------------------------------------------------
    def context(self, observation: Observation, subgoal_index: int, k: int,
                image_embedding: NDArray[np.float32] | None = None) -> list[KeyframeView]:
        """The k keyframes of this episode nearest to now; `image_embedding` when the caller
        already embedded the observation's frame."""
        if not self.episode or len(self.memory) == 0:
            return []
        subgoal = observation.task.subgoals[subgoal_index]
        image = self.image_embedding(observation) if image_embedding is None else image_embedding
        matches = self.memory.query(image, self.text_embedding(subgoal.name), k=k, episode=self.episode)
        return [self._views[m.id] if m.id in self._views else view_of(m.keyframe) for m in matches]


def view_of(keyframe: Keyframe) -> KeyframeView:
    """A KeyframeView from a stored keyframe (e.g. a memory loaded from disk)."""
    meta = keyframe.meta
    world = WorldState(
        object_poses={name: (pose.position, pose.quaternion) for name, pose in keyframe.objects.items()},
        fixture_joints=meta.get("fixture_joints", {}),
        ee_position=keyframe.robot.ee_position,
        ee_quaternion=keyframe.robot.ee_quaternion,
        gripper_width=keyframe.robot.gripper_width,
        sim_time_s=keyframe.sim_time_s,
        joint_positions=keyframe.robot.joint_positions,
    )
    return KeyframeView(meta.get("controller_kind", "subgoal_start"), keyframe.verified, keyframe.sim_time_s,
                        int(meta.get("subgoal_index", 0)), world)
