"""runtime.socket_audit reports exactly the UDP sockets a process holds, and their address.

The DDS loopback check itself (helmstack processes keep UDP on 127.0.0.1 and join no
multicast group) lives in test_interfaces.py, next to the processes it audits; this file
checks the helper on sockets whose binding is known, without ROS.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from runtime.socket_audit import multicast_memberships, new_multicast_joins, udp_sockets_of

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@contextmanager
def udp_socket(family: socket.AddressFamily, address: str) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((address, 0))
        yield sock
    finally:
        sock.close()


def test_finds_own_sockets_with_their_binding() -> None:
    pid = os.getpid()
    with udp_socket(socket.AF_INET, "127.0.0.1") as loopback, udp_socket(socket.AF_INET, "0.0.0.0") as wildcard:
        port = loopback.getsockname()[1]
        found = udp_sockets_of([pid])
        assert (pid, "127.0.0.1", port) in found
        assert (pid, "0.0.0.0", wildcard.getsockname()[1]) in found
    assert (pid, "127.0.0.1", port) not in udp_sockets_of([pid])


def test_reports_ipv6_sockets() -> None:
    if not socket.has_ipv6 or not os.path.exists("/proc/self/net/udp6"):
        pytest.skip("no IPv6")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        try:
            sock.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"cannot bind ::1: {exc}")
        assert (os.getpid(), "::1", sock.getsockname()[1]) in udp_sockets_of([os.getpid()])
    finally:
        sock.close()


def test_ignores_sockets_of_other_processes() -> None:
    # The child shares the network namespace (same /proc/<pid>/net/udp table) but holds
    # no socket of its own.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with udp_socket(socket.AF_INET, "127.0.0.1"):
            assert udp_sockets_of([other.pid]) == []
    finally:
        other.kill()
        other.wait(timeout=10)


def test_multicast_join_is_detected() -> None:
    before = multicast_memberships()
    group = "239.255.77.77"
    with udp_socket(socket.AF_INET, "0.0.0.0") as sock:
        request = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
        except OSError as exc:
            pytest.skip(f"cannot join a multicast group on lo: {exc}")
        joined = new_multicast_joins(before, multicast_memberships())
    assert any(g == group for _, g in joined)
    assert new_multicast_joins(before, before) == {}
