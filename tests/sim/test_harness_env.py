"""The simulated harness environment, the recovery protocol's perturbations and the
proposal distribution of RESAMPLE: execution stops at the subgoal, snapshots restore the
world, perturbations survive a rollback, resamples differ from the policy's chunk."""
from __future__ import annotations

import numpy as np
import pytest

from policies.base import ActionChunk, Observation, Policy
from policies.proposer import PolicyProposer, ResampleConfig
from sim.harness_env import SceneHarnessEnv
from sim.perturbations import PerturbationSpec, Perturber, draw_perturbation
from sim.scene import TabletopScene
from sim.tasks.suite import get_task

TASK = get_task("bowl_then_stack")


@pytest.fixture
def scene():
    with TabletopScene() as s:
        s.reset(TASK, 11)
        yield s


def still(env: SceneHarnessEnv, steps: int = 6) -> ActionChunk:
    q = env.scene.joint_state()[0]
    return ActionChunk(np.repeat(q[None], steps, axis=0), np.arange(1, steps + 1) / 20.0)


def test_snapshot_restore_returns_to_the_same_world(scene):
    env = SceneHarnessEnv(scene, TASK)
    env.set_subgoal(TASK.subgoals[0], 0)
    handle = env.snapshot()
    before = scene.world_state()
    chunk = still(env)
    chunk.positions[:, 0] += 0.3  # swing the arm
    env.execute(chunk)
    assert env.steps_executed == 6 and not np.allclose(scene.world_state().joint_positions, before.joint_positions)
    env.restore(handle)
    after = scene.world_state()
    assert np.allclose(after.joint_positions, before.joint_positions) and after.sim_time_s == before.sim_time_s
    assert env.steps_executed == 6  # executed steps are not rewound
    with pytest.raises(KeyError, match="unknown snapshot"):
        env.restore(99)
    with pytest.raises(ValueError, match="finite"):
        bad = still(env)
        bad.positions[0, 0] = np.nan
        env.execute(bad)


def test_execution_stops_when_the_subgoal_holds(scene):
    env = SceneHarnessEnv(scene, TASK)
    # a subgoal that already holds at reset: released(red_cube) is true, nothing in hand
    from sim.tasks.spec import SubgoalSpec

    env.set_subgoal(SubgoalSpec("let go of the red cube", "released(red_cube)"), 0)
    env.execute(still(env))
    assert env.steps_executed == 1


def test_displacement_survives_a_rollback(scene):
    spec = PerturbationSpec("object_displaced", trigger_step=3)
    perturber = Perturber(scene, TASK, spec, seed=5)
    env = SceneHarnessEnv(scene, TASK, perturber=perturber)
    env.set_subgoal(TASK.subgoals[0], 0)
    handle = env.snapshot()
    start = {k: v[0].copy() for k, v in scene.world_state().object_poses.items()}
    for _ in range(5):  # 30 steps: fires at step 3, settles by step 23
        env.execute(still(env))
    assert perturber.fired is not None and perturber.fired.settled
    name = perturber.fired.objects[0]
    moved = scene.world_state().object_poses[name][0]
    assert 0.05 < np.linalg.norm(moved[:2] - start[name][:2]) < 0.11
    env.restore(handle)  # back to before the event: the object stays where the event left it
    assert np.allclose(scene.world_state().object_poses[name][0], perturber.fired.settled[name][0])


def test_grasp_drop_waits_for_a_grasp_and_draws_are_reproducible(scene):
    perturber = Perturber(scene, TASK, PerturbationSpec("grasp_dropped", 0), seed=1)
    env = SceneHarnessEnv(scene, TASK, perturber=perturber)
    env.set_subgoal(TASK.subgoals[0], 0)
    env.execute(still(env))
    assert perturber.fired is None  # nothing is held yet
    assert draw_perturbation(TASK, 123) == draw_perturbation(TASK, 123)
    assert {draw_perturbation(TASK, s).kind for s in range(30)} == {"object_displaced", "grasp_dropped", "target_noise"}
    with pytest.raises(ValueError, match="kind"):
        PerturbationSpec("earthquake", 3)


class CountingPolicy(Policy):
    def __init__(self) -> None:
        self.calls = 0
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def select_action(self, obs: Observation) -> ActionChunk:
        self.calls += 1
        return ActionChunk(np.tile(obs.joint_positions, (4, 1)), np.arange(1, 5) / 20.0)


def test_resamples_reuse_the_query_and_differ_from_it(scene):
    policy = CountingPolicy()
    proposer = PolicyProposer(policy, ResampleConfig(noise_rad=0.02, seed=3))
    ws = scene.world_state()
    obs = Observation(ws.joint_positions, 1.0, TASK, 0, ws)
    first = proposer.propose(obs, TASK.subgoals[0], 0)
    second = proposer.propose(obs, TASK.subgoals[0], 1)
    again = proposer.propose(obs, TASK.subgoals[0], 1)
    assert policy.calls == 1  # one query per moment: history policies see it once
    assert not np.allclose(first.positions, second.positions)
    assert np.array_equal(second.positions, again.positions)  # seeded: reproducible
    assert np.array_equal(second.positions[:, 7:], first.positions[:, 7:])  # fingers untouched
    later = Observation(ws.joint_positions, 1.2, TASK, 0, ws)  # the same attempt at a later decision
    offset = lambda chunk, base: chunk.positions - base.positions
    later_first = proposer.propose(later, TASK.subgoals[0], 0)
    assert not np.allclose(offset(proposer.propose(later, TASK.subgoals[0], 1), later_first), offset(second, first))
    earlier = Observation(ws.joint_positions, 0.5, TASK, 0, ws)  # after a rollback
    proposer.propose(earlier, TASK.subgoals[0], 2)
    assert policy.resets == 1 and policy.calls == 3
    with pytest.raises(ValueError):
        proposer.propose(obs, TASK.subgoals[0], -1)
    with pytest.raises(ValueError):
        ResampleConfig(noise_rad=float("nan"))
