import dataclasses

import numpy as np
import pytest

from runtime.stats import mean_ci, percentile_ci, wilson_interval
from runtime.task_progress import Progress, TaskProgress
from sim.scene import TabletopScene
from sim.tasks.suite import get_task


@pytest.fixture(scope="module")
def start():
    task = get_task("pick_place_bowl")
    with TabletopScene() as scene:
        world = scene.reset(task, 1_000_000)
    return task, world


def test_times_out_a_subgoal_after_its_step_budget(start):
    task, world = start
    task = dataclasses.replace(task, max_steps_per_subgoal=5)
    progress = TaskProgress(task, start_time_s=world.sim_time_s)
    states = [progress.update(dataclasses.replace(world, sim_time_s=0.05 * (k + 1))) for k in range(5)]
    assert states[:4] == [Progress.RUNNING] * 4 and states[4] is Progress.FAILED
    assert progress.done and not progress.success
    assert "not reached within 5 steps" in progress.reason
    record = progress.records[0]
    assert (record.name, record.success, record.steps) == (task.subgoals[0].name, False, 5)
    assert record.duration_s == pytest.approx(0.25)
    with pytest.raises(RuntimeError):
        progress.update(world)


def test_fail_records_the_current_subgoal_once(start):
    task, world = start
    progress = TaskProgress(task, start_time_s=0.0)
    progress.update(world)
    progress.fail("node 'policy' exited", 1.5)
    progress.fail("second reason is ignored", 2.0)
    assert progress.reason == "node 'policy' exited" and len(progress.records) == 1
    assert progress.records[0].as_dict()["duration_s"] == 1.5


def test_percentile_ci_brackets_the_value():
    x = np.random.default_rng(0).normal(10.0, 1.0, 500)
    p50 = percentile_ci(x, 50)
    assert p50["ci95"][0] <= p50["value"] <= p50["ci95"][1]
    assert abs(p50["value"] - 10.0) < 0.2
    with pytest.raises(ValueError):
        percentile_ci([], 50)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 50)
    assert hi == pytest.approx(1.0) and 0.92 < lo < 0.93
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mean_ci_student_t_by_hand() -> None:
    # values 1, 2, 3: mean 2, sd 1, t_{0.975,2} = 4.303 -> half width 4.303 / sqrt(3) = 2.4843.
    out = mean_ci([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["n"] == 3
    assert abs(out["ci95"][0] - (2 - 2.48434)) < 1e-4 and abs(out["ci95"][1] - (2 + 2.48434)) < 1e-4
    assert mean_ci([0.5])["ci95"] == [0.5, 0.5]
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, float("nan")])
