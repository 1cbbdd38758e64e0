"""Audit the UDP sockets and multicast memberships of running processes, from /proc.

helmstack keeps all DDS traffic on 127.0.0.1 and shared memory (runtime/dds.py). Tests
prove that on live processes: every UDP socket a process holds must be bound to loopback
and no multicast group may be joined. /proc is read directly so the audit needs no extra
dependency; it works for processes of the same user on Linux.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

UdpSocket = tuple[int, str, int]  # (pid, local ip, local port)


def _decode_address(hex_address: str) -> str:
    """Decode a /proc/net address: 32-bit words in host byte order, printed as hex."""
    words = [hex_address[i : i + 8] for i in range(0, len(hex_address), 8)]
    raw = b"".join(struct.pack("=I", int(word, 16)) for word in words)
    return str(ipaddress.ip_address(raw))


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets among the open file descriptors of `pid`."""
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue  # closed between listing and reading
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _udp_table(pid: int) -> dict[int, tuple[str, int]]:
    """inode -> (local ip, port) for the UDP sockets in the network namespace of `pid`."""
    table: dict[int, tuple[str, int]] = {}
    for name in ("udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{name}")
        if not path.exists():
            continue  # kernel without IPv6
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            table[int(fields[9])] = (_decode_address(address), int(port, 16))
    return table


def udp_sockets_of(pids: Iterable[int]) -> list[UdpSocket]:
    """The UDP sockets (IPv4 and IPv6) held by each pid, as (pid, local_ip, port).

    Raises FileNotFoundError if a process does not exist (any more).
    """
    sockets: list[UdpSocket] = []
    for pid in pids:
        owned = socket_inodes(pid)
        for inode, (ip, port) in sorted(_udp_table(pid).items()):
            if inode in owned:
                sockets.append((pid, ip, port))
    logger.debug("UDP sockets: %s", sockets)
    return sockets


def multicast_memberships(pid: int | str = "self") -> dict[tuple[str, str], int]:
    """(device, group) -> number of users, for the network namespace of `pid`.

    The kernel does not expose memberships per socket; compare two snapshots (before and
    while the processes under test run) to attribute new joins to them.
    """
    memberships: dict[tuple[str, str], int] = {}
    device = ""
    for line in Path(f"/proc/{pid}/net/igmp").read_text().splitlines()[1:]:
        if line[:1].isdigit():  # "<idx>\t<device> : <count> <querier>"
            device = line.split()[1]
        elif line.strip():  # "\t\t\t\t<group hex> <users> <timer> <reporter>"
            group_hex, users = line.split()[:2]
            memberships[(device, _decode_address(group_hex))] = int(users)
    igmp6 = Path(f"/proc/{pid}/net/igmp6")
    if igmp6.exists():
        for line in igmp6.read_text().splitlines():  # "<idx> <device> <group hex> <users> ..."
            _, dev, group_hex, users = line.split()[:4]
            memberships[(dev, str(ipaddress.IPv6Address(bytes.fromhex(group_hex))))] = int(users)
    return memberships


def new_multicast_joins(
    before: dict[tuple[str, str], int], after: dict[tuple[str, str], int]
) -> dict[tuple[str, str], int]:
    """Memberships in `after` whose user count grew since `before` (the count of new users)."""
    return {key: users - before.get(key, 0) for key, users in after.items() if users > before.get(key, 0)}
