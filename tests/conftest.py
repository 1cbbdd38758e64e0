"""Shared pytest fixtures.

`helmstack_interfaces` builds the custom ROS 2 interfaces into the active environment once
per session (a no-op when already built and unchanged), so tests can import
`helmstack_interfaces`. It skips when the ROS wheels or the C toolchain are missing.
`json_server` is a local HTTP endpoint for clients of remote services.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class _JsonHandler(BaseHTTPRequestHandler):
    """Records each POST (path, headers, JSON body) and answers what its server is told to."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
        if self.server.delay_s:
            self.server.release.wait(self.server.delay_s)
        status, payload = self.server.reply
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout tests)
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def json_server(monkeypatch):
    """A JSON-over-HTTP server on 127.0.0.1 (OS-assigned port) standing in for a remote
    service (policy server, LLM endpoint). Set `.reply = (status, bytes)` and `.delay_s`;
    `.requests` records what arrived. Proxy variables are cleared: urllib honours them."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JsonHandler)
    server.requests, server.delay_s, server.release = [], 0.0, threading.Event()
    server.reply = (200, b"{}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
