"""Starting nodes as processes: executable lookup, --ros-args, output relay, exit detection, shutdown."""
import importlib.util
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from runtime.dds import loopback_env
from runtime.launcher import (
    ExecutableNotFoundError,
    NodeAction,
    NodeProcessGroup,
    NodeStartError,
    load_launch_file,
    resolve_executable,
    ros_args,
)


def make_executable(prefix: Path, pkg: str, name: str, body: str) -> Path:
    """A Python script installed like colcon installs node executables."""
    path = prefix / "lib" / pkg / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def log_text(log_dir: Path, label: str) -> str:
    path = log_dir / f"{label}.log"
    return path.read_text() if path.exists() else ""


# Installs its handlers, says "ready", then waits for a signal.
SERVING = """
import os, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
print("argv", sys.argv[1:])
print("domain", os.environ.get("ROS_DOMAIN_ID"))
print("oops", file=sys.stderr)
print("ready")
while True:
    time.sleep(0.1)
"""

IGNORES_SIGINT = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready")
while True:
    time.sleep(0.1)
"""

IGNORES_SIGINT_AND_SIGTERM = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready")
while True:
    time.sleep(0.1)
"""


@pytest.fixture
def prefix(tmp_path, monkeypatch):
    root = tmp_path / "install"
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(root))
    return root


def test_resolve_executable_prefix_then_interpreter_dir_then_path(prefix, tmp_path, monkeypatch):
    installed = make_executable(prefix, "demo", "tool", "print(1)\n")
    assert resolve_executable("demo", "tool") == installed
    venv_python = Path(sys.executable)
    assert resolve_executable("demo", venv_python.name) == venv_python.parent / venv_python.name
    on_path = tmp_path / "bin" / "only_on_path"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert resolve_executable("demo", "only_on_path") == on_path
    with pytest.raises(ExecutableNotFoundError, match="executable 'nope' of package 'demo' not found"):
        resolve_executable("demo", "nope")


def test_ros_args_with_names_params_files_and_remaps(tmp_path):
    params_file = tmp_path / "given.yaml"
    node = NodeAction(
        pkg="helmstack", executable="policy_node", name="policy", namespace="/arm",
        parameters=[params_file, {"rate_hz": 30, "label": "5", "gains": [1.0, 2.0], "on": True}],
        remappings=[("cmd", "/arm/cmd"), ("state", "state_in")],
    )
    args = ros_args(node, tmp_path / "params")
    written = Path(args[8])
    assert args == [
        "--ros-args", "-r", "__node:=policy", "-r", "__ns:=/arm",
        "--params-file", str(params_file), "--params-file", str(written),
        "-r", "cmd:=/arm/cmd", "-r", "state:=state_in",
    ]
    assert written.parent == tmp_path / "params"
    # Keyed by the full node name, like ros2 launch, with YAML types kept ('5' stays a string).
    assert yaml.safe_load(written.read_text()) == {
        "/arm/policy": {"ros__parameters": {"rate_hz": 30, "label": "5", "gains": [1.0, 2.0], "on": True}}
    }
    unnamed = NodeAction(pkg="p", executable="e", parameters=[{"x": 1}])
    args = ros_args(unnamed, tmp_path / "params")
    assert args[:2] == ["--ros-args", "--params-file"] and len(args) == 3
    assert yaml.safe_load(Path(args[2]).read_text()) == {"/**": {"ros__parameters": {"x": 1}}}
    assert ros_args(NodeAction(pkg="p", executable="e"), tmp_path) == []


@pytest.mark.timeout(30)
def test_output_relay_prefixes_screen_lines_and_logs_everything(prefix, tmp_path):
    make_executable(prefix, "demo", "serving", SERVING)
    nodes = [
        NodeAction(pkg="demo", executable="serving", name="talker", arguments=["--flag"], output="screen"),
        NodeAction(pkg="demo", executable="serving", output="log"),
    ]
    screen = io.StringIO()
    log_dir = tmp_path / "logs"
    group = NodeProcessGroup(nodes, log_dir=log_dir, env=loopback_env(domain_id=77), screen=screen)
    with group:
        wait_for(lambda: all("ready" in log_text(log_dir, label) for label in ("talker", "serving")))
        assert group.poll() == []
        assert set(group.pids()) == {"talker", "serving"}
    assert group.shutdown() == {"talker": 0, "serving": 0}
    lines = screen.getvalue().splitlines()
    assert "[talker] argv ['--flag', '--ros-args', '-r', '__node:=talker']" in lines
    assert "[talker] domain 77" in lines and "[talker] oops" in lines and "[talker] ready" in lines
    # output: log shows only stderr on screen, as ros2 launch does.
    assert [line for line in lines if line.startswith("[serving]")] == ["[serving] oops"]
    # stdout and stderr are relayed separately, so only stdout keeps its order in the log.
    assert sorted(log_text(log_dir, "serving").splitlines()) == ["argv []", "domain 77", "oops", "ready"]


@pytest.mark.timeout(30)
def test_poll_reports_exited_and_killed_nodes(prefix, tmp_path):
    make_executable(prefix, "demo", "exits", "import sys\nprint('bye')\nsys.exit(3)\n")
    make_executable(prefix, "demo", "serving", SERVING)
    nodes = [NodeAction(pkg="demo", executable="exits"), NodeAction(pkg="demo", executable="serving", name="victim")]
    with NodeProcessGroup(nodes, log_dir=tmp_path, screen=io.StringIO()) as group:
        assert group.wait(timeout_s=10) == [("exits", 3)]
        wait_for(lambda: "ready" in log_text(tmp_path, "victim"))
        os.kill(group.pids()["victim"], signal.SIGKILL)
        wait_for(lambda: len(group.poll()) == 2)
        assert group.poll() == [("exits", 3), ("victim", -signal.SIGKILL)]
    assert "bye" in log_text(tmp_path, "exits")


@pytest.mark.timeout(30)
def test_shutdown_escalates_to_sigterm_and_sigkill_in_bounded_time(prefix, tmp_path):
    make_executable(prefix, "demo", "no_int", IGNORES_SIGINT)
    make_executable(prefix, "demo", "no_int_no_term", IGNORES_SIGINT_AND_SIGTERM)
    nodes = [NodeAction(pkg="demo", executable="no_int"), NodeAction(pkg="demo", executable="no_int_no_term")]
    group = NodeProcessGroup(nodes, log_dir=tmp_path, screen=io.StringIO())
    group.start()
    try:
        wait_for(lambda: all("ready" in log_text(tmp_path, n.executable) for n in nodes))
        started = time.monotonic()
        codes = group.shutdown(timeout_s=0.5)
        elapsed = time.monotonic() - started
    finally:
        group.shutdown(timeout_s=0.1)
    assert codes == {"no_int": -signal.SIGTERM, "no_int_no_term": -signal.SIGKILL}
    assert elapsed < 5


@pytest.mark.timeout(30)
def test_missing_executable_starts_nothing(prefix, tmp_path):
    make_executable(prefix, "demo", "serving", SERVING)
    nodes = [NodeAction(pkg="demo", executable="serving"), NodeAction(pkg="demo", executable="absent")]
    group = NodeProcessGroup(nodes, log_dir=tmp_path)
    with pytest.raises(ExecutableNotFoundError, match="'absent' of package 'demo'"):
        group.start()
    assert group.pids() == {} and group.shutdown() == {}


@pytest.mark.timeout(60)
@pytest.mark.skipif(importlib.util.find_spec("rclpy") is None, reason="needs rclpy")
def test_real_rclpy_node_gets_name_namespace_typed_params_and_remaps(prefix, tmp_path):
    make_executable(prefix, "demo", "param_echo", """
        import sys
        import rclpy
        from rclpy.node import Node
        rclpy.init(args=sys.argv)
        node = Node("unnamed", automatically_declare_parameters_from_overrides=True)
        print("fqn", node.get_fully_qualified_name())
        for name in ("rate_hz", "label", "gains", "enabled", "from_file"):
            parameter = node.get_parameter(name)
            print("param", name, parameter.type_.name, list(parameter.value) if name == "gains" else parameter.value)
        print("cmd", node.resolve_topic_name("cmd"))
        node.destroy_node()
        rclpy.shutdown()
    """)
    (tmp_path / "p.yaml").write_text("/**:\n  ros__parameters:\n    from_file: 7\n")
    launch = tmp_path / "echo.launch.yaml"
    launch.write_text("""
launch:
- arg: {name: rate, default: "30"}
- group:
  - push-ros-namespace: {namespace: robot}
  - node:
      pkg: demo
      exec: param_echo
      name: echo
      output: screen
      param:
      - {from: "$(dirname)/p.yaml"}
      - {name: rate_hz, value: "$(var rate)"}
      - {name: label, value: "5"}
      - {name: gains, value: [1.0, 2.0]}
      - {name: enabled, value: true}
      remap:
      - {from: cmd, to: /robot/joint_cmd}
""")
    plan = load_launch_file(launch, {"rate": "40"})
    screen = io.StringIO()
    with NodeProcessGroup(plan.nodes, log_dir=tmp_path / "logs", env=loopback_env(), screen=screen) as group:
        assert group.wait(timeout_s=45) == [("echo", 0)], log_text(tmp_path / "logs", "echo")
    lines = screen.getvalue().splitlines()
    for expected in (
        "[echo] fqn /robot/echo",
        "[echo] param rate_hz INTEGER 40",
        "[echo] param label STRING 5",
        "[echo] param gains DOUBLE_ARRAY [1.0, 2.0]",
        "[echo] param enabled BOOL True",
        "[echo] param from_file INTEGER 7",
        "[echo] cmd /robot/joint_cmd",
    ):
        assert expected in lines, screen.getvalue()


@pytest.mark.timeout(30)
def test_exec_failure_stops_the_nodes_already_started(prefix, tmp_path):
    make_executable(prefix, "demo", "serving", SERVING)
    broken = prefix / "lib" / "demo" / "broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    group = NodeProcessGroup(
        [NodeAction(pkg="demo", executable="serving"), NodeAction(pkg="demo", executable="broken")],
        log_dir=tmp_path, screen=io.StringIO(),
    )
    with pytest.raises(NodeStartError, match="cannot start node 'broken'"):
        group.start()
    assert [label for label, _ in group.poll()] == ["serving"]


@pytest.mark.timeout(60)
def test_nodes_die_with_a_killed_launcher(tmp_path):
    """A launcher killed by SIGKILL cannot clean up: its nodes must go by themselves."""
    script = tmp_path / "launcher.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from runtime.launcher import NodeAction, NodeProcessGroup\n"
        f"node = NodeAction(pkg='x', executable={sys.executable!r}, name='sleeper', arguments=['-c', 'import time; time.sleep(60)'])\n"
        "group = NodeProcessGroup([node], log_dir=Path(sys.argv[1]))\n"
        "group.start()\n"
        "print(group.pids()['sleeper'], flush=True)\n"
        "time.sleep(60)\n"
    )
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs")], stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[3])
    node_pid = int(launcher.stdout.readline())
    assert Path(f"/proc/{node_pid}").exists()
    launcher.kill()
    launcher.wait(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{node_pid}").exists() and "Z" not in Path(f"/proc/{node_pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "node outlived its killed launcher"
        time.sleep(0.1)
