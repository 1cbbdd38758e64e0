"""Chunk proposals with retry attempts: what the HELM harness asks a policy for.

The harness controller's RESAMPLE rung asks for "another" chunk for the same subgoal
(`ChunkProposer.propose(observation, subgoal, attempt)`). A sampling policy (diffusion,
flow, a VLA decoding with temperature) draws a new sample; a deterministic one (our BC
MLP, the scripted expert) would return the same chunk again and the retry would be
wasted. `PolicyProposer` gives every policy a proposal distribution:

- attempt 0 is the policy's own chunk, unchanged (HELM off or on proposes the same first
  chunk, so the harness is measured against the same policy);
- attempt k > 0 uses the policy's `sample_action(obs, rng)` when it has one, otherwise
  adds temporally smooth Gaussian noise to the chunk's joint targets (a random walk over
  the chunk's steps, arm joints only; fingers are left alone so grasp intent is kept).
  The noise generator is seeded from (seed, subgoal index, attempt, decision time in ms):
  a rerun of an evaluation episode proposes the same chunks, and resamples at different
  decisions draw different noise.

Policies with history (BC's motion features) must see each moment once: a resample at
the same observation reuses the chunk already computed there, and an observation earlier
than the last one (the harness rolled the world back) resets the policy's history first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies.base import ActionChunk, Observation, Policy

N_ARM_JOINTS = 7


@dataclass(frozen=True)
class ResampleConfig:
    """Exploration of RESAMPLE proposals for policies without their own sampler.

    `noise_rad` is the standard deviation of the random walk's increment per chunk step
    (radians), so the end of a K-step chunk moves about `noise_rad * sqrt(K)`.
    """

    noise_rad: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_rad, (int, float)) and math.isfinite(self.noise_rad) and self.noise_rad >= 0):
            raise ValueError(f"noise_rad must be a finite number >= 0, got {self.noise_rad!r}")


class PolicyProposer:
    """A `policies.base.Policy` as the harness controller's `ChunkProposer`."""

    def __init__(self, policy: Policy, config: ResampleConfig | None = None) -> None:
        self.policy = policy
        self.config = config or ResampleConfig()
        self._sample = getattr(policy, "sample_action", None)
        self._last: tuple[float, int, ActionChunk] | None = None  # (sim time, subgoal index, chunk)

    def reset(self, seed: int | None = None) -> None:
        """New episode: reset the policy; `seed` (e.g. the episode's) re-seeds the proposals."""
        self.policy.reset()
        self._last = None
        if seed is not None:
            self.config = ResampleConfig(noise_rad=self.config.noise_rad, seed=int(seed))

    def propose(self, observation: Observation, subgoal: Any, attempt: int) -> ActionChunk:
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        if attempt > 0 and self._sample is not None:
            rng = self._rng(observation, attempt)
            return self._sample(observation, rng)
        chunk = self._policy_chunk(observation)
        if attempt == 0:
            return chunk
        rng = self._rng(observation, attempt)
        steps = rng.normal(0.0, self.config.noise_rad, size=(chunk.positions.shape[0], N_ARM_JOINTS))
        positions = chunk.positions.copy()
        positions[:, :N_ARM_JOINTS] += np.cumsum(steps, axis=0)
        return ActionChunk(positions, chunk.times_s.copy())

    def _rng(self, observation: Observation, attempt: int) -> np.random.Generator:
        decision_ms = int(round(float(observation.sim_time_s) * 1000.0))
        return np.random.default_rng([self.config.seed, int(observation.subgoal_index), attempt, decision_ms])

    def _policy_chunk(self, observation: Observation) -> ActionChunk:
        now, index = float(observation.sim_time_s), int(observation.subgoal_index)
        if self._last is not None:
            last_time, last_index, last_chunk = self._last
            if now == last_time and index == last_index:
                return ActionChunk(last_chunk.positions.copy(), last_chunk.times_s.copy())
            if now < last_time:
                self.policy.reset()
        chunk = self.policy.select_action(observation)
        self._last = (now, index, chunk)
        return ActionChunk(chunk.positions.copy(), chunk.times_s.copy())
