"""The policy interface every manipulation policy implements (scripted, learned, remote).

Small and fixed, like LeRobot's: `reset()` at episode start, `select_action(obs)` returns
an action chunk of joint-position targets. The policy node, evaluations and benchmarks
call policies only through this.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from sim.tasks.spec import TaskSpec
from sim.world_state import WorldState


@dataclass
class Observation:
    joint_positions: np.ndarray  # (9,) rad / m, in sim.panda.JOINT_NAMES order
    sim_time_s: float
    task: TaskSpec
    subgoal_index: int
    world: WorldState | None = None  # privileged simulator state; None on a real robot
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera name -> (H, W, 3) uint8


@dataclass
class ActionChunk:
    positions: np.ndarray  # (T, 9) joint targets, JOINT_NAMES order
    times_s: np.ndarray  # (T,) seconds after the chunk is issued

    def __post_init__(self) -> None:
        if self.positions.ndim != 2 or self.times_s.shape != (self.positions.shape[0],):
            raise ValueError(f"ActionChunk needs positions (T, n) and times (T,), got {self.positions.shape} and {self.times_s.shape}")


class Policy(ABC):
    #: True when the policy reads Observation.world (only possible in simulation).
    requires_privileged_state: bool = False

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def select_action(self, obs: Observation) -> ActionChunk: ...
