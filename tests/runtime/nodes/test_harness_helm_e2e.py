"""The HELM harness through the whole graph: `helmstack run --sim --harness helm` over real
DDS between real processes (sim_bridge, safety, policy, harness), with the scripted expert
(no trained checkpoint needed) and the rule-based state verifier.

A task succeeds with every chunk verified before it runs; the controller's transitions
arrive on harness/status and in result.json; a harness config that makes every attempt
fail climbs the recovery ladder, and its rollback really restores the simulator through
sim/restore_state; bad verifier specs and bad harness configs stop the run at start-up with
the reason. The simulator runs a light sensor rig (joint states and ground truth, a small
front camera) so each run stays well under a minute on two cores.
"""
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HELMSTACK = [sys.executable, "-m", "runtime.cli"]
TASK, SEED = "pick_place_bowl", 1_000_000  # the suite's shortest task (3 subgoals)
LIGHT_SIM = """physics_hz: 240
control_hz: 20
sensors:
  front_camera: {width: 128, height: 128, fov_y_deg: 60.0, rate_hz: 2.0}
  enable_wrist_camera: false
  enable_lidar: false
  enable_event_camera: false
"""


@pytest.fixture
def light_launch(tmp_path) -> Path:
    """The package's launch file reading its configs from a copy with the light sim.yaml."""
    config = tmp_path / "config"
    shutil.copytree(ROOT / "launch/config", config)
    (config / "sim.yaml").write_text(LIGHT_SIM)
    launch = tmp_path / "graph.launch.yaml"
    text = (ROOT / "launch/helmstack.launch.yaml").read_text()
    assert '"$(find-pkg-share helmstack)/launch/config"' in text
    launch.write_text(text.replace('"$(find-pkg-share helmstack)/launch/config"', f'"{config}"'))
    return launch


def run(env, launch: Path, out: Path, *extra: str, timeout_s: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([*HELMSTACK, "run", "--sim", "--task", TASK, "--seed", str(SEED), "--out", str(out),
                           "--launch-file", str(launch), "--real-time-factor", "0", "--harness", "helm", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.timeout(180)
def test_helm_run_verifies_every_chunk_and_succeeds(ros_env, helmstack_interfaces, light_launch, tmp_path):
    out = tmp_path / "run"
    proc = run(ros_env, light_launch, out, "--no-bag")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["success"] is True and result["task"] == TASK
    assert [s["success"] for s in result["subgoals"]] == [True, True, True]
    harness = result["harness"]
    assert harness["mode"] == "helm" and harness["final_state"] == "done"
    # Every proposal is verified before anything runs; the rule check may reject a few of the
    # expert's chunks (then another proposal is verified), so calls >= executed chunks.
    assert harness["chunks_executed"] > 3 and harness["verifier_calls"] >= harness["chunks_executed"]
    # Every transition streamed on harness/status reached the recorder, in order.
    transitions = harness["transitions"]
    assert harness["transitions_streamed"] == len(transitions)
    assert [t["seq"] for t in transitions] == list(range(len(transitions)))
    pairs = Counter((t["from_state"], t["to_state"]) for t in transitions)
    assert pairs[("start", "propose")] == 1 and pairs[("check", "done")] == 1
    assert pairs[("propose", "verify")] == harness["verifier_calls"]
    assert pairs[("verify", "execute")] + harness["rejections"] >= harness["verifier_calls"]
    assert pairs[("execute", "check")] == harness["chunks_executed"]
    assert all(t["p_fail"] is not None and 0.0 <= t["p_fail"] <= 1.0 for t in transitions if t["from_state"] == "verify")
    assert "HELM harness:" in proc.stderr

    # What went over the graph (counted by the run over reliable subscriptions): a verdict
    # per verifier decision, exactly one proposal per request (no streaming), and a command
    # on robot/command_raw only for a chunk the controller executed.
    graph = harness["graph"]
    verdicts = graph["verdicts"]
    assert sum(verdicts.values()) == harness["verifier_calls"] and set(verdicts) <= {"accept", "reject"}
    assert graph["requests"] == harness["verifier_calls"]
    assert graph["proposals"] == graph["requests"]
    assert graph["commands"] == harness["chunks_executed"] and verdicts.get("accept", 0) <= harness["chunks_executed"]
    log = (out / "logs/harness.log").read_text()
    assert "helm mode: controller verified" in log and "verifier 'rule'" in log


@pytest.mark.timeout(180)
def test_failed_attempts_roll_the_simulator_back(ros_env, helmstack_interfaces, light_launch, tmp_path):
    """One chunk per attempt can never pick up the cube: the first attempt fails, the policy
    resamples, then the controller rolls back to the subgoal's start keyframe through
    sim/restore_state, resamples again, and gives up with the ladder exhausted."""
    config = tmp_path / "harness.yaml"
    config.write_text("harness:\n  max_chunks_per_attempt: 1\n  n_resample: 1\n  max_rollbacks: 1\n"
                      "  max_replans: 0\n  ladder: [resample, rollback]\n")
    out = tmp_path / "run"
    proc = run(ros_env, light_launch, out, "--harness-config", str(config), "--no-bag")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out / "result.json").read_text())
    harness = result["harness"]
    assert result["success"] is False and harness["final_state"] == "failed"
    assert "recovery ladder exhausted" in harness["reason"] and "recovery ladder exhausted" in result["reason"]
    assert harness["rollbacks"] == 1 and harness["resamples"] == 2
    states = [(t["from_state"], t["to_state"]) for t in harness["transitions"]]
    assert ("rollback", "propose") in states and ("check", "rollback") in states
    rollback = next(t for t in harness["transitions"] if t["from_state"] == "rollback")
    assert "restored the last verified keyframe" in rollback["reason"]
    assert max(t["attempt"] for t in harness["transitions"]) == 3
    # The rollback went through the simulator: sim_bridge restored the snapshot taken at the start.
    sim_log = (out / "logs/sim_bridge.log").read_text()
    assert "restored state 0" in sim_log
    assert result["subgoals"] == [{"name": "pick up the red cube", "success": False, "steps": result["subgoals"][0]["steps"],
                                   "duration_s": result["subgoals"][0]["duration_s"]}]


@pytest.mark.timeout(120)
def test_bad_verifier_or_config_stops_the_run_at_start_up(ros_env, helmstack_interfaces, light_launch, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    proc = run(ros_env, light_launch, tmp_path / "a", "--verifier", str(missing), "--no-bag", timeout_s=100)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("helmstack: error:")][0]
    assert "harness" in error and f"cannot load verifier '{missing}'" in error

    bad = tmp_path / "bad.yaml"
    bad.write_text("harness:\n  tau: 1.5\n")
    proc = run(ros_env, light_launch, tmp_path / "b", "--harness-config", str(bad), "--no-bag", timeout_s=100)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("helmstack: error:")][0]
    assert "harness.tau" in error and "1.5" in error


def test_helm_flags_are_checked_before_anything_starts(ros_env, tmp_path):
    proc = subprocess.run([*HELMSTACK, "run", "--sim", "--task", TASK, "--out", str(tmp_path / "o"), "--verifier", "rule"],
                          cwd=ROOT, env=ros_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "add --harness helm" in proc.stderr
    proc = subprocess.run([*HELMSTACK, "run", "--sim", "--task", TASK, "--out", str(tmp_path / "o"), "--harness", "helm",
                           "--harness-config", str(tmp_path / "missing.yaml")],
                          cwd=ROOT, env=ros_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "missing.yaml: no such file" in proc.stderr
    proc = subprocess.run([*HELMSTACK, "run", "--sim", "--task", TASK, "--harness", "verified"],
                          cwd=ROOT, env=ros_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'verified'" in proc.stderr


@pytest.mark.timeout(180)
def test_helm_run_with_memory_keeps_gripper_keyframes(ros_env, helmstack_interfaces, light_launch, tmp_path):
    """With an encoder the harness keys episodic memory on the front camera: the episode's
    keyframes include the expert's gripper closing and opening, seen over ROS."""
    import torch

    from perception.encoder import ClipEncoder

    encoder = tmp_path / "encoder.pt"
    torch.save({"state_dict": ClipEncoder().model.state_dict()}, encoder)  # untrained weights load the same way
    out = tmp_path / "run"
    proc = run(ros_env, light_launch, out, "--encoder", str(encoder), "--no-bag")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = next(l for l in (out / "logs/harness.log").read_text().splitlines() if "episodic memory:" in l)
    for kind in ("episode_start", "subgoal_start", "gripper_close", "gripper_open"):
        assert kind in line, line
