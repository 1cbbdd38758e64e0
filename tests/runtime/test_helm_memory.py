"""HELM's memory adapter: keyframes written by the controller are retrievable for the
verifier (own episode only), rollback targets come back with their handles, and bad
input is refused. Uses a randomly initialised open_clip model through the real encoder."""
from __future__ import annotations

import numpy as np
import pytest

from perception.encoder import ClipEncoder
from policies.base import Observation
from runtime.helm_memory import GripperEvents, HelmMemory, view_of
from runtime.state_verifier import VerifierInputError
from sim.scene import TabletopScene
from sim.tasks.suite import get_task
from training.bc.demos import make_cameras, render_cameras

TASK = get_task("bowl_then_stack")


@pytest.fixture(scope="module")
def observations():
    with TabletopScene() as scene:
        cams = make_cameras(scene, ("front",), 64, 64)
        out = []
        for seed in (1, 2):
            ws = scene.reset(TASK, seed)
            out.append(Observation(ws.joint_positions, ws.sim_time_s, TASK, 0, ws, render_cameras(scene, cams)))
        yield out


@pytest.fixture(scope="module")
def encoder():
    return ClipEncoder()


def test_write_retrieve_and_rollback_target(encoder, observations):
    memory = HelmMemory(encoder)
    memory.start_episode("a")
    memory.write("episode_start", 0, TASK.subgoals[0], observations[0], 7, True)
    memory.write("alarm", 0, TASK.subgoals[0], observations[0], None, False)
    assert memory.episode_kinds == {"episode_start": 1, "alarm": 1}
    memory.start_episode("b")
    memory.write("subgoal_start", 1, TASK.subgoals[1], observations[1], 9, True)
    assert memory.episode_kinds == {"subgoal_start": 1}  # counted per episode
    target = memory.last_verified()
    assert (target.handle, target.subgoal_index) == (9, 1)
    context = memory.context(observations[1], 1, k=5)
    assert len(context) == 1 and context[0].kind == "subgoal_start"  # only episode b
    memory.start_episode("a")
    kinds = {v.kind for v in memory.context(observations[0], 0, k=5)}
    assert kinds == {"episode_start", "alarm"}
    assert memory.last_verified().handle == 7
    # a keyframe loaded back from disk reads the same as the one kept in memory
    stored = memory.memory.get(0)
    assert view_of(stored).subgoal_index == 0 and view_of(stored).kind == "episode_start"


def test_bad_input_is_refused(encoder, observations):
    memory = HelmMemory(encoder)
    with pytest.raises(RuntimeError, match="start_episode"):
        memory.write("episode_start", 0, TASK.subgoals[0], observations[0], 1, True)
    memory.start_episode("x")
    with pytest.raises(ValueError, match="kind"):
        memory.write("bogus", 0, TASK.subgoals[0], observations[0], 1, True)
    blind = Observation(observations[0].joint_positions, 0.0, TASK, 0, observations[0].world, {})
    with pytest.raises(VerifierInputError, match="camera"):
        memory.write("episode_start", 0, TASK.subgoals[0], blind, 1, True)
    assert memory.last_verified() is None and memory.context(observations[0], 0, 3) == []
    with pytest.raises(ValueError):
        memory.start_episode("")


def test_gripper_events_fire_on_changes_of_the_commanded_fingers():
    events = GripperEvents()
    open_, closed = np.array([0.04, 0.04]), np.array([0.0, 0.0])
    # The first row only sets the state; then close, stay closed, open.
    assert [events.update(row) for row in (open_, closed, closed, open_)] == [None, "close", None, "open"]
    events.reset()  # a restored world: the next row sets the state again
    assert events.update(closed) is None and events.update(open_) == "open"
