"""The behaviour-cloning base policy: observation features, action codec, network, checkpoint.

This is the stand-in for the vision-language-action model that HELM wraps (HELM is
model-agnostic): a subgoal-conditioned policy that maps one observation to an action chunk.
Everything the trainer (`training.bc.train`) and the runtime policy (`policies.bc`) must
agree on lives here, so the two cannot drift apart.

Observation features, one flat vector (F,) in this order:
  proprioception (19)    joint positions (9), grasp-frame position (3), the grasp frame's
                         x and y axes (6: orientation without angle wrap-around), gripper
                         opening (1)
  motion (4)             optionally, grasp-frame velocity (3) and gripper opening rate (1)
                         since the previous decision. The expert lets go of an object once
                         the hand has *settled* at the release pose, and a single snapshot
                         cannot tell "arrived and still" from "still arriving": without
                         this the policy learns to hover closed above the target.
  subgoal (P [+ T])      one-hot of the subgoal's predicate over a stored vocabulary; the
                         argument roles are carried by the entity slots below; optionally a
                         text embedding (T) of the subgoal's name from a `TextEncoder`
  entities (E x 36)      privileged object state, subgoal-centric: the predicate's arguments
                         first (in argument order; a region argument is an entity too), then
                         the task's other objects in declaration order (a stable order, so
                         the input does not jump when objects move), zero-padded to E slots.
                         Per slot: presence, kind one-hot, size, position relative to the
                         grasp frame and absolute, x and z axes, heading features modulo the
                         half and quarter turn (absolute and relative to the hand: cubes and
                         the two-finger hand are symmetric under those turns), drawer slide,
                         drawer handle relative to the grasp frame, and whether it is grasped
  relation (3)           first argument minus the second argument's target point (a
                         drawer's interior at its current slide, a region's centre)
  images (C x D)         optionally, one embedding per camera from an `ImageEncoder`
Entity and relation features exist only with `use_object_state` (privileged, simulation
only); image embeddings only with `cameras`. Either or both may be on.

Action representation: a chunk of K future targets at the control rate, the seven arm joints
as offsets from the current joint positions and the two fingers as absolute targets. Offsets
keep the regression targets small and centred however far the arm is from home (absolute
arm angles would need millimetre-precise outputs over a range of radians); the fingers are
commanded with a handful of discrete openings (open, closed, release width), which an
offset from a finger blocked by an object would blur.

Network: a residual MLP over the normalised features, predicting the normalised chunk (K, 9).
The subgoal-centric slot order gives an MLP the structure that attention over object tokens
would otherwise have to learn, at a cost that trains on two CPU cores.

History (`FeatureConfig.history` = H > 0; HELM's "base policy + longer context" baseline):
the policy also sees a window of the last H decisions' feature vectors (F,) each, exactly
what the featurizer produced at that decision (its own subgoal, motion and object state),
oldest first and ending with the current decision. Frames before the episode's first
decision are zeros with a validity mask of 0. A small temporal encoder (`TemporalEncoder`:
a per-frame projection, two residual 1-D convolutions over time, a linear map of the whole
window) turns the window into a vector that joins the current features before the residual
MLP (`BCNet.input` reads the current features, `BCNet.history_input` the encoded window;
the sum of two linear maps is one linear map of their concatenation). The current frame
also keeps its own path, so H = 0 is today's network unchanged: no history modules, the same
weights file, and a checkpoint without history fields in its config is read as H = 0.

Checkpoint directory (written by the trainer, read by `load_checkpoint`): `config.json`
(feature, action and model configs plus training provenance), `model.safetensors` (network
weights) and `normalization.safetensors` (feature and action mean/std). Nothing is
unpickled.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.config import ConfigError, load_config, require_positive_ints
from sim.panda import N_ARM_JOINTS, N_JOINTS, POSITION_LOWER, POSITION_UPPER
from sim.tasks.geometry import (
    ALL_KINDS,
    DRAWER_FLOOR_TOP_M,
    DRAWER_HANDLE_CENTRE_M,
    drawer_exposed_inner_x,
    rotation_matrix,
    yaw_of,
)
from sim.tasks.predicates import PREDICATES, grasped, parse_predicate
from sim.tasks.spec import TaskSpec
from sim.world_state import WorldState

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "helmstack-bc-policy"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORMALIZATION_FILE = "normalization.safetensors"
ACTION_REPRESENTATION = "arm_offsets_absolute_fingers"
# Model config fields that exist only for a temporal window (left out of history-free configs).
HISTORY_MODEL_FIELDS = ("history", "history_width", "history_out_dim")

REGION_KIND = "region"
ENTITY_KINDS: tuple[str, ...] = (*ALL_KINDS, REGION_KIND)
PREDICATE_NAMES: tuple[str, ...] = tuple(PREDICATES)

PROPRIO_DIM = N_JOINTS + 3 + 6 + 1
MOTION_DIM = 4
# Decisions further apart than this carry no usable motion estimate (the demonstrations'
# decisions are at most a pause, 0.4 s, apart): the motion features are zero then.
MAX_MOTION_GAP_S = 1.0
RELATION_DIM = 3
# The longest temporal window a policy may read (frames); HELM's context baseline uses 32.
MAX_HISTORY = 256
# Features whose spread across the training set is below this are not rescaled (one-hots
# that never fire, padding): dividing by a vanishing std would amplify noise.
MIN_STD = 1e-6


class FeatureError(ValueError):
    """An observation cannot be turned into the features a checkpoint expects."""


class CheckpointError(RuntimeError):
    """A policy checkpoint is missing, damaged or inconsistent; the message names the file."""


class ImageEncoder(Protocol):
    """Images -> embeddings (the image tower of the in-domain image-text encoder)."""

    embedding_dim: int

    def encode_images(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(N, H, W, 3) uint8 RGB -> (N, embedding_dim) float32."""
        ...


class TextEncoder(Protocol):
    """Texts -> embeddings (the text tower, or a sentence encoder)."""

    embedding_dim: int

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """N strings -> (N, embedding_dim) float32."""
        ...


# -- configs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureConfig:
    """Which observation features the policy reads (stored in the checkpoint)."""

    use_object_state: bool = True  # privileged object poses (simulation only)
    use_motion: bool = True  # hand and gripper velocity since the previous decision
    max_entities: int = 6  # entity slots: predicate arguments + the task's other objects
    cameras: tuple[str, ...] = ()  # cameras whose image embeddings are inputs, e.g. ("front",)
    image_embedding_dim: int = 0
    text_embedding_dim: int = 0  # 0 = no subgoal text embedding
    predicates: tuple[str, ...] = PREDICATE_NAMES  # one-hot vocabulary
    kinds: tuple[str, ...] = ENTITY_KINDS  # entity kind vocabulary
    history: int = 0  # decisions in the temporal window (the current one included); 0 = none

    def __post_init__(self) -> None:
        if isinstance(self.history, bool) or not isinstance(self.history, int) or not 0 <= self.history <= MAX_HISTORY:
            raise ValueError(f"history must be an int in [0, {MAX_HISTORY}], got {self.history!r}")
        if not self.use_object_state and not self.cameras:
            raise ValueError("use_object_state is False and cameras is empty: the policy would see no scene at all")
        if isinstance(self.max_entities, bool) or not isinstance(self.max_entities, int) or not 1 <= self.max_entities <= 32:
            raise ValueError(f"max_entities must be an int in [1, 32], got {self.max_entities!r}")
        if self.cameras and self.image_embedding_dim <= 0:
            raise ValueError(f"image_embedding_dim must be > 0 when cameras are used, got {self.image_embedding_dim!r}")
        if not self.cameras and self.image_embedding_dim:
            raise ValueError(f"image_embedding_dim must be 0 without cameras, got {self.image_embedding_dim!r}")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must not repeat, got {list(self.cameras)}")
        if self.text_embedding_dim < 0:
            raise ValueError(f"text_embedding_dim must be >= 0, got {self.text_embedding_dim!r}")
        if not self.predicates or len(set(self.predicates)) != len(self.predicates):
            raise ValueError(f"predicates must be a non-empty list of distinct names, got {list(self.predicates)}")
        if REGION_KIND not in self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct and include {REGION_KIND!r}, got {list(self.kinds)}")

    @property
    def slot_dim(self) -> int:
        # presence, kind one-hot, size 3, relative position 3, position 3, x axis 3, z axis 3,
        # 2 x (cos, sin) absolute headings, 2 x (cos, sin) headings relative to the hand,
        # slide, handle relative 3, grasped
        return 1 + len(self.kinds) + 3 + 3 + 3 + 3 + 3 + 4 + 4 + 1 + 3 + 1

    @property
    def subgoal_dim(self) -> int:
        return len(self.predicates) + self.text_embedding_dim

    @property
    def object_dim(self) -> int:
        return self.max_entities * self.slot_dim + RELATION_DIM if self.use_object_state else 0

    @property
    def image_dim(self) -> int:
        return len(self.cameras) * self.image_embedding_dim

    @property
    def dim(self) -> int:
        return PROPRIO_DIM + (MOTION_DIM if self.use_motion else 0) + self.subgoal_dim + self.object_dim + self.image_dim


@dataclass(frozen=True)
class ActionConfig:
    """The action chunk: K targets at the control rate, in `representation`."""

    chunk_steps: int = 6
    control_hz: float = 20.0
    representation: str = ACTION_REPRESENTATION

    def __post_init__(self) -> None:
        if isinstance(self.chunk_steps, bool) or not isinstance(self.chunk_steps, int) or not 1 <= self.chunk_steps <= 50:
            raise ValueError(f"chunk_steps must be an int in [1, 50], got {self.chunk_steps!r}")
        if not (math.isfinite(self.control_hz) and self.control_hz > 0):
            raise ValueError(f"control_hz must be a positive number, got {self.control_hz!r}")
        if self.representation != ACTION_REPRESENTATION:
            raise ValueError(f"representation must be {ACTION_REPRESENTATION!r}, got {self.representation!r}")


@dataclass(frozen=True)
class BCModelConfig:
    """Residual MLP sizes."""

    input_dim: int
    chunk_steps: int
    action_dim: int = N_JOINTS
    hidden_dim: int = 512
    n_blocks: int = 3
    dropout: float = 0.0
    history: int = 0  # frames of the temporal window (FeatureConfig.history); 0 = no encoder
    history_width: int = 32  # channels of the temporal encoder
    history_out_dim: int = 128  # size of the encoded window that joins the current features

    def __post_init__(self) -> None:
        require_positive_ints(self, ("input_dim", "chunk_steps", "action_dim", "hidden_dim", "history_width", "history_out_dim"))
        if isinstance(self.history, bool) or not isinstance(self.history, int) or not 0 <= self.history <= MAX_HISTORY:
            raise ValueError(f"history must be an int in [0, {MAX_HISTORY}], got {self.history!r}")
        if isinstance(self.n_blocks, bool) or not isinstance(self.n_blocks, int) or self.n_blocks < 0:
            raise ValueError(f"n_blocks must be an int >= 0, got {self.n_blocks!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


# -- observation features -----------------------------------------------------------------
@dataclass(frozen=True)
class RobotState:
    """Proprioception: what the robot knows about itself (no scene knowledge)."""

    joint_positions: NDArray[np.float64]  # (9,)
    ee_position: NDArray[np.float64]  # (3,) grasp frame, world
    ee_quaternion: NDArray[np.float64]  # (4,) xyzw
    gripper_width: float  # m, pad to pad

    @classmethod
    def from_world(cls, ws: WorldState) -> RobotState:
        return cls(ws.joint_positions, ws.ee_position, ws.ee_quaternion, ws.gripper_width)


def proprio_features(robot: RobotState) -> NDArray[np.float64]:
    """(19,) joint positions, grasp-frame position and x/y axes, gripper opening."""
    hand = rotation_matrix(robot.ee_quaternion)
    return np.concatenate([robot.joint_positions, robot.ee_position, hand[:, 0], hand[:, 1], [robot.gripper_width]])


def motion_features(previous: RobotState | None, previous_time_s: float, robot: RobotState, time_s: float) -> NDArray[np.float64]:
    """(4,) grasp-frame velocity (m/s) and gripper opening rate (m/s) over the interval since
    `previous`; zeros without a previous state or when the interval is not in (0, MAX_MOTION_GAP_S]."""
    dt = time_s - previous_time_s
    if previous is None or not 0.0 < dt <= MAX_MOTION_GAP_S:
        return np.zeros(MOTION_DIM)
    return np.concatenate([(robot.ee_position - previous.ee_position) / dt, [(robot.gripper_width - previous.gripper_width) / dt]])


def _hand_yaw(ee_quaternion: NDArray[np.float64]) -> float:
    """Top-down yaw of the grasp frame (its closing axis heading), as the expert measures it."""
    hand_y = rotation_matrix(ee_quaternion)[:, 1]
    return math.atan2(hand_y[0], -hand_y[1])


def _headings(yaw: float) -> list[float]:
    """cos/sin of 2*yaw and 4*yaw: continuous under the half and quarter turn symmetries."""
    return [math.cos(2 * yaw), math.sin(2 * yaw), math.cos(4 * yaw), math.sin(4 * yaw)]


@dataclass(frozen=True)
class _Entity:
    name: str
    kind: str
    is_region: bool


class ObservationFeaturizer:
    """Builds the feature vector (F,) of `FeatureConfig` from one observation.

    Per-(task, subgoal) work (entity order, text embeddings) is cached, so calling it every
    control step costs a few hundred microseconds.
    """

    def __init__(self, config: FeatureConfig, text_encoder: TextEncoder | None = None) -> None:
        if config.text_embedding_dim and text_encoder is None:
            raise FeatureError(f"the features include a {config.text_embedding_dim}-d subgoal text embedding: pass a text_encoder")
        if text_encoder is not None and config.text_embedding_dim != text_encoder.embedding_dim:
            raise FeatureError(
                f"text_encoder.embedding_dim is {text_encoder.embedding_dim}, the features expect {config.text_embedding_dim}"
            )
        self.config = config
        self.text_encoder = text_encoder if config.text_embedding_dim else None
        self._predicate_index = {name: i for i, name in enumerate(config.predicates)}
        self._kind_index = {name: i for i, name in enumerate(config.kinds)}
        self._entities: dict[tuple[str, int], list[_Entity]] = {}
        self._subgoal: dict[tuple[str, int], NDArray[np.float64]] = {}

    # per-(task, subgoal) parts
    def entities(self, task: TaskSpec, subgoal_index: int) -> list[_Entity]:
        """Entity slots for a subgoal: its arguments, then the other objects in task order."""
        key = (task.task_id, subgoal_index)
        if key not in self._entities:
            call = parse_predicate(task.subgoals[subgoal_index].predicate)
            geometry = task.geometry
            args = [_Entity(a, REGION_KIND, True) if a in geometry.regions else _Entity(a, geometry.kind(a), False) for a in call.args]
            rest = [_Entity(o.name, o.kind, False) for o in task.objects if o.name not in call.args]
            slots = args + rest
            if len(slots) > self.config.max_entities:
                raise FeatureError(
                    f"task {task.task_id!r} subgoal {subgoal_index} needs {len(slots)} entity slots "
                    f"({[e.name for e in slots]}), the policy has max_entities={self.config.max_entities}"
                )
            unknown = sorted({e.kind for e in slots} - set(self._kind_index))
            if unknown:
                raise FeatureError(f"task {task.task_id!r}: object kinds {unknown} are not in the policy's vocabulary {list(self.config.kinds)}")
            self._entities[key] = slots
        return self._entities[key]

    def subgoal_features(self, task: TaskSpec, subgoal_index: int) -> NDArray[np.float64]:
        """(P [+ T],) predicate one-hot [and the subgoal text embedding]."""
        key = (task.task_id, subgoal_index)
        if key not in self._subgoal:
            if not 0 <= subgoal_index < len(task.subgoals):
                raise FeatureError(f"subgoal_index must be in [0, {len(task.subgoals)}) for task {task.task_id!r}, got {subgoal_index}")
            subgoal = task.subgoals[subgoal_index]
            call = parse_predicate(subgoal.predicate)
            if call.name not in self._predicate_index:
                raise FeatureError(f"predicate {call.name!r} is not in the policy's vocabulary {list(self.config.predicates)}")
            one_hot = np.zeros(len(self.config.predicates))
            one_hot[self._predicate_index[call.name]] = 1.0
            parts = [one_hot]
            if self.text_encoder is not None:
                emb = np.asarray(self.text_encoder.encode_texts([subgoal.name]), dtype=np.float64).reshape(-1)
                if emb.shape != (self.config.text_embedding_dim,):
                    raise FeatureError(f"text encoder returned shape {emb.shape} for one text, expected (1, {self.config.text_embedding_dim})")
                parts.append(emb)
            self._subgoal[key] = np.concatenate(parts)
        return self._subgoal[key]

    # per-step parts
    def object_features(self, ws: WorldState, task: TaskSpec, subgoal_index: int) -> NDArray[np.float64]:
        """(E * slot_dim + 3,) entity slots and the argument relation."""
        cfg = self.config
        slots = self.entities(task, subgoal_index)
        geometry = task.geometry
        ee = ws.ee_position
        hand_yaw = _hand_yaw(ws.ee_quaternion)
        out = np.zeros((cfg.max_entities, cfg.slot_dim))
        for i, entity in enumerate(slots):
            row: list[float] = [1.0]
            kind = np.zeros(len(cfg.kinds))
            kind[self._kind_index[entity.kind]] = 1.0
            row.extend(kind)
            if entity.is_region:
                region = geometry.regions[entity.name]
                pos = np.array([*region.centre, 0.0])
                size = [region.x_m[1] - region.x_m[0], region.y_m[1] - region.y_m[0], 0.0]
                rot, yaw = np.eye(3), 0.0
                slide, handle_rel, held = 0.0, np.zeros(3), 0.0
            else:
                if entity.name not in ws.object_poses:
                    raise FeatureError(f"the world state has no pose for {entity.name!r} (task {task.task_id!r}); it has {sorted(ws.object_poses)}")
                pos, quat = ws.object_poses[entity.name]
                rot, yaw = rotation_matrix(quat), yaw_of(quat)
                size = list(geometry.objects[entity.name].size_m)
                slide = ws.fixture_joints.get(entity.name, 0.0)
                if entity.kind == "drawer":
                    handle = pos + rot @ (np.array(DRAWER_HANDLE_CENTRE_M) - np.array([slide, 0.0, 0.0]))
                    handle_rel = handle - ee
                else:
                    handle_rel = np.zeros(3)
                held = float(geometry.objects[entity.name].movable and grasped(ws, geometry, entity.name))
            row.extend(size)
            row.extend(pos - ee)
            row.extend(pos)
            row.extend(rot[:, 0])
            row.extend(rot[:, 2])
            row.extend(_headings(yaw))
            row.extend(_headings(yaw - hand_yaw))
            row.append(slide)
            row.extend(handle_rel)
            row.append(held)
            out[i] = row
        relation = np.zeros(RELATION_DIM)
        if len(parse_predicate(task.subgoals[subgoal_index].predicate).args) == 2:
            first, second = slots[0], slots[1]
            relation = ws.position(first.name) - self._target_point(ws, task, second)
        return np.concatenate([out.reshape(-1), relation])

    @staticmethod
    def _target_point(ws: WorldState, task: TaskSpec, entity: _Entity) -> NDArray[np.float64]:
        """Where the second argument wants the first: a region's centre, a drawer's exposed
        interior at its current slide, otherwise the entity's position."""
        if entity.is_region:
            return np.array([*task.geometry.regions[entity.name].centre, 0.0])
        pos, quat = ws.object_poses[entity.name]
        if entity.kind == "drawer":
            x0, x1 = drawer_exposed_inner_x(ws.fixture_joints.get(entity.name, 0.0))
            return pos + rotation_matrix(quat) @ np.array([(x0 + x1) / 2, 0.0, DRAWER_FLOOR_TOP_M])
        return pos

    def features(
        self,
        robot: RobotState,
        task: TaskSpec,
        subgoal_index: int,
        world: WorldState | None = None,
        image_embeddings: dict[str, NDArray[np.floating]] | None = None,
        motion: NDArray[np.float64] | None = None,
    ) -> NDArray[np.float32]:
        """(F,) features of one observation; raises FeatureError when an input is missing.
        `motion` is `motion_features(...)` (required when the config uses motion)."""
        cfg = self.config
        parts = [proprio_features(robot)]
        if cfg.use_motion:
            if motion is None or np.shape(motion) != (MOTION_DIM,):
                raise FeatureError(f"the features include motion: pass motion_features(...) ({MOTION_DIM},), got {motion!r}")
            parts.append(np.asarray(motion, dtype=np.float64))
        parts.append(self.subgoal_features(task, subgoal_index))
        if cfg.use_object_state:
            if world is None:
                raise FeatureError("the policy reads privileged object state, but the observation has no world state (sim only)")
            parts.append(self.object_features(world, task, subgoal_index))
        for camera in cfg.cameras:
            if image_embeddings is None or camera not in image_embeddings:
                raise FeatureError(f"the policy needs an image embedding for camera {camera!r}, got {sorted(image_embeddings or {})}")
            emb = np.asarray(image_embeddings[camera], dtype=np.float64).reshape(-1)
            if emb.shape != (cfg.image_embedding_dim,):
                raise FeatureError(f"image embedding for {camera!r} has shape {emb.shape}, expected ({cfg.image_embedding_dim},)")
            parts.append(emb)
        out = np.concatenate(parts).astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise FeatureError(f"non-finite observation features at indices {np.flatnonzero(~np.isfinite(out))[:10].tolist()}")
        return out


# -- action codec -------------------------------------------------------------------------
def encode_chunk(chunk: NDArray[np.floating], joint_positions: NDArray[np.floating]) -> NDArray[np.float32]:
    """Absolute targets (..., K, 9) -> arm offsets from `joint_positions` (..., 9) + absolute fingers."""
    out = np.array(chunk, dtype=np.float64, copy=True)
    out[..., :N_ARM_JOINTS] -= np.asarray(joint_positions, dtype=np.float64)[..., None, :N_ARM_JOINTS]
    return out.astype(np.float32)


def decode_chunk(encoded: NDArray[np.floating], joint_positions: NDArray[np.floating]) -> NDArray[np.float64]:
    """Inverse of `encode_chunk` for one chunk (K, 9), clipped to the joint limits."""
    out = np.array(encoded, dtype=np.float64, copy=True)
    out[:, :N_ARM_JOINTS] += np.asarray(joint_positions, dtype=np.float64)[:N_ARM_JOINTS]
    return np.clip(out, POSITION_LOWER, POSITION_UPPER)


# -- normalisation ------------------------------------------------------------------------
@dataclass
class NormalizationStats:
    """Mean/std of the features (F,) and of the encoded actions (K, 9), from the training split."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    action_mean: torch.Tensor
    action_std: torch.Tensor

    @classmethod
    def fit(cls, features: NDArray[np.float32], actions: NDArray[np.float32]) -> NormalizationStats:
        """features (N, F), actions (N, K, 9)."""
        if features.shape[0] == 0:
            raise ValueError("cannot fit normalisation statistics on an empty training split")

        def mean_std(x: NDArray[np.float32]) -> tuple[torch.Tensor, torch.Tensor]:
            x64 = x.astype(np.float64)
            std = x64.std(axis=0)
            return torch.from_numpy(x64.mean(axis=0)).float(), torch.from_numpy(np.where(std < MIN_STD, 1.0, std)).float()

        fm, fs = mean_std(features)
        am, as_ = mean_std(actions)
        return cls(fm, fs, am, as_)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in asdict(self).items()}


# -- network ------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)): pre-norm keeps deep stacks trainable at a high LR."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))))


class TemporalEncoder(nn.Module):
    """A window of normalised frames (B, H, F) and its validity mask (B, H) -> (B, out_dim).

    Each frame is projected, two pre-norm residual 1-D convolutions (kernel 3) mix
    neighbouring decisions (velocities, pauses, a grasp that slipped), and one linear map
    reads the whole window in order. Invalid frames are zeroed after every layer (a valid
    frame's projection includes a bias, so zero marks "no decision here"), and what stands in
    the padding cannot leak into the output.
    """

    def __init__(self, frame_dim: int, history: int, width: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.history = history
        self.frame = nn.Linear(frame_dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel_size=3, padding=1) for _ in range(2))
        self.out = nn.Linear(history * width, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(frames.dtype).unsqueeze(-1)  # (B, H, 1)
        h = torch.nn.functional.gelu(self.frame(frames)) * m  # (B, H, W)
        for norm, conv in zip(self.norms, self.convs):
            mixed = conv(norm(h).transpose(1, 2)).transpose(1, 2)  # (B, H, W)
            h = h + self.dropout(torch.nn.functional.gelu(mixed)) * m
        return torch.nn.functional.gelu(self.out(h.reshape(h.shape[0], -1)))  # (B, out_dim)


class BCNet(nn.Module):
    """Normalised features (B, F) [+ a window of normalised frames (B, H, F) and its mask
    (B, H) when config.history > 0] -> normalised action chunk (B, K, 9)."""

    def __init__(self, config: BCModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input = nn.Linear(config.input_dim, config.hidden_dim)
        self.blocks = nn.Sequential(*(ResidualBlock(config.hidden_dim, config.dropout) for _ in range(config.n_blocks)))
        self.head = nn.Sequential(nn.LayerNorm(config.hidden_dim), nn.Linear(config.hidden_dim, config.chunk_steps * config.action_dim))
        if config.history:
            # Built after the history-free modules, so H = 0 draws the same initial weights
            # from a seed as before the option existed.
            self.temporal = TemporalEncoder(config.input_dim, config.history, config.history_width, config.history_out_dim, config.dropout)
            self.history_input = nn.Linear(config.history_out_dim, config.hidden_dim, bias=False)

    def forward(self, features: torch.Tensor, history: torch.Tensor | None = None, history_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.input(features)  # (B, hidden)
        cfg = self.config
        if cfg.history:
            expected = (features.shape[0], cfg.history, cfg.input_dim)
            if history is None or history_mask is None:
                raise ValueError(f"this network reads a {cfg.history}-frame history: pass history {expected} and history_mask")
            if tuple(history.shape) != expected or tuple(history_mask.shape) != expected[:2]:
                raise ValueError(f"history must be {expected} with mask {expected[:2]}, got {tuple(history.shape)} and {tuple(history_mask.shape)}")
            h = h + self.history_input(self.temporal(history, history_mask))
        elif history is not None:
            raise ValueError("this network has no history input (history = 0)")
        h = self.blocks(h)
        return self.head(h).view(features.shape[0], cfg.chunk_steps, cfg.action_dim)


def pad_frames(frames: torch.Tensor) -> torch.Tensor:
    """Frames (N, F) -> (N + 1, F) with a final row of zeros, what padding indices (-1) read."""
    return torch.cat([frames, frames.new_zeros(1, frames.shape[1])])


def gather_windows(padded_frames: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames with a final zero row (`pad_frames`, (N + 1, F)) and window row indices (B, H),
    -1 for padding (`training.bc.dataset.history_windows`) -> the windows' frames (B, H, F),
    zeros where padded (index -1 is the zero row), and the validity mask (B, H)."""
    if padded_frames.shape[0] == 0 or bool(padded_frames[-1].any()):
        raise ValueError("padded_frames must end with a row of zeros (pad_frames)")
    return padded_frames[windows], windows >= 0


def window_from_frames(frames: Sequence[torch.Tensor], history: int, frame_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `history` of a list of normalised frames (F,), oldest first, left-padded with
    zeros -> (1, H, F) and mask (1, H): one window, laid out as in training."""
    recent = list(frames)[-history:] if history else []
    window = torch.zeros(1, history, frame_dim)
    mask = torch.zeros(1, history, dtype=torch.bool)
    if recent:
        window[0, history - len(recent) :] = torch.stack(recent)
        mask[0, history - len(recent) :] = True
    return window, mask


# -- checkpoint files ---------------------------------------------------------------------
@dataclass
class PolicyCheckpoint:
    """A loaded policy: configs, network (eval mode) and normalisation."""

    path: Path
    features: FeatureConfig
    action: ActionConfig
    model: BCModelConfig
    net: BCNet
    stats: NormalizationStats
    training: dict[str, Any] = field(default_factory=dict)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_policy_files(
    directory: Path,
    net: BCNet,
    stats: NormalizationStats,
    features: FeatureConfig,
    action: ActionConfig,
    training: dict[str, Any] | None = None,
) -> None:
    """Write the three policy files into an existing directory (the caller renames the
    directory into place, which makes the checkpoint as a whole atomic)."""
    if features.history != net.config.history:
        raise ValueError(f"features.history is {features.history} but the network reads {net.config.history} frames")
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    save_file(stats.to_dict(), str(directory / NORMALIZATION_FILE))
    feature_fields, model_fields = asdict(features), asdict(net.config)
    if not features.history:
        # A history-free policy writes the config it wrote before the option existed.
        feature_fields.pop("history")
        for name in HISTORY_MODEL_FIELDS:
            model_fields.pop(name)
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "features": feature_fields,
        "action": asdict(action),
        "model": model_fields,
        "training": training or {},
    }
    _write_json_atomic(directory / CONFIG_FILE, config)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory itself, or a training run directory: its `best/`, else its
    newest `checkpoints/step-*`."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    if (path / "best" / CONFIG_FILE).exists():
        return path / "best"
    steps = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    if steps:
        return steps[-1]
    raise CheckpointError(f"{path}: no policy checkpoint here ({CONFIG_FILE}, best/{CONFIG_FILE} or checkpoints/step-*/ expected)")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_checkpoint(path: str | Path) -> PolicyCheckpoint:
    """Load and cross-check a policy checkpoint; raises CheckpointError naming the bad file."""
    directory = resolve_checkpoint_dir(path)
    config_path = directory / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{config_path}: format must be {CHECKPOINT_FORMAT!r}, got {raw.get('format') if isinstance(raw, dict) else raw!r}")
    if raw.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{config_path}: version {raw.get('version')!r} is not supported (this code reads {CHECKPOINT_VERSION})")
    for section in ("features", "action", "model"):
        if not isinstance(raw.get(section), dict):
            raise CheckpointError(f"{config_path}: {section} must be a mapping, got {raw.get(section)!r}")
    try:
        features = load_config(FeatureConfig, raw.get("features"), root="features", origin=str(config_path))
        action = load_config(ActionConfig, raw.get("action"), root="action", origin=str(config_path))
        model = load_config(BCModelConfig, raw.get("model"), root="model", origin=str(config_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    if model.input_dim != features.dim:
        raise CheckpointError(f"{config_path}: model.input_dim is {model.input_dim} but the feature config gives {features.dim} features")
    if model.history != features.history:
        raise CheckpointError(f"{config_path}: model.history is {model.history} but features.history is {features.history}")
    if model.chunk_steps != action.chunk_steps or model.action_dim != N_JOINTS:
        raise CheckpointError(
            f"{config_path}: model predicts ({model.chunk_steps}, {model.action_dim}) but the action config needs ({action.chunk_steps}, {N_JOINTS})"
        )
    net = BCNet(model)
    weights_path = directory / WEIGHTS_FILE
    state = _load_tensors(weights_path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path}: weights do not match the model config ({' '.join(str(exc).split())})") from exc
    net.eval()
    norm_path = directory / NORMALIZATION_FILE
    tensors = _load_tensors(norm_path)
    expected = {
        "feature_mean": (features.dim,),
        "feature_std": (features.dim,),
        "action_mean": (action.chunk_steps, N_JOINTS),
        "action_std": (action.chunk_steps, N_JOINTS),
    }
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{norm_path}: missing tensor {key!r} (has {sorted(tensors)})")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{norm_path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        if not torch.all(torch.isfinite(tensors[key])):
            raise CheckpointError(f"{norm_path}: {key} has non-finite values")
    if torch.any(tensors["feature_std"] <= 0) or torch.any(tensors["action_std"] <= 0):
        raise CheckpointError(f"{norm_path}: standard deviations must be > 0")
    stats = NormalizationStats(**{k: tensors[k].float() for k in expected})
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    logger.info("loaded BC policy %s (%d features, history %d, chunk %d)", directory, features.dim, features.history, action.chunk_steps)
    return PolicyCheckpoint(directory, features, action, model, net, stats, training)
