"""What every helmstack node's main() shares: init, spin, clean shutdown, core logging."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node

from runtime.config import ConfigError


class RosLogHandler(logging.Handler):
    """Forward the cores' `logging` records to a node's ROS logger (rule 1: cores log with
    logging, nodes bridge it)."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self._logger = node.get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        text = f"[{record.name}] {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            self._logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(text)
        elif record.levelno >= logging.INFO:
            self._logger.info(text)
        else:
            self._logger.debug(text)


def declare_number(node: Node, name: str, default: float) -> None:
    """Declare a numeric parameter that accepts ints and floats alike: launch files and
    the command line turn "1" into an int, which a float-typed parameter would refuse."""
    node.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True))


class NodeSetupError(RuntimeError):
    """A node cannot start (bad config or parameter); the message says why. Exit code 2."""


def autostart(node, fallback_reason: str) -> None:
    """Configure and activate a lifecycle node itself (its `autostart` parameter), as when
    no lifecycle manager runs. A node that cannot configure is useless: NodeSetupError."""
    from rclpy.lifecycle import TransitionCallbackReturn

    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        raise NodeSetupError(node.setup_error or fallback_reason)
    node.trigger_activate()


def run_node(make_node: Callable[[], Node], threads: int = 1) -> int:
    """Create the node, spin it until Ctrl-C or shutdown; exit 0, or 2 on a setup error.

    One thread (a SingleThreadedExecutor) unless the node has callback groups that must
    run concurrently: with every callback in the default mutually exclusive group a
    MultiThreadedExecutor adds no parallelism, and under simulation time it was seen to stop
    serving the safety node's callbacks altogether (commands after the first few never went
    out: 5 failures in 8 runs of the real-robot rollback test, none in 8 with one thread)."""
    rclpy.init(args=sys.argv)
    node = None
    try:
        node = make_node()
        logging.getLogger().addHandler(RosLogHandler(node))
        logging.getLogger().setLevel(logging.INFO)
        executor = SingleThreadedExecutor() if threads == 1 else MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (NodeSetupError, ConfigError) as exc:
        # One line on stderr: launchers show it as the reason the node is gone.
        print(f"[ERROR] setup: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if node is not None:
            close = getattr(node, "close", None)
            if close is not None:
                close()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0
