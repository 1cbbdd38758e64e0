"""The harness node's helm-mode configuration: the shipped harness.yaml loads, bad files
are refused naming the field, an unknown mode or verifier stops the node at start-up, and
re-planned subgoals map back onto the task's own subgoal indices."""
import time
from pathlib import Path

import pytest

from runtime.launcher import NodeAction, NodeProcessGroup

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_harness_config_loads():
    from runtime.harness_controller import HarnessControllerConfig
    from runtime.nodes.harness import load_helm_config
    from runtime.planner import make_planner, RulePlanner

    config = load_helm_config(ROOT / "launch/config/harness.yaml")
    assert isinstance(config.harness, HarnessControllerConfig) and config.harness.mode == "verified"
    assert config.harness.ladder == ("resample", "rollback", "replan")
    assert isinstance(make_planner(config.planner), RulePlanner)
    assert load_helm_config("") == load_helm_config(None)


@pytest.mark.parametrize("text, message", [
    ("harness:\n  tau: 1.5\n", "harness.tau"),
    ("harness:\n  ladder: [resample, teleport]\n", "teleport"),
    ("harness:\n  n_resamples: 3\n", "unknown field(s) ['n_resamples']"),
    ("planner:\n  llm: {base_url: 'ftp://x'}\n", "planner.llm"),
    ("verifier: rule\n", "unknown section(s) ['verifier']"),
    ("- just\n- a list\n", "must be a mapping"),
    ("harness: [\n", "invalid YAML"),
])
def test_bad_harness_configs_name_the_problem(tmp_path, text, message):
    from runtime.config import ConfigError
    from runtime.nodes.harness import load_helm_config

    path = tmp_path / "harness.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_helm_config(path)
    assert message in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_helm_config(tmp_path / "missing.yaml")


def test_replanned_subgoals_map_to_task_indices():
    from runtime.nodes.harness_ros_env import HarnessEnvError, task_subgoal_index
    from runtime.planner import RulePlanner
    from sim.tasks.spec import SubgoalSpec
    from sim.tasks.suite import get_task

    task = get_task("pick_place_bowl")
    for i, subgoal in enumerate(task.subgoals):
        assert task_subgoal_index(task, subgoal) == i
    # The planner words subgoals its own way; the predicate decides.
    for planned, own in zip(RulePlanner().plan(task.instruction), task.subgoals):
        assert task_subgoal_index(task, planned) == task_subgoal_index(task, own)
    reworded = SubgoalSpec(name="put it away", predicate=task.subgoals[2].predicate)
    assert task_subgoal_index(task, reworded) == 2
    with pytest.raises(HarnessEnvError, match="is not one of task 'pick_place_bowl'"):
        task_subgoal_index(task, SubgoalSpec(name="stack", predicate="on(red_cube, bowl)"))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("params, message", [
    ({"mode": "verified"}, "parameter mode must be one of ['pass_through', 'helm'], got 'verified'"),
    ({"mode": "helm", "verifier": ""}, "parameter verifier is empty"),
    ({"mode": "helm", "proposal_timeout_s": -1.0}, "proposal_timeout_s must be a finite number > 0"),
    ({"mode": "helm", "encoder": "/nonexistent/encoder.pt"}, "cannot load encoder '/nonexistent/encoder.pt'"),
])
def test_bad_harness_parameters_refuse_to_start(ros_env, helmstack_interfaces, tmp_path, params, message):
    node = NodeAction(pkg="helmstack", executable="harness_node", name="harness", parameters=[params])
    with NodeProcessGroup([node], env=ros_env, log_dir=tmp_path) as group:
        deadline = time.monotonic() + 60
        while not group.poll():
            assert time.monotonic() < deadline, "the harness kept running with a bad parameter"
            time.sleep(0.1)
        assert group.poll() == [("harness", 2)]
    assert message in (tmp_path / "harness.log").read_text()
