"""The scripted expert solves suite tasks end to end through `run_episode`, and the episode
loop reports subgoal progress and failures."""
import dataclasses

import numpy as np
import pytest

from sim.expert import ExpertConfig, ScriptedExpert
from sim.panda import N_JOINTS, POSITION_LOWER, POSITION_UPPER, PandaKinematics
from sim.rollout import PolicyOutputError, run_episode
from sim.scene import TabletopScene
from sim.tasks.suite import get_task, initial_state_seeds

HELDOUT = initial_state_seeds("heldout", 3)


@pytest.fixture(scope="module")
def scene():
    s = TabletopScene()
    yield s
    s.close()


@pytest.fixture(scope="module")
def expert():
    kinematics = PandaKinematics()
    yield ScriptedExpert(kinematics)
    kinematics.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("task_id", "seed"),
    [("bowl_then_stack", HELDOUT[0]), ("drawer_put_block", HELDOUT[1]), ("push_then_plate", HELDOUT[2])],
)
def test_expert_solves_task(scene, expert, task_id, seed):
    task = get_task(task_id)
    seen = []
    result = run_episode(scene, task, expert, seed, on_subgoal=lambda k, r: seen.append((k, r.success)))
    assert result.success, result.reason
    assert result.reason is None
    assert [s["name"] for s in result.subgoals] == [sg.name for sg in task.subgoals]
    assert seen == [(k, True) for k in range(len(task.subgoals))]
    for sub in result.subgoals:
        assert sub["success"] and 0 <= sub["steps"] <= task.max_steps_per_subgoal
        assert sub["duration_s"] == pytest.approx(sub["steps"] / scene.control_hz)
    assert result.total_steps == sum(s["steps"] for s in result.subgoals)
    assert result.duration_s == pytest.approx(result.total_steps / scene.control_hz)


def test_expert_episode_is_deterministic(scene, expert):
    task = get_task("tray_then_close_drawer")
    a = run_episode(scene, task, expert, HELDOUT[0])
    b = run_episode(scene, task, expert, HELDOUT[0])
    assert a.success and a.to_dict() == b.to_dict()


def test_expert_chunks_are_valid_joint_targets(scene, expert):
    task = get_task("stack_three")
    ws = scene.reset(task, HELDOUT[1])
    expert.reset()
    chunk = expert.act(ws, ws.joint_positions, task, 0)
    assert chunk.shape == (ExpertConfig().chunk_steps, N_JOINTS)
    assert np.all(chunk >= POSITION_LOWER - 1e-9) and np.all(chunk <= POSITION_UPPER + 1e-9)
    assert np.all(chunk[:, 7] == chunk[:, 8])
    # Consecutive targets are continuous (bounded Cartesian speed, IK seeded from the last).
    assert np.max(np.abs(np.diff(np.vstack([ws.joint_positions, chunk]), axis=0))[:, :7]) < 0.3
    with pytest.raises(IndexError):
        expert.act(ws, ws.joint_positions, task, len(task.subgoals))


class _HoldStill:
    def __init__(self) -> None:
        self.q = None

    def reset(self) -> None:
        self.q = None

    def act(self, world_state, joint_positions, task, subgoal_index):
        if self.q is None:
            self.q = np.asarray(joint_positions, dtype=float).copy()
        return np.tile(self.q, (4, 1))


def test_run_episode_fails_on_first_timed_out_subgoal(scene):
    task = dataclasses.replace(get_task("bowl_then_stack"), max_steps_per_subgoal=10)
    calls = []
    result = run_episode(scene, task, _HoldStill(), HELDOUT[0], on_subgoal=lambda k, r: calls.append(k))
    assert not result.success
    assert result.reason == "subgoal 0 'pick up the red cube' (grasped(red_cube)) not reached within 10 steps"
    assert calls == [0] and len(result.subgoals) == 1
    assert result.subgoals[0] == {
        "name": "pick up the red cube",
        "predicate": "grasped(red_cube)",
        "success": False,
        "steps": 10,
        "duration_s": pytest.approx(0.5),
    }


def test_run_episode_rejects_bad_policy_output(scene):
    class Bad(_HoldStill):
        def act(self, world_state, joint_positions, task, subgoal_index):
            return np.zeros((3, 7))

    with pytest.raises(PolicyOutputError, match=r"\(T, 9\)"):
        run_episode(scene, get_task("bowl_then_stack"), Bad(), HELDOUT[0])
