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
