"""Record topics to a rosbag2 (MCAP storage) from inside a running rclpy node.

Subscriptions are raw (serialized CDR bytes), so what lands in the bag is byte-identical
to what was on the wire and `ros2 bag play` / Foxglove read it. Message definitions come
from rosbags' ROS 2 Kilted type store plus helmstack_interfaces' own .msg files.
"""
from __future__ import annotations

import logging
from pathlib import Path

from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from runtime.launcher import find_package_share

logger = logging.getLogger(__name__)


def interfaces_share_dir() -> Path:
    """Where helmstack_interfaces' .msg files are installed (colcon or `helmstack build-interfaces`)."""
    return find_package_share("helmstack_interfaces")


def _typestore():
    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for path in sorted((interfaces_share_dir() / "msg").glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"helmstack_interfaces/msg/{path.stem}"))
    store.register(types)
    return store


def msgtype_name(cls: type) -> str:
    """`sensor_msgs.msg.Image` → "sensor_msgs/msg/Image"."""
    return f"{cls.__module__.split('.')[0]}/msg/{cls.__name__}"


class BagRecorder:
    """Writes every message of `topics` ({name: message class}) to `path` until close()."""

    def __init__(self, node: Node, path: Path, topics: dict[str, type]) -> None:
        self._store = _typestore()
        self._writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._clock = node.get_clock()
        self.counts: dict[str, int] = {}
        # Best effort so sensor topics (published best-effort) connect too.
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT)
        self._subs = []
        for topic, cls in topics.items():
            connection = self._writer.add_connection(topic, msgtype_name(cls), typestore=self._store)
            self.counts[topic] = 0
            self._subs.append(node.create_subscription(
                cls, topic, lambda data, c=connection, t=topic: self._write(c, t, data), qos, raw=True))
        self._node = node
        self.path = path

    def _write(self, connection, topic: str, data: bytes) -> None:
        if self._writer is None:
            return
        self._writer.write(connection, self._clock.now().nanoseconds, data)
        self.counts[topic] += 1

    def close(self) -> None:
        for sub in self._subs:
            self._node.destroy_subscription(sub)
        self._subs = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
