"""The learned base policy: a behaviour-cloned, subgoal-conditioned action-chunk policy.

The stand-in for the vision-language-action model HELM (arXiv 2604.18791) wraps. It
loads a checkpoint written by `training.bc.train` and, per query, builds the same features
the training data had (`training.bc.model.ObservationFeaturizer`: proprioception, the
current subgoal, privileged object state from `Observation.world` and/or image embeddings
from an `ImageEncoder`), runs the network, and returns K joint-position targets at the
control rate. Privileged checkpoints set `requires_privileged_state`, so the policy node
subscribes to the simulator's ground truth for them.

History. Every policy keeps the previous decision's robot state, for the hand and gripper
velocity features. A checkpoint trained with a temporal window (`FeatureConfig.history` = H,
HELM's longer-context baseline) also keeps a rolling buffer of the last H decisions' feature
vectors, laid out as in training (`training.bc.model.window_from_frames`: oldest first,
zero-padded with a mask before the episode's first decision). `select_action` and
`observe(obs)` (take in an observation without acting: when taking over mid-episode from
another controller, as the per-subgoal evaluation does with the expert's last H decisions)
both feed it; `reset()` empties it. A decision is identified by its sim time: a second query
at the same sim time (the harness may ask again at the same moment after rejecting a chunk)
replaces that decision's frame instead of pushing another, and its motion features are
measured from the decision before, so a repeated identical query gets the same chunk. Time
going backwards (a new episode without `reset()`) empties the buffer.

Checks, each with an error that names what is wrong: the checkpoint's files and their
consistency (`CheckpointError`), the control rate the policy was trained at, an observation
that lacks what the checkpoint reads (`FeatureError`), and a network output that is not
finite (`NonFiniteActionError`, a RuntimeError the policy node treats as "propose nothing").
"""
from __future__ import annotations

import logging
import math
import os
from collections import deque
from pathlib import Path

import numpy as np
import torch

from policies.base import ActionChunk, Observation, Policy
from runtime.config import ConfigError
from sim.panda import N_JOINTS, PandaKinematics, gripper_width_from_joints
from training.bc.model import (
    CheckpointError,
    FeatureError,
    ImageEncoder,
    ObservationFeaturizer,
    RobotState,
    TextEncoder,
    decode_chunk,
    load_checkpoint,
    motion_features,
    window_from_frames,
)

logger = logging.getLogger(__name__)

CHECKPOINT_ENV = "HELMSTACK_BC_CHECKPOINT"
DEFAULT_CHECKPOINT = Path("runs/bc")

__all__ = ["BCPolicy", "CheckpointError", "FeatureError", "NonFiniteActionError", "policy_from_env"]


class NonFiniteActionError(RuntimeError):
    """The network produced NaN/inf targets (damaged weights or out-of-range inputs)."""


class BCPolicy(Policy):
    """Behaviour-cloned policy from a checkpoint directory or a training run directory."""

    def __init__(
        self,
        checkpoint: str | Path,
        control_hz: float = 20.0,
        execute_steps: int | None = None,
        image_encoder: ImageEncoder | None = None,
        text_encoder: TextEncoder | None = None,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            # One thread per process: small-model inference slows down badly when threads
            # contend for the cores with other processes.
            torch.set_num_threads(num_threads)
        self.checkpoint = load_checkpoint(checkpoint)
        action = self.checkpoint.action
        if not math.isclose(float(control_hz), action.control_hz):
            raise ValueError(f"control_hz is {control_hz}, but the policy {self.checkpoint.path} was trained at {action.control_hz} Hz")
        self.control_hz = float(control_hz)
        self.execute_steps = action.chunk_steps if execute_steps is None else int(execute_steps)
        if not 1 <= self.execute_steps <= action.chunk_steps:
            raise ValueError(f"execute_steps must be in [1, {action.chunk_steps}] (the trained chunk), got {execute_steps!r}")
        features = self.checkpoint.features
        if features.cameras:
            if image_encoder is None:
                raise FeatureError(f"the policy {self.checkpoint.path} reads image embeddings of {list(features.cameras)}: pass an image_encoder")
            if image_encoder.embedding_dim != features.image_embedding_dim:
                raise FeatureError(
                    f"image_encoder.embedding_dim is {image_encoder.embedding_dim}, the policy was trained on {features.image_embedding_dim}-d embeddings"
                )
        self.image_encoder = image_encoder
        self.featurizer = ObservationFeaturizer(features, text_encoder)
        self.requires_privileged_state = features.use_object_state
        self.cameras = features.cameras
        # Forward kinematics for observations without a world state; the policy node also
        # rebuilds world states with it for privileged policies.
        self.kinematics = PandaKinematics()
        stats = self.checkpoint.stats
        self._feature_mean, self._feature_std = stats.feature_mean, stats.feature_std  # (F,)
        self._action_mean, self._action_std = stats.action_mean, stats.action_std  # (K, 9)
        self._times_s = np.arange(1, self.execute_steps + 1, dtype=np.float64) / self.control_hz
        self.history_length = features.history  # decisions in the temporal window (0 = none)
        self._previous: tuple[RobotState, float] | None = None  # the last decision's robot state and time
        self._before_previous: tuple[RobotState, float] | None = None  # the decision before it
        # (sim time, normalised features (F,)) of the last H decisions, oldest first
        self._frames: deque[tuple[float, torch.Tensor]] = deque(maxlen=max(1, self.history_length))

    def reset(self) -> None:
        """Forget the history (the motion features start from rest, the window is empty)."""
        self._previous = None
        self._before_previous = None
        self._frames.clear()

    @property
    def history_frames(self) -> int:
        """How many decisions the temporal window holds now (0 without history)."""
        return len(self._frames) if self.history_length else 0

    def _robot_state(self, obs: Observation, q: np.ndarray) -> RobotState:
        if obs.world is not None:
            return RobotState(q, obs.world.ee_position, obs.world.ee_quaternion, obs.world.gripper_width)
        ee_position, ee_quaternion = self.kinematics.fk(q)
        return RobotState(q, np.asarray(ee_position), np.asarray(ee_quaternion), gripper_width_from_joints(q[7:9]))

    def _image_embeddings(self, obs: Observation) -> dict[str, np.ndarray]:
        encoder = self.image_encoder
        if encoder is None:
            raise FeatureError("no image encoder")  # __init__ refuses image policies without one
        out = {}
        for camera in self.cameras:
            image = obs.images.get(camera)
            if image is None:
                raise FeatureError(f"the policy needs the {camera!r} camera image; the observation has {sorted(obs.images)}")
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise FeatureError(f"image {camera!r} must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
            out[camera] = np.asarray(encoder.encode_images(image[None]))[0]
        return out

    @staticmethod
    def _joint_positions(obs: Observation) -> np.ndarray:
        q = np.asarray(obs.joint_positions, dtype=np.float64).reshape(-1)
        if q.shape != (N_JOINTS,) or not np.all(np.isfinite(q)):
            raise FeatureError(f"joint_positions must be {N_JOINTS} finite values, got {obs.joint_positions!r}")
        return q

    def _motion_base(self, time_s: float) -> tuple[RobotState | None, float]:
        """The decision the motion features are measured from: the previous one, or the one
        before it when this query repeats the previous decision's sim time."""
        if self._previous is not None and time_s == self._previous[1]:
            return self._before_previous or (None, 0.0)
        return self._previous or (None, 0.0)

    def _remember(self, robot: RobotState, time_s: float, frame: torch.Tensor | None) -> None:
        """Record a decision: the robot state for motion, the frame for the window (a repeat
        of the newest decision's sim time replaces it; earlier time empties the window)."""
        repeat = self._previous is not None and time_s == self._previous[1]
        if not repeat:
            self._before_previous = self._previous
        self._previous = (robot, time_s)
        if frame is None:
            return
        if self._frames and time_s < self._frames[-1][0]:
            logger.debug("sim time went back from %.3f to %.3f s: starting a new history", self._frames[-1][0], time_s)
            self._frames.clear()
        if self._frames and time_s == self._frames[-1][0]:
            self._frames[-1] = (time_s, frame)
        else:
            self._frames.append((time_s, frame))

    def _features(self, obs: Observation) -> tuple[np.ndarray, RobotState, torch.Tensor]:
        """(joint positions, robot state, normalised features (F,)) of one observation."""
        q = self._joint_positions(obs)
        if self.requires_privileged_state and obs.world is None:
            raise FeatureError(f"the policy {self.checkpoint.path} reads privileged object state: the observation needs .world (sim only)")
        if not math.isfinite(obs.sim_time_s):
            raise FeatureError(f"sim_time_s must be finite, got {obs.sim_time_s!r}")
        robot = self._robot_state(obs, q)
        previous, previous_time_s = self._motion_base(obs.sim_time_s)
        features = self.featurizer.features(
            robot,
            obs.task,
            obs.subgoal_index,
            world=obs.world if self.requires_privileged_state else None,
            image_embeddings=self._image_embeddings(obs) if self.cameras else None,
            motion=motion_features(previous, previous_time_s, robot, obs.sim_time_s),
        )
        return q, robot, (torch.from_numpy(features) - self._feature_mean) / self._feature_std

    def observe(self, obs: Observation) -> None:
        """Take in an observation without acting: the history (motion features, and the
        temporal window of a history checkpoint) when this policy takes over from another
        controller mid-episode. Observations must come in decision order."""
        if not self.history_length:
            q = self._joint_positions(obs)
            self._remember(self._robot_state(obs, q), obs.sim_time_s, None)
            return
        _, robot, x = self._features(obs)
        self._remember(robot, obs.sim_time_s, x)

    def select_action(self, obs: Observation) -> ActionChunk:
        q, robot, x = self._features(obs)  # x: (F,) normalised
        self._remember(robot, obs.sim_time_s, x if self.history_length else None)
        with torch.inference_mode():
            if self.history_length:
                window, mask = window_from_frames([f for _, f in self._frames], self.history_length, x.shape[0])
                y = self.checkpoint.net(x[None], window, mask)[0]
            else:
                y = self.checkpoint.net(x[None])[0]
            y = y * self._action_std + self._action_mean  # (K, 9) encoded chunk
        encoded = y.numpy()
        if not np.all(np.isfinite(encoded)):
            raise NonFiniteActionError(
                f"the policy {self.checkpoint.path} produced non-finite targets for task {obs.task.task_id!r} subgoal {obs.subgoal_index}"
            )
        positions = decode_chunk(encoded[: self.execute_steps], q)  # (T, 9) absolute, within joint limits
        return ActionChunk(positions, self._times_s.copy())


def policy_from_env(control_hz: float) -> BCPolicy:
    """Registry factory: the checkpoint (or training run) named by $HELMSTACK_BC_CHECKPOINT,
    else runs/bc, where `helmstack train bc --out runs/bc` puts it."""
    path = Path(os.environ.get(CHECKPOINT_ENV, str(DEFAULT_CHECKPOINT)))
    try:
        return BCPolicy(path, control_hz=control_hz, num_threads=1)
    except CheckpointError as exc:
        # The registry's callers report ValueError (ConfigError is one) as a setup problem.
        raise ConfigError(f"policy 'bc': {exc} (set ${CHECKPOINT_ENV} to a trained run, see `helmstack train bc`)") from exc
