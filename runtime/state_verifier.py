"""HELM's State Verifier (SV) and the two baselines it is compared with.

The SV predicts, *before* a proposed action chunk runs, the probability that the current
subgoal will fail if it does (papers/helm.md): from the observation, the chunk, the
subgoal, and keyframes retrieved from episodic memory. Three `FailurePredictor`s live
here (the protocol of runtime.harness_controller):

  StateVerifier     the learned model: [MLP(observation), MLP(chunk)] fused, attention over
                    the retrieved keyframes (query = the fused state-action code), a head
                    to one logit. `use_memory=False` is the ablation that sees no keyframes.
  RuleVerifier      a hand-written feasibility check: joint limits, the hand driven into the
                    table, closing the fingers far from the object to grasp, opening them
                    far from where the held object must go, placing without holding.
  EnsembleVerifier  action disagreement of N independently trained policies with the
                    proposed chunk (the spread of {members' chunks, proposal}).

Inputs are featurised by `VerifierFeaturizer` from the same quantities at training time
(training.verifier builds them from recorded rollouts) and at run time (from the harness's
Observation and memory), so the two cannot drift. The observation part reuses the base
policy's subgoal-centric featurizer (privileged object state, as the base policy reads);
each keyframe is described relative to *now*: how far every subgoal entity and the hand
moved since then, how long ago it was, which subgoal it belonged to, what kind of event it
was. That is what memory can tell a verifier and a snapshot cannot: that an object was
displaced, that a grasp was lost, how long the current attempt has been running.

A checkpoint is a directory: config.json (feature and model config, the operating
threshold chosen on validation data, provenance), model.safetensors and
normalization.safetensors. Nothing is unpickled. This is a core module (no ROS).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors.torch import load_file, save_file
from torch import nn

from policies.base import ActionChunk, Observation
from sim.panda import N_JOINTS, POSITION_LOWER, POSITION_UPPER, PandaKinematics
from sim.tasks.geometry import TABLE_TOP_Z_M
from sim.tasks.predicates import grasped, parse_predicate
from sim.tasks.spec import TaskSpec
from sim.world_state import WorldState
from training.bc.model import FeatureConfig, FeatureError, ObservationFeaturizer, RobotState, encode_chunk
from runtime.config import require_positive_ints

logger = logging.getLogger(__name__)

# The controller's keyframe kinds (runtime.harness_controller writes the first, second,
# fifth and sixth; the environment adds gripper events).
KEYFRAME_KINDS: tuple[str, ...] = ("episode_start", "subgoal_start", "gripper_close", "gripper_open", "alarm", "failure")
_AGE_SCALE_S = 10.0  # keyframe age is fed in units of 10 s
_FINGER_CLOSED_BELOW_M = 0.01  # a finger target below this is a "close" command


class VerifierInputError(FeatureError):
    """An input the verifier cannot judge (non-finite values, missing world state, ...)."""


@dataclass(frozen=True)
class KeyframeView:
    """What the verifier reads of a keyframe: the same fields from memory at run time and
    from recorded rollouts at training time."""

    kind: str  # one of KEYFRAME_KINDS
    verified: bool
    sim_time_s: float
    subgoal_index: int
    world: WorldState

    def __post_init__(self) -> None:
        if self.kind not in KEYFRAME_KINDS:
            raise ValueError(f"keyframe kind must be one of {list(KEYFRAME_KINDS)}, got {self.kind!r}")


class MemoryContext(Protocol):
    """Episodic memory as the verifier sees it: the k keyframes most relevant now."""

    def context(self, observation: Observation, subgoal_index: int, k: int) -> Sequence[KeyframeView]: ...


# -- features ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifierFeatureConfig:
    max_entities: int = 6
    chunk_steps: int = 6  # chunks are padded (last row repeated) or cut to this many rows
    memory_k: int = 6  # keyframes retrieved per decision

    def __post_init__(self) -> None:
        require_positive_ints(self, ("max_entities", "chunk_steps", "memory_k"))


class VerifierFeaturizer:
    """Observation, chunk and keyframe feature vectors (see the module docstring)."""

    def __init__(self, config: VerifierFeatureConfig) -> None:
        self.config = config
        self.observation_features = ObservationFeaturizer(
            FeatureConfig(use_object_state=True, use_motion=False, max_entities=config.max_entities))
        self._kinematics: PandaKinematics | None = None

    @property
    def kinematics(self) -> PandaKinematics:
        if self._kinematics is None:  # a pybullet client of its own: created on first use
            self._kinematics = PandaKinematics()
        return self._kinematics

    @property
    def observation_dim(self) -> int:
        return self.observation_features.config.dim

    @property
    def chunk_dim(self) -> int:
        return self.config.chunk_steps * N_JOINTS + 3 + 3 + 1 + 1

    @property
    def keyframe_dim(self) -> int:
        return len(KEYFRAME_KINDS) + 1 + 1 + 2 + 3 + 1 + self.config.max_entities * 4

    def observation(self, world: WorldState, task: TaskSpec, subgoal_index: int) -> NDArray[np.float32]:
        return self.observation_features.features(RobotState.from_world(world), task, subgoal_index, world=world)

    def chunk(self, positions: NDArray[np.floating], world: WorldState) -> NDArray[np.float32]:
        """Arm offsets + finger targets of K rows, then where the chunk takes the hand: the
        grasp-frame displacement at its middle and end (forward kinematics), the lowest
        grasp-frame height above the table along it, and the final mean finger target."""
        rows = np.asarray(positions, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != N_JOINTS or rows.shape[0] < 1:
            raise VerifierInputError(f"chunk must be (T >= 1, {N_JOINTS}) joint targets, got shape {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise VerifierInputError("chunk has non-finite joint targets")
        k = self.config.chunk_steps
        fixed = rows[:k] if rows.shape[0] >= k else np.vstack([rows, np.repeat(rows[-1:], k - rows.shape[0], axis=0)])
        encoded = encode_chunk(fixed, world.joint_positions).reshape(-1)
        ee_now = world.ee_position
        middle = np.asarray(self.kinematics.fk(fixed[len(fixed) // 2])[0]) - ee_now
        end_pos = np.asarray(self.kinematics.fk(fixed[-1])[0])
        lowest = min(float(self.kinematics.fk(row)[0][2]) for row in fixed[::2]) - TABLE_TOP_Z_M
        lowest = min(lowest, float(end_pos[2]) - TABLE_TOP_Z_M)
        out = np.concatenate([encoded, middle, end_pos - ee_now, [lowest], [float(np.mean(fixed[-1, 7:9]))]])
        return out.astype(np.float32)

    def keyframe(self, keyframe: KeyframeView, world: WorldState, task: TaskSpec, subgoal_index: int) -> NDArray[np.float32]:
        """One keyframe relative to now: kind, verified, age, subgoal offset (and same-subgoal
        flag), hand displacement and gripper width then, and per entity slot of the current
        subgoal: its displacement since then and whether it was held then."""
        kind = np.zeros(len(KEYFRAME_KINDS))
        kind[KEYFRAME_KINDS.index(keyframe.kind)] = 1.0
        age = (world.sim_time_s - keyframe.sim_time_s) / _AGE_SCALE_S
        offset = float(np.clip(keyframe.subgoal_index - subgoal_index, -3, 3))
        same = float(keyframe.subgoal_index == subgoal_index)
        then = keyframe.world
        entities = np.zeros((self.config.max_entities, 4))
        geometry = task.geometry
        for i, entity in enumerate(self.observation_features.entities(task, subgoal_index)):
            if entity.is_region or entity.name not in world.object_poses or entity.name not in then.object_poses:
                continue
            entities[i, :3] = world.object_poses[entity.name][0] - then.object_poses[entity.name][0]
            entities[i, 3] = float(geometry.objects[entity.name].movable and grasped(then, geometry, entity.name))
        out = np.concatenate([kind, [float(keyframe.verified)], [age], [offset, same],
                              world.ee_position - then.ee_position, [then.gripper_width], entities.reshape(-1)])
        return out.astype(np.float32)

    def keyframes(self, keyframes: Sequence[KeyframeView], world: WorldState, task: TaskSpec,
                  subgoal_index: int) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """(memory_k, D) features and (memory_k,) validity of up to memory_k keyframes."""
        k = self.config.memory_k
        feats = np.zeros((k, self.keyframe_dim), np.float32)
        valid = np.zeros(k, bool)
        for i, keyframe in enumerate(list(keyframes)[:k]):
            feats[i] = self.keyframe(keyframe, world, task, subgoal_index)
            valid[i] = True
        return feats, valid


# -- network -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifierModelConfig:
    observation_dim: int
    chunk_dim: int
    keyframe_dim: int
    use_memory: bool = True
    hidden_dim: int = 256
    memory_dim: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        require_positive_ints(self, ("observation_dim", "chunk_dim", "keyframe_dim", "hidden_dim", "memory_dim"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def _mlp(sizes: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.extend([nn.GELU(), nn.Dropout(dropout)])
    return nn.Sequential(*layers)


class StateVerifierNet(nn.Module):
    """logit of p(fail | observation, chunk, subgoal, retrieved keyframes)."""

    def __init__(self, config: VerifierModelConfig) -> None:
        super().__init__()
        self.config = config
        h, m, d = config.hidden_dim, config.memory_dim, config.dropout
        self.observation = _mlp([config.observation_dim, h, h], d)
        self.chunk = _mlp([config.chunk_dim, h // 2, h // 2], d)
        self.fuse = _mlp([h + h // 2, h, h], d)
        head_in = h
        if config.use_memory:
            self.keyframe = _mlp([config.keyframe_dim, m, m], d)
            self.query = nn.Linear(h, m)
            self.empty = nn.Parameter(torch.zeros(m))  # what "no keyframe" reads as
            head_in += m
        self.head = _mlp([head_in, h, 1], d)

    def forward(self, observation: torch.Tensor, chunk: torch.Tensor, keyframes: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Fo), (B, Fc), (B, K, Fk), (B, K) bool -> (B,) logits."""
        state = self.fuse(torch.cat([self.observation(observation), self.chunk(chunk)], dim=-1))
        if not self.config.use_memory:
            return self.head(state).squeeze(-1)
        if keyframes is None or valid is None:
            raise ValueError("a memory-conditioned verifier needs keyframes and their validity mask")
        values = self.keyframe(keyframes)  # (B, K, m)
        scores = torch.einsum("bm,bkm->bk", self.query(state), values) / math.sqrt(values.shape[-1])
        scores = scores.masked_fill(~valid, float("-inf"))
        any_valid = valid.any(dim=-1, keepdim=True)
        weights = torch.softmax(torch.where(any_valid, scores, torch.zeros_like(scores)), dim=-1)
        pooled = torch.einsum("bk,bkm->bm", weights * valid, values)
        pooled = torch.where(any_valid, pooled, self.empty.expand_as(pooled))
        return self.head(torch.cat([state, pooled], dim=-1)).squeeze(-1)


# -- normalisation and checkpoints ------------------------------------------------------------
@dataclass
class VerifierNormalization:
    observation_mean: torch.Tensor
    observation_std: torch.Tensor
    chunk_mean: torch.Tensor
    chunk_std: torch.Tensor
    keyframe_mean: torch.Tensor
    keyframe_std: torch.Tensor

    @classmethod
    def fit(cls, observation: NDArray, chunk: NDArray, keyframes: NDArray, valid: NDArray) -> VerifierNormalization:
        def mean_std(x: NDArray) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.as_tensor(np.asarray(x, np.float64))
            if t.shape[0] == 0:
                raise ValueError("cannot fit normalisation on zero rows")
            return t.mean(0).float(), t.std(0, unbiased=False).clamp_min(1e-6).float()

        kf = np.asarray(keyframes)[np.asarray(valid)]
        if kf.shape[0] == 0:
            kf = np.zeros((1, np.asarray(keyframes).shape[-1]), np.float32)
        return cls(*mean_std(observation), *mean_std(chunk), *mean_std(kf))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in asdict(self).items()}


@dataclass
class VerifierCheckpoint:
    features: VerifierFeatureConfig
    model: VerifierModelConfig
    threshold: float  # the operating point chosen on validation data
    net: StateVerifierNet
    normalization: VerifierNormalization
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_verifier(directory: str | Path, checkpoint: VerifierCheckpoint) -> Path:
    """Write a verifier checkpoint directory atomically (temp dir, then rename)."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    config = {"format": "helmstack-state-verifier/1", "features": asdict(checkpoint.features),
              "model": asdict(checkpoint.model), "threshold": float(checkpoint.threshold), "info": checkpoint.info}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in checkpoint.net.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file(checkpoint.normalization.tensors(), str(tmp / "normalization.safetensors"))
    if out.exists():
        # A directory cannot be replaced in one rename: move the old one aside first, so a
        # crash leaves either the old or the new checkpoint under a known name.
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


class VerifierCheckpointError(RuntimeError):
    """A verifier checkpoint directory that cannot be loaded (names the file and why)."""


def load_verifier_checkpoint(directory: str | Path) -> VerifierCheckpoint:
    path = Path(directory)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise VerifierCheckpointError(f"{config_path}: no verifier checkpoint here (train one with `helmstack train verifier`)")
    try:
        config = json.loads(config_path.read_text())
        if config.get("format") != "helmstack-state-verifier/1":
            raise ValueError(f"unknown format {config.get('format')!r}")
        features = VerifierFeatureConfig(**config["features"])
        model = VerifierModelConfig(**config["model"])
        threshold = float(config["threshold"])
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifierCheckpointError(f"{config_path}: {exc}") from exc
    net = StateVerifierNet(model)
    try:
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        norm = VerifierNormalization(**load_file(str(path / "normalization.safetensors")))
    except (OSError, RuntimeError, TypeError, ValueError) as exc:
        raise VerifierCheckpointError(f"{path}: cannot load the weights: {exc}") from exc
    net.eval()
    return VerifierCheckpoint(features, model, threshold, net, norm, config.get("info", {}), path)


# -- the three failure predictors -------------------------------------------------------------
def _subgoal_index(observation: Observation, subgoal: Any) -> int:
    """The index in the observation's task of the subgoal being judged (by predicate: a
    replanned subgoal is one of the task's own predicates)."""
    task = observation.task
    predicate = getattr(subgoal, "predicate", None)
    if predicate is None:
        return int(observation.subgoal_index)
    if 0 <= observation.subgoal_index < len(task.subgoals) and task.subgoals[observation.subgoal_index].predicate == predicate:
        return int(observation.subgoal_index)
    for i, sg in enumerate(task.subgoals):
        if sg.predicate == predicate:
            return i
    raise VerifierInputError(f"subgoal {predicate!r} is not one of task {task.task_id!r}'s subgoals")


def _world(observation: Observation) -> WorldState:
    if observation.world is None:
        raise VerifierInputError("the verifier reads privileged object state: the observation has no world state")
    q = np.asarray(observation.joint_positions, dtype=np.float64)
    if q.shape != (N_JOINTS,) or not np.all(np.isfinite(q)):
        raise VerifierInputError(f"observation joint positions must be {N_JOINTS} finite values, got {observation.joint_positions!r}")
    return observation.world


class StateVerifier:
    """The learned SV as a `FailurePredictor` (see the module docstring)."""

    def __init__(self, checkpoint: VerifierCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.featurizer = VerifierFeaturizer(checkpoint.features)
        self.threshold = checkpoint.threshold
        self.use_memory = checkpoint.model.use_memory
        self.net = checkpoint.net.eval()

    @classmethod
    def load(cls, directory: str | Path) -> StateVerifier:
        return cls(load_verifier_checkpoint(directory))

    def features(self, observation: Observation, chunk: ActionChunk, subgoal: Any,
                 memory: Any) -> tuple[NDArray[np.float32], ...]:
        world = _world(observation)
        index = _subgoal_index(observation, subgoal)
        obs = self.featurizer.observation(world, observation.task, index)
        act = self.featurizer.chunk(chunk.positions, world)
        views: Sequence[KeyframeView] = ()
        if self.use_memory and hasattr(memory, "context"):
            views = memory.context(observation, index, self.featurizer.config.memory_k)
        kf, valid = self.featurizer.keyframes(views, world, observation.task, index)
        return obs, act, kf, valid

    def score_features(self, obs: NDArray, act: NDArray, kf: NDArray, valid: NDArray) -> NDArray[np.float64]:
        """Batched p_fail from precomputed features: (B, Fo), (B, Fc), (B, K, Fk), (B, K)."""
        n = self.checkpoint.normalization
        o = (torch.as_tensor(obs, dtype=torch.float32) - n.observation_mean) / n.observation_std
        c = (torch.as_tensor(act, dtype=torch.float32) - n.chunk_mean) / n.chunk_std
        k = (torch.as_tensor(kf, dtype=torch.float32) - n.keyframe_mean) / n.keyframe_std
        with torch.inference_mode():
            logits = self.net(o, c, k, torch.as_tensor(valid, dtype=torch.bool))
        return torch.sigmoid(logits).double().numpy()

    def p_fail(self, observation: Observation, chunk: ActionChunk, subgoal: Any, memory: Any) -> float:
        obs, act, kf, valid = self.features(observation, chunk, subgoal, memory)
        return float(self.score_features(obs[None], act[None], kf[None], valid[None])[0])


@dataclass(frozen=True)
class RuleConfig:
    """Thresholds of the hand-written feasibility rules (set a priori, not fitted)."""

    limit_tolerance_rad: float = 0.01
    table_clearance_m: float = 0.005  # the grasp frame may not go below table + this
    grasp_reach_m: float = 0.04  # closing the fingers further than this from the object
    release_reach_m: float = 0.05  # opening further than this (xy) from the target point


class RuleVerifier:
    """Rule-based feasibility check as a `FailurePredictor`: each violated rule adds
    evidence, p_fail = 1 - prod(1 - w_rule) over the violated rules."""

    WEIGHTS = {"joint_limits": 0.9, "table_collision": 0.9, "close_far_from_object": 0.7,
               "open_far_from_target": 0.7, "placing_without_holding": 0.6}

    def __init__(self, config: RuleConfig | None = None) -> None:
        self.config = config or RuleConfig()
        self._featurizer = VerifierFeaturizer(VerifierFeatureConfig())

    def violations(self, observation: Observation, chunk: ActionChunk, subgoal: Any) -> list[str]:
        world = _world(observation)
        rows = np.asarray(chunk.positions, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != N_JOINTS or not np.all(np.isfinite(rows)):
            raise VerifierInputError(f"chunk must be finite (T, {N_JOINTS}) joint targets, got shape {rows.shape}")
        cfg = self.config
        task = observation.task
        call = parse_predicate(task.subgoals[_subgoal_index(observation, subgoal)].predicate)
        geometry = task.geometry
        out = []
        tol = cfg.limit_tolerance_rad
        if np.any(rows < POSITION_LOWER - tol) or np.any(rows > POSITION_UPPER + tol):
            out.append("joint_limits")
        kin = self._featurizer.kinematics
        ends = [np.asarray(kin.fk(row)[0]) for row in rows[::2]] + [np.asarray(kin.fk(rows[-1])[0])]
        if min(e[2] for e in ends) < TABLE_TOP_Z_M + cfg.table_clearance_m:
            out.append("table_collision")
        end = ends[-1]
        closing = float(np.mean(rows[-1, 7:9])) < _FINGER_CLOSED_BELOW_M
        obj = call.args[0]
        movable = obj in geometry.objects and geometry.objects[obj].movable
        if call.name in ("grasped", "lifted") and movable and closing and not grasped(world, geometry, obj):
            if np.linalg.norm(end - world.position(obj)) > cfg.grasp_reach_m:
                out.append("close_far_from_object")
        if call.name in ("in", "on") and movable:
            held = grasped(world, geometry, obj)
            target = call.args[1]
            if not held and np.linalg.norm(world.position(obj)[:2] - self._target_xy(world, task, target)) > cfg.release_reach_m:
                out.append("placing_without_holding")
            if held and not closing and np.linalg.norm(world.position(obj)[:2] - self._target_xy(world, task, target)) > cfg.release_reach_m:
                out.append("open_far_from_target")
        return out

    @staticmethod
    def _target_xy(world: WorldState, task: TaskSpec, name: str) -> NDArray[np.float64]:
        if name in task.geometry.regions:
            return np.asarray(task.geometry.regions[name].centre, dtype=np.float64)
        return world.position(name)[:2]

    def p_fail(self, observation: Observation, chunk: ActionChunk, subgoal: Any, memory: Any = None) -> float:
        keep = 1.0
        for rule in self.violations(observation, chunk, subgoal):
            keep *= 1.0 - self.WEIGHTS[rule]
        return 1.0 - keep


class EnsembleVerifier:
    """Disagreement of N policies with the proposal as a `FailurePredictor`.

    score = mean over chunk steps and arm joints of the standard deviation across
    {each member's chunk for this observation, the proposed chunk}; p_fail = 1 -
    exp(-score / scale), `scale` set so that the validation data's median score maps to
    0.5 (a monotone map: AUROC does not depend on it)."""

    def __init__(self, members: Sequence[Any], scale: float = 0.01) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs >= 2 policies, got {len(members)}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.members = list(members)
        self.scale = float(scale)

    @staticmethod
    def spread(chunks: Sequence[NDArray[np.floating]]) -> float:
        k = min(np.asarray(c).shape[0] for c in chunks)
        stack = np.stack([np.asarray(c, dtype=np.float64)[:k, :7] for c in chunks])  # (N, K, 7)
        return float(stack.std(axis=0).mean())

    def score(self, observation: Observation, chunk: ActionChunk) -> float:
        chunks = [member.select_action(observation).positions for member in self.members]
        return self.spread(chunks + [chunk.positions])

    def p_fail(self, observation: Observation, chunk: ActionChunk, subgoal: Any, memory: Any = None) -> float:
        _world(observation)
        return 1.0 - math.exp(-self.score(observation, chunk) / self.scale)


def load_verifier(spec: str) -> Any:
    """A FailurePredictor from a spec: "rule" -> RuleVerifier; a directory -> StateVerifier."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("verifier spec must be 'rule' or a state-verifier checkpoint directory, got an empty value")
    if spec == "rule":
        return RuleVerifier()
    try:
        return StateVerifier.load(spec)
    except VerifierCheckpointError as exc:
        raise ValueError(f"verifier {spec!r}: {exc}") from exc
