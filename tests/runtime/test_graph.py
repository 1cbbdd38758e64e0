"""The whole graph through the user's command: `helmstack run --sim` over real DDS between
real processes. Also what must happen when things go wrong: unknown task, bad launch
file, a node killed mid-task, and that no DDS socket leaves loopback."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.socket_audit import udp_sockets_of

ROOT = Path(__file__).resolve().parents[2]
HELMSTACK = [sys.executable, "-m", "runtime.cli"]
TASK, SEED = "tray_then_close_drawer", 1_000_000


def children_of(pid: int) -> dict[int, str]:
    """{pid: cmdline} of the direct children of `pid` (the node processes of a run)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def start_run(env, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*HELMSTACK, "run", "--sim", "--task", TASK, "--seed", str(SEED), "--out", str(out),
                             "--real-time-factor", "0", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_nodes(proc: subprocess.Popen, names: list[str], timeout_s: float = 60.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = children_of(proc.pid)
        if all(any(n in cmd for cmd in kids.values()) for n in names):
            return kids
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"nodes {names} did not start")


@pytest.mark.timeout(400)
def test_run_task_end_to_end_on_loopback(ros_env, helmstack_interfaces, tmp_path):
    out = tmp_path / "run"
    proc = start_run(ros_env, out)
    try:
        kids = wait_for_nodes(proc, ["sim_bridge_node", "safety_node", "policy_node", "harness_node"])
        time.sleep(5.0)  # discovery done, task running
        pids = [proc.pid, *kids]
        sockets = udp_sockets_of(pids)
        assert sockets, "the graph's processes hold no UDP socket: audit is not looking at DDS"
        assert all(ip == "127.0.0.1" for _, ip, _ in sockets), sockets
        output, _ = proc.communicate(timeout=360)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["success"] is True and result["task"] == TASK
    assert {"success", "task", "subgoals", "duration_s", "nodes"} <= set(result)
    assert sorted(result["nodes"]) == ["harness", "policy", "safety", "sim_bridge"]
    assert len(result["subgoals"]) >= 3 and all(s["success"] and s["steps"] > 0 for s in result["subgoals"])
    assert result["duration_s"] > 0
    frames = list((out / "frames").glob("*.png"))
    assert len(frames) >= 2
    counts = result["bag"]["messages"]
    for topic in ("/joint_states", "/robot/command", "/camera/front/image_raw", "/lidar/points", "/events", "/tactile"):
        assert counts[topic] > 0, topic
    from rosbags.rosbag2 import Reader

    with Reader(out / "bag") as reader:
        topics = {c.topic for c in reader.connections}
        assert "/robot/command" in topics and reader.message_count > 100


def test_unknown_task_is_a_setup_error(ros_env, tmp_path):
    proc = subprocess.run([*HELMSTACK, "run", "--sim", "--task", "no_such_task", "--out", str(tmp_path)],
                          cwd=ROOT, env=ros_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("helmstack: error:")]
    assert len(errors) == 1 and "no_such_task" in errors[0] and "valid ids" in errors[0]


def test_malformed_launch_file_is_a_setup_error(ros_env, helmstack_interfaces, tmp_path):
    bad = tmp_path / "bad.launch.yaml"
    bad.write_text("launch:\n- executable: {cmd: rm}\n")
    proc = subprocess.run([*HELMSTACK, "run", "--sim", "--task", TASK, "--out", str(tmp_path / "o"), "--launch-file", str(bad)],
                          cwd=ROOT, env=ros_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unsupported action 'executable'" in proc.stderr
    proc = subprocess.run([*HELMSTACK, "launch", str(bad)], cwd=ROOT, env=ros_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "executable" in proc.stderr


@pytest.mark.timeout(300)
def test_node_killed_mid_task_fails_the_task(ros_env, helmstack_interfaces, tmp_path):
    out = tmp_path / "run"
    proc = start_run(ros_env, out)
    try:
        kids = wait_for_nodes(proc, ["policy_node"])
        deadline = time.monotonic() + 120
        log = out / "logs" / "harness.log"
        while not (log.exists() and "reached" in log.read_text()):  # first subgoal done: mid-task
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        policy_pid = next(pid for pid, cmd in kids.items() if "policy_node" in cmd)
        os.kill(policy_pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["success"] is False
    assert "policy" in result["reason"] and "-9" in result["reason"]
    assert result["subgoals"] == [] or not all(s["success"] for s in result["subgoals"])
    # Nothing left behind: every node of the run is gone.
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text() for pid in kids)


@pytest.mark.timeout(120)
def test_malformed_node_config_names_the_field(ros_env, helmstack_interfaces, tmp_path):
    config = tmp_path / "config"
    shutil.copytree(ROOT / "launch/config", config)
    (config / "sim.yaml").write_text("physics_hz: 240\ncontrol_hz: 7\n")  # 240 is no multiple of 7
    launch = tmp_path / "graph.launch.yaml"
    launch.write_text((ROOT / "launch/helmstack.launch.yaml").read_text().replace(
        '"$(find-pkg-share helmstack)/launch/config"', f'"{config}"'))
    proc = subprocess.run([*HELMSTACK, "run", "--sim", "--task", TASK, "--out", str(tmp_path / "o"), "--launch-file", str(launch)],
                          cwd=ROOT, env=ros_env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("helmstack: error:")][0]
    assert "sim_bridge" in error and "control_hz" in error


@pytest.mark.timeout(120)
def test_launch_keeps_the_graph_up_until_ctrl_c(ros_env, ros_node, tmp_path):
    proc = subprocess.Popen([*HELMSTACK, "launch", "launch/helmstack.launch.yaml", "sim:=true", "--log-dir", str(tmp_path)],
                            cwd=ROOT, env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        expected = {"sim_bridge", "safety", "policy", "harness"}
        deadline = time.monotonic() + 60
        while not expected <= set(ros_node.get_node_names()):
            assert time.monotonic() < deadline and proc.poll() is None, set(ros_node.get_node_names())
            time.sleep(0.2)
        kids = children_of(proc.pid)
        while ros_node.count_publishers("/camera/front/image_raw") != 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in kids)
