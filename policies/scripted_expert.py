"""The scripted expert (sim.expert) behind the policy interface.

Privileged: it reads the simulator's ground truth, so it runs only with sim:=true. It is
the demonstrator for behaviour cloning and the policy of the foundation demo.
"""
from __future__ import annotations

import numpy as np

from policies.base import ActionChunk, Observation, Policy
from sim.expert import ScriptedExpert
from sim.panda import PandaKinematics


class ScriptedExpertPolicy(Policy):
    requires_privileged_state = True

    def __init__(self, control_hz: float = 20.0) -> None:
        self.control_hz = control_hz
        self.kinematics = PandaKinematics()
        self.expert = ScriptedExpert(self.kinematics, control_hz=control_hz)

    def reset(self) -> None:
        self.expert.reset()

    def select_action(self, obs: Observation) -> ActionChunk:
        if obs.world is None:
            raise ValueError("the scripted expert needs the simulator's ground truth (sim:=true)")
        positions = self.expert.act(obs.world, obs.joint_positions, obs.task, obs.subgoal_index)
        times = np.arange(1, positions.shape[0] + 1, dtype=np.float64) / self.control_hz
        return ActionChunk(positions, times)
