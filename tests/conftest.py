"""Shared pytest fixtures.

`helmstack_interfaces` builds the custom ROS 2 interfaces into the active environment once
per session (a no-op when already built and unchanged), so tests can import
`helmstack_interfaces`. It skips when the ROS wheels or the C toolchain are missing.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def helmstack_interfaces() -> None:
    """Make sure `helmstack_interfaces` is built and importable (see runtime/rosidl_build.py)."""
    pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install '.[ros]')")
    from runtime.rosidl_build import MissingDependencyError, build_interfaces

    try:
        build_interfaces()
    except MissingDependencyError as exc:
        pytest.skip(f"cannot build helmstack_interfaces: {exc}")


@pytest.fixture
def ros_env(monkeypatch) -> dict[str, str]:
    """Loopback-only DDS on a test-unique domain, applied to this process (before any
    rclpy.init) and returned for child processes."""
    import random

    from runtime.dds import loopback_env

    env = loopback_env(domain_id=random.randint(100, 200))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def ros_node(ros_env, helmstack_interfaces):
    """An rclpy node in its own context, spun in a background thread."""
    import threading

    rclpy = pytest.importorskip("rclpy")
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor

    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node("test_probe", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        thread.join(timeout=5)
