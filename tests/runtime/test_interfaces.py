"""helmstack_interfaces, built without colcon, works for real.

Builds the package (or reuses the build), then checks the installed layout, the field
schema, CDR round trips of every type, loading without LD_LIBRARY_PATH, and DDS traffic
between processes: EventPacket and WorldState over a topic, one ExecuteTask goal over an
action, and, while such processes run, that their UDP sockets stay on 127.0.0.1.

Child processes run this file as a script (`python test_interfaces.py <role>`), with the
loopback DDS environment and a test-unique ROS_DOMAIN_ID; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHILD_DEADLINE_S = 60.0  # children exit on their own after this, whatever the parent does
EVENTS_TOPIC = "/helmstack_test/events"
WORLD_TOPIC = "/helmstack_test/world"
ACTION_NAME = "/helmstack_test/execute_task"
SUBGOALS = ("open drawer", "pick cube", "place cube")


# ---------------------------------------------------------------------------- samples
# Values are exact in float32 where the field is float32, so round trips compare equal.


def sample_detection3d() -> Any:
    from geometry_msgs.msg import Point, Vector3
    from helmstack_interfaces.msg import Detection3D

    msg = Detection3D(class_name="mug", score=0.75, center=Point(x=1.5, y=-2.0, z=0.25), yaw=-1.5)
    msg.header.frame_id = "lidar"
    msg.header.stamp.sec = 12
    msg.size = Vector3(x=0.1, y=0.1, z=0.125)
    msg.velocity = Vector3(x=0.5, y=0.0, z=-0.25)
    return msg


def sample_detection3d_array() -> Any:
    from helmstack_interfaces.msg import Detection3DArray

    second = sample_detection3d()
    second.class_name = "bowl"
    msg = Detection3DArray(detections=[sample_detection3d(), second])
    msg.header.frame_id = "lidar"
    return msg


def sample_event_packet(seq: int = 0) -> Any:
    from helmstack_interfaces.msg import EventPacket

    msg = EventPacket(width=640, height=480)
    msg.header.frame_id = "event_camera"
    msg.header.stamp.sec = seq
    msg.x = [0, 639, 65535]
    msg.y = [0, 479, 1]
    msg.t_ns = [1_700_000_000_000_000_000, 1_700_000_000_000_000_001, 2**62]
    msg.polarity = [1, -1, 1]
    return msg


def sample_tactile_array() -> Any:
    from helmstack_interfaces.msg import TactileArray

    msg = TactileArray(sensor_names=["left_pad", "right_pad"], rows=2, cols=3)
    msg.header.frame_id = "left_pad"
    msg.forces = [0.5 * i for i in range(2 * 2 * 3)]
    return msg


def sample_verifier_verdict() -> Any:
    from helmstack_interfaces.msg import VerifierVerdict

    return VerifierVerdict(subgoal="pick cube", p_fail=0.125, decision=VerifierVerdict.REJECT, reason="grasp slipped")


def sample_world_state(seq: int = 0) -> Any:
    from geometry_msgs.msg import Point, Pose, Quaternion
    from helmstack_interfaces.msg import WorldState

    msg = WorldState(object_names=["cube", "drawer"], joint_names=["drawer_slide"], joint_positions=[0.125])
    msg.header.frame_id = "world"
    msg.header.stamp.sec = seq
    msg.command_stamp.sec, msg.command_stamp.nanosec = seq, 250_000_000
    msg.object_poses = [
        Pose(position=Point(x=0.5, y=0.0, z=0.02), orientation=Quaternion(w=1.0)),
        Pose(position=Point(x=0.7, y=0.3, z=0.0), orientation=Quaternion(z=0.7071067811865476, w=0.7071067811865476)),
    ]
    return msg


def sample_reset_request() -> Any:
    from helmstack_interfaces.srv import ResetTask

    return ResetTask.Request(task_id="drawer_open", seed=-(2**40))


def sample_reset_response() -> Any:
    from helmstack_interfaces.srv import ResetTask

    return ResetTask.Response(success=True, message="reset to seed 7")


def sample_goal() -> Any:
    from helmstack_interfaces.action import ExecuteTask

    return ExecuteTask.Goal(task_id="stack_cubes", instruction="put the red cube on the blue one", seed=7)


def sample_result() -> Any:
    from helmstack_interfaces.action import ExecuteTask

    return ExecuteTask.Result(
        success=True,
        subgoal_names=list(SUBGOALS),
        subgoal_success=[True, True, True],
        subgoal_steps=[10, 20, 2**40],
        subgoal_duration_s=[0.1, 0.2, 0.3],
        reason="all subgoals done",
    )


def sample_feedback(index: int = 1) -> Any:
    from helmstack_interfaces.action import ExecuteTask

    return ExecuteTask.Feedback(
        current_subgoal=SUBGOALS[index],
        subgoal_index=index,
        num_subgoals=len(SUBGOALS),
        harness_state="EXECUTING",
        p_fail=0.25,
    )


def sample_feedback_message() -> Any:
    from helmstack_interfaces.action import ExecuteTask

    msg = ExecuteTask.Impl.FeedbackMessage(feedback=sample_feedback())
    msg.goal_id.uuid = list(range(16))
    return msg


SAMPLES: dict[str, Callable[[], Any]] = {
    "Detection3D": sample_detection3d,
    "Detection3DArray": sample_detection3d_array,
    "EventPacket": sample_event_packet,
    "TactileArray": sample_tactile_array,
    "VerifierVerdict": sample_verifier_verdict,
    "WorldState": sample_world_state,
    "ResetTask.Request": sample_reset_request,
    "ResetTask.Response": sample_reset_response,
    "ExecuteTask.Goal": sample_goal,
    "ExecuteTask.Result": sample_result,
    "ExecuteTask.Feedback": sample_feedback,
    "ExecuteTask.Impl.FeedbackMessage": sample_feedback_message,
}

# The schema the rest of the stack codes against (field name -> rosidl type).
EXPECTED_FIELDS: dict[str, dict[str, str]] = {
    "Detection3D": {
        "header": "std_msgs/Header",
        "class_name": "string",
        "score": "float",
        "center": "geometry_msgs/Point",
        "size": "geometry_msgs/Vector3",
        "yaw": "float",
        "velocity": "geometry_msgs/Vector3",
    },
    "Detection3DArray": {"header": "std_msgs/Header", "detections": "sequence<helmstack_interfaces/Detection3D>"},
    "EventPacket": {
        "header": "std_msgs/Header",
        "width": "uint32",
        "height": "uint32",
        "x": "sequence<uint16>",
        "y": "sequence<uint16>",
        "t_ns": "sequence<int64>",
        "polarity": "sequence<int8>",
    },
    "TactileArray": {
        "header": "std_msgs/Header",
        "sensor_names": "sequence<string>",
        "rows": "uint32",
        "cols": "uint32",
        "forces": "sequence<float>",
    },
    "VerifierVerdict": {
        "header": "std_msgs/Header",
        "subgoal": "string",
        "p_fail": "float",
        "decision": "string",
        "reason": "string",
    },
    "WorldState": {
        "header": "std_msgs/Header",
        "episode": "uint32",
        "object_names": "sequence<string>",
        "object_poses": "sequence<geometry_msgs/Pose>",
        "joint_names": "sequence<string>",
        "joint_positions": "sequence<double>",
        "command_stamp": "builtin_interfaces/Time",
    },
    "ResetTask.Request": {"task_id": "string", "seed": "int64"},
    "ResetTask.Response": {"success": "boolean", "message": "string", "episode": "uint32"},
    "ExecuteTask.Goal": {"task_id": "string", "instruction": "string", "seed": "int64"},
    "ExecuteTask.Result": {
        "success": "boolean",
        "subgoal_names": "sequence<string>",
        "subgoal_success": "sequence<boolean>",
        "subgoal_steps": "sequence<int64>",
        "subgoal_duration_s": "sequence<double>",
        "reason": "string",
    },
    "ExecuteTask.Feedback": {
        "current_subgoal": "string",
        "subgoal_index": "int32",
        "num_subgoals": "int32",
        "harness_state": "string",
        "p_fail": "float",
    },
}


def resolve(name: str) -> type:
    """'ExecuteTask.Goal' -> helmstack_interfaces.action.ExecuteTask.Goal, etc."""
    import helmstack_interfaces.action
    import helmstack_interfaces.msg
    import helmstack_interfaces.srv

    head, *rest = name.split(".")
    for module in (helmstack_interfaces.msg, helmstack_interfaces.srv, helmstack_interfaces.action):
        if hasattr(module, head):
            obj = getattr(module, head)
            for part in rest:
                obj = getattr(obj, part)
            return obj
    raise LookupError(name)


# ---------------------------------------------------------------------------- in-process tests


def test_build_is_skipped_when_unchanged(helmstack_interfaces: None) -> None:
    from runtime.rosidl_build import PACKAGE, InterfacePackage, Layout, build_interfaces, default_source_dir, is_up_to_date

    started = time.monotonic()
    assert build_interfaces() is False
    assert time.monotonic() - started < 5.0
    layout = Layout.current()
    assert is_up_to_date(InterfacePackage.load(default_source_dir()), layout)
    assert (layout.share_dir / "ament_index/resource_index/packages" / PACKAGE).is_file()
    for sub in ("msg", "srv", "action"):
        assert any((layout.package_share / sub).iterdir())
    assert (layout.package_share / "package.xml").is_file()


def test_ament_index_finds_the_package(helmstack_interfaces: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from ament_index_python.packages import get_package_share_directory

    monkeypatch.setenv("AMENT_PREFIX_PATH", sys.prefix)
    share = Path(get_package_share_directory("helmstack_interfaces"))
    assert (share / "msg" / "EventPacket.msg").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_field_schema(helmstack_interfaces: None, name: str) -> None:
    assert resolve(name).get_fields_and_field_types() == EXPECTED_FIELDS[name]


def test_verdict_constants(helmstack_interfaces: None) -> None:
    from helmstack_interfaces.msg import VerifierVerdict

    assert (VerifierVerdict.ACCEPT, VerifierVerdict.REJECT, VerifierVerdict.PASS_THROUGH) == (
        "accept",
        "reject",
        "pass_through",
    )


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_cdr_round_trip(helmstack_interfaces: None, name: str) -> None:
    from rclpy.serialization import deserialize_message, serialize_message

    msg = SAMPLES[name]()
    assert type(msg) is resolve(name)
    data = serialize_message(msg)
    assert isinstance(data, bytes) and len(data) > 4
    assert deserialize_message(data, type(msg)) == msg


def test_every_generated_type_round_trips_with_defaults(helmstack_interfaces: None) -> None:
    """Covers the action/service plumbing types (SendGoal, GetResult, Event, ...) too."""
    from helmstack_interfaces.action import ExecuteTask
    from helmstack_interfaces.srv import ResetTask
    from rclpy.serialization import deserialize_message, serialize_message

    types = [ResetTask.Request, ResetTask.Response, ResetTask.Event, ExecuteTask.Impl.FeedbackMessage]
    for service in (ExecuteTask.Impl.SendGoalService, ExecuteTask.Impl.GetResultService):
        types += [service.Request, service.Response, service.Event]
    for msg_type in types:
        msg = msg_type()
        assert deserialize_message(serialize_message(msg), msg_type) == msg, msg_type.__name__


@pytest.mark.timeout(60)
def test_typesupports_load_without_ld_library_path(helmstack_interfaces: None) -> None:
    """The rpath chain alone resolves the by-name dlopen() of rosidl_typesupport_c."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["_ROS_WHEELS_BOOTSTRAP_COMPLETE"] = "1"  # keep the wheels' .pth from adding it back
    result = subprocess.run(
        [sys.executable, __file__, "probe_typesupports"], env=env, capture_output=True, text=True, timeout=45
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "rosidl_typesupport_fastrtps_c": "rosidl_typesupport_fastrtps_c",
        "rosidl_typesupport_introspection_c": "rosidl_typesupport_introspection_c",
    }


# ---------------------------------------------------------------------------- across processes


@pytest.fixture()
def domain_id() -> int:
    return random.randint(100, 200)


@contextmanager
def child(role: str, domain: int, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run this file as `role` in a child process on the loopback DDS; kill it by pid after."""
    from runtime.dds import loopback_env

    proc = subprocess.Popen(
        [sys.executable, __file__, role, *args],
        env=loopback_env(domain_id=domain),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """Wait for a child to exit on its own, bounded; returns (rc, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"child {proc.args[2]} did not finish in {timeout} s; stderr:\n{err}")
    return proc.returncode, out, err


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """Next stdout line of a child that keeps running, bounded by `timeout`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"child {proc.args[2]} printed nothing in {timeout} s")
    return proc.stdout.readline().strip()


@pytest.mark.timeout(120)
def test_event_packet_and_world_state_cross_processes(helmstack_interfaces: None, domain_id: int) -> None:
    with child("subscriber", domain_id) as sub, child("publisher", domain_id) as pub:
        rc, out, err = finish(sub, timeout=90)
        assert pub.poll() is None, "publisher died early"
    assert rc == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report == {"EventPacket": "match", "WorldState": "match"}


@pytest.mark.timeout(120)
def test_execute_task_action_cross_processes(helmstack_interfaces: None, domain_id: int) -> None:
    with child("action_server", domain_id) as server, child("action_client", domain_id) as client:
        rc, out, err = finish(client, timeout=90)
        assert rc == 0, err
        src, _, serr = finish(server, timeout=30)
        assert src == 0, serr
    report = json.loads(out.splitlines()[-1])
    assert report["status"] == "SUCCEEDED"
    assert report["result"] == {"success": True, "subgoal_names": list(SUBGOALS), "reason": "done: stack_cubes"}
    assert report["feedback_indices"] == sorted(report["feedback_indices"])
    assert set(report["feedback_indices"]) <= {0, 1, 2} and report["feedback_indices"]


@pytest.mark.timeout(120)
def test_dds_sockets_stay_on_loopback(helmstack_interfaces: None, domain_id: int) -> None:
    from runtime.socket_audit import multicast_memberships, new_multicast_joins, udp_sockets_of

    before = multicast_memberships()
    with child("subscriber", domain_id, "--linger") as sub, child("publisher", domain_id) as pub:
        assert read_line(sub, timeout=60) == "received", "no traffic between the two processes"
        sockets = udp_sockets_of([sub.pid, pub.pid])
        joined = new_multicast_joins(before, multicast_memberships(sub.pid))
        assert sub.poll() is None and pub.poll() is None
    assert {pid for pid, _, _ in sockets} == {sub.pid, pub.pid}, "DDS opened no UDP socket at all?"
    assert [s for s in sockets if s[1] != "127.0.0.1"] == []
    assert joined == {}


# ---------------------------------------------------------------------------- child roles


def _ros_node(name: str) -> Any:
    import rclpy

    rclpy.init()
    return rclpy.create_node(name)


def role_publisher() -> int:
    import rclpy
    from helmstack_interfaces.msg import EventPacket, WorldState

    node = _ros_node("iface_test_publisher")
    events = node.create_publisher(EventPacket, EVENTS_TOPIC, 10)
    world = node.create_publisher(WorldState, WORLD_TOPIC, 10)
    deadline = time.monotonic() + CHILD_DEADLINE_S
    seq = 0
    while time.monotonic() < deadline:
        events.publish(sample_event_packet(seq))
        world.publish(sample_world_state(seq))
        seq += 1
        rclpy.spin_once(node, timeout_sec=0.1)
    return 0


def role_subscriber(*args: str) -> int:
    """Exit 0 after one correct EventPacket and WorldState; with --linger, say so and stay."""
    import rclpy
    from helmstack_interfaces.msg import EventPacket, WorldState

    node = _ros_node("iface_test_subscriber")
    verdicts: dict[str, str] = {}

    def check(name: str, sample: Callable[[int], Any]) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            verdicts[name] = "match" if msg == sample(msg.header.stamp.sec) else f"mismatch: {msg}"

        return callback

    node.create_subscription(EventPacket, EVENTS_TOPIC, check("EventPacket", sample_event_packet), 10)
    node.create_subscription(WorldState, WORLD_TOPIC, check("WorldState", sample_world_state), 10)
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while len(verdicts) < 2 and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    if "--linger" in args:
        print("received" if len(verdicts) == 2 else "timeout", flush=True)
        while time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
    print(json.dumps(verdicts), flush=True)
    return 0 if len(verdicts) == 2 else 1


def role_action_server() -> int:
    """Serve one ExecuteTask goal (three subgoals with feedback), then exit."""
    import rclpy
    from helmstack_interfaces.action import ExecuteTask
    from rclpy.action import ActionServer

    node = _ros_node("iface_test_action_server")
    done: list[bool] = []
    feedback_topic = f"{ACTION_NAME}/_action/feedback"

    def execute(goal_handle: Any) -> Any:
        # Feedback published before the client's feedback reader is known would be lost.
        wait_until = time.monotonic() + 10.0
        while node.count_subscribers(feedback_topic) < 1 and time.monotonic() < wait_until:
            time.sleep(0.05)
        for index in range(len(SUBGOALS)):
            goal_handle.publish_feedback(sample_feedback(index))
            time.sleep(0.1)
        goal_handle.succeed()
        done.append(True)
        return ExecuteTask.Result(
            success=True,
            subgoal_names=list(SUBGOALS),
            subgoal_success=[True] * len(SUBGOALS),
            subgoal_steps=[10, 20, 30],
            subgoal_duration_s=[0.1, 0.1, 0.1],
            reason=f"done: {goal_handle.request.task_id}",
        )

    server = ActionServer(node, ExecuteTask, ACTION_NAME, execute)
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while not done and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    # Let the client fetch the result before the server goes away.
    linger = time.monotonic() + 2.0
    while time.monotonic() < linger:
        rclpy.spin_once(node, timeout_sec=0.1)
    server.destroy()
    return 0 if done else 1


def role_action_client() -> int:
    import rclpy
    from action_msgs.msg import GoalStatus
    from helmstack_interfaces.action import ExecuteTask
    from rclpy.action import ActionClient

    node = _ros_node("iface_test_action_client")
    client = ActionClient(node, ExecuteTask, ACTION_NAME)
    if not client.wait_for_server(timeout_sec=CHILD_DEADLINE_S / 2):
        print("action server not found", file=sys.stderr)
        return 1
    feedback: list[int] = []
    send = client.send_goal_async(sample_goal(), feedback_callback=lambda msg: feedback.append(msg.feedback.subgoal_index))
    rclpy.spin_until_future_complete(node, send, timeout_sec=20)
    goal_handle = send.result()
    if goal_handle is None or not goal_handle.accepted:
        print("goal not accepted", file=sys.stderr)
        return 1
    result_future = goal_handle.get_result_async()
    rclpy.spin_until_future_complete(node, result_future, timeout_sec=20)
    response = result_future.result()
    if response is None:
        print("no result", file=sys.stderr)
        return 1
    status = {GoalStatus.STATUS_SUCCEEDED: "SUCCEEDED", GoalStatus.STATUS_ABORTED: "ABORTED"}.get(response.status, str(response.status))
    result = response.result
    print(
        json.dumps(
            {
                "status": status,
                "result": {"success": result.success, "subgoal_names": list(result.subgoal_names), "reason": result.reason},
                "feedback_indices": feedback,
            }
        ),
        flush=True,
    )
    return 0


def role_probe_typesupports() -> int:
    """Resolve EventPacket's C typesupport to fastrtps_c and introspection_c via ctypes."""
    import ctypes

    from helmstack_interfaces.msg import EventPacket

    EventPacket.__class__.__import_type_support__()  # loads the extension module and its libraries

    class TypeSupport(ctypes.Structure):
        _fields_ = [("typesupport_identifier", ctypes.c_char_p), ("data", ctypes.c_void_p), ("func", ctypes.c_void_p)]

    # Found by name because the extension module already loaded them through its rpath.
    ours = ctypes.CDLL("libhelmstack_interfaces__rosidl_typesupport_c.so")
    dispatch = ctypes.CDLL("librosidl_typesupport_c.so").rosidl_typesupport_c__get_message_typesupport_handle_function
    dispatch.restype = ctypes.POINTER(TypeSupport)
    dispatch.argtypes = [ctypes.POINTER(TypeSupport), ctypes.c_char_p]
    get_handle = ours.rosidl_typesupport_c__get_message_type_support_handle__helmstack_interfaces__msg__EventPacket
    get_handle.restype = ctypes.POINTER(TypeSupport)
    handle = get_handle()
    found = {}
    for identifier in ("rosidl_typesupport_fastrtps_c", "rosidl_typesupport_introspection_c"):
        resolved = dispatch(handle, identifier.encode())
        found[identifier] = resolved.contents.typesupport_identifier.decode() if resolved else None
    print(json.dumps(found), flush=True)
    return 0


ROLES: dict[str, Callable[..., int]] = {
    "publisher": role_publisher,
    "subscriber": role_subscriber,
    "action_server": role_action_server,
    "action_client": role_action_client,
    "probe_typesupports": role_probe_typesupports,
}

if __name__ == "__main__":
    sys.exit(ROLES[sys.argv[1]](*sys.argv[2:]))
