"""Start the nodes of a LaunchPlan as child processes, relay their output, stop them cleanly.

A plain process manager (no rclpy): each NodeAction becomes
`<executable> <args...> --ros-args -r __node:=NAME -r __ns:=/NS --params-file F ... -r a:=b`,
the command line ros2 launch builds. Inline parameters go to a parameters file per node
(`{<full node name or /**>: {ros__parameters: {...}}}`, the key ros2 launch uses) so their
YAML types survive.

Output follows ros2 launch's `output` semantics: every line of stdout and stderr goes to
`<log_dir>/<label>.log`; with "screen" or "both" both streams are also printed as
`[label] line`, with "log" only stderr is (that is where ROS logging writes).

Each child gets its own session, so a Ctrl-C in the terminal reaches only the launcher,
which then stops the nodes in order: SIGINT, then SIGTERM, then SIGKILL, each step
bounded. Signals go only to the processes this object started, and only while they have
not been reaped, so a recycled pid is never hit.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TextIO

import yaml

from runtime.launcher.description import NodeAction
from runtime.launcher.packages import ament_prefixes

# Linux: a node gets SIGTERM when the process that started it dies, even by SIGKILL, so
# a killed launcher never leaves a graph running. (The signal follows the *thread* that
# started the node: start groups from a thread that outlives them, e.g. the main thread.)
_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None


def _terminate_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

logger = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.05
_READER_JOIN_S = 2.0


class ExecutableNotFoundError(LookupError):
    """No install prefix, interpreter bin directory or PATH entry provides the executable."""


class NodeStartError(RuntimeError):
    """The operating system refused to start a node's executable."""


def resolve_executable(pkg: str, executable: str) -> Path:
    """Find `executable` of `pkg`: `<prefix>/lib/<pkg>/`, then the interpreter's bin dir, then PATH."""
    candidates = [prefix / "lib" / pkg / executable for prefix in ament_prefixes()]
    # Not resolved: in a virtualenv sys.executable is a link, and its directory is the venv's bin.
    candidates.append(Path(sys.executable).parent / executable)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(executable)
    if found is not None:
        return Path(found)
    searched = ", ".join(str(c.parent) for c in candidates)
    raise ExecutableNotFoundError(
        f"executable '{executable}' of package '{pkg}' not found (searched {searched} and PATH)"
    )


def ros_args(node: NodeAction, params_dir: Path) -> list[str]:
    """The `--ros-args ...` tail for `node`; writes its inline parameters under `params_dir`.

    Returns [] when there is nothing to set, so non-ROS executables get a clean command line.
    """
    args: list[str] = []
    if node.name is not None:
        args += ["-r", f"__node:={node.name}"]
    if node.namespace is not None:
        args += ["-r", f"__ns:={node.namespace}"]
    for parameters in node.parameters:
        file = parameters if isinstance(parameters, Path) else _write_params_file(node, parameters, params_dir)
        args += ["--params-file", str(file)]
    for source, target in node.remappings:
        args += ["-r", f"{source}:={target}"]
    return ["--ros-args", *args] if args else []


def _write_params_file(node: NodeAction, parameters: Mapping[str, object], params_dir: Path) -> Path:
    # ros2 launch keys the file by the full node name when both name and namespace are
    # known, else by the wildcard; the file is only ever given to this one node.
    if node.name is not None and node.namespace is not None:
        key = f"{node.namespace.rstrip('/')}/{node.name}"
    else:
        key = "/**"
    params_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{node.name or node.executable}_", suffix=".yaml", dir=params_dir)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        yaml.safe_dump({key: {"ros__parameters": dict(parameters)}}, stream, default_flow_style=False, sort_keys=False)
    return Path(name)


@dataclass
class _Child:
    """One started node: its process, log file and output readers."""

    label: str
    process: subprocess.Popen[bytes]
    log: TextIO
    readers: list[threading.Thread] = field(default_factory=list)
    log_closed: bool = False


class NodeProcessGroup:
    """Runs a set of NodeActions as subprocesses; use as a context manager or start()/shutdown().

    Labels (keys of poll(), pids(), and log file names) are node names, else executable
    names, made unique with a `-2`, `-3`, ... suffix in start order.
    """

    def __init__(
        self,
        nodes: Sequence[NodeAction],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        params_dir: Path | None = None,
        screen: IO[str] | None = None,
    ) -> None:
        self._nodes = list(nodes)
        self._log_dir = Path(log_dir)
        self._env = dict(os.environ if env is None else env)
        self._params_dir = Path(params_dir) if params_dir is not None else self._log_dir / "params"
        self._screen = screen if screen is not None else sys.stdout
        self._lock = threading.Lock()
        self._children: list[_Child] = []
        self._reported: set[str] = set()
        self._started = False
        self._stopped = False

    def start(self) -> None:
        """Start every node; executables are all resolved first so a missing one starts nothing."""
        if self._started:
            raise RuntimeError("NodeProcessGroup.start() called twice")
        self._started = True
        labels = _unique_labels(self._nodes)
        commands = [
            [str(resolve_executable(node.pkg, node.executable)), *node.arguments, *ros_args(node, self._params_dir)]
            for node in self._nodes
        ]
        self._log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self._env)
        # Python nodes writing to a pipe would otherwise buffer their output for seconds.
        env.setdefault("PYTHONUNBUFFERED", "1")
        for label, node, command in zip(labels, self._nodes, commands):
            self._spawn(label, node, command, env)

    def _spawn(self, label: str, node: NodeAction, command: list[str], env: dict[str, str]) -> None:
        log = (self._log_dir / f"{label}.log").open("w", encoding="utf-8", buffering=1)
        logger.info("starting %s: %s", label, " ".join(command))
        try:
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        except OSError as exc:
            log.close()
            self.shutdown()
            raise NodeStartError(f"cannot start node '{label}' ({command[0]}): {exc}") from exc
        child = _Child(label=label, process=process, log=log)
        streams = ((process.stdout, node.output != "log"), (process.stderr, True))
        for stream, to_screen in streams:
            reader = threading.Thread(
                target=self._relay, args=(child, stream, to_screen), name=f"relay-{label}", daemon=True
            )
            reader.start()
            child.readers.append(reader)
        self._children.append(child)

    def _relay(self, child: _Child, stream: IO[bytes], to_screen: bool) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                with self._lock:
                    if not child.log_closed:
                        child.log.write(line + "\n")
                    if to_screen:
                        self._print(f"[{child.label}] {line}\n")

    def _print(self, text: str) -> None:
        try:
            self._screen.write(text)
            self._screen.flush()
        except (OSError, ValueError):
            # A closed terminal or stream (ValueError: I/O on closed file) must not stop
            # the relay: the log file still gets every line.
            pass

    def poll(self) -> list[tuple[str, int]]:
        """(label, returncode) of every node that has exited so far, in start order.

        A negative code is the signal that ended the process (-9: SIGKILL).
        """
        exited = []
        for child in self._children:
            code = child.process.poll()
            if code is None:
                continue
            exited.append((child.label, code))
            if child.label not in self._reported and not self._stopped:
                self._reported.add(child.label)
                logger.warning("node %s exited with code %d", child.label, code)
        return exited

    def wait(self, timeout_s: float | None = None) -> list[tuple[str, int]]:
        """Block until some node has exited or `timeout_s` has passed; return poll()."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._children:
            exited = self.poll()
            if exited:
                return exited
            if deadline is not None and time.monotonic() >= deadline:
                break
            remaining = _POLL_INTERVAL_S if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(min(_POLL_INTERVAL_S, remaining))
        return self.poll()

    def pids(self) -> dict[str, int]:
        """Process id of every started node (exited ones included), by label."""
        return {child.label: child.process.pid for child in self._children}

    def shutdown(self, timeout_s: float = 5.0) -> dict[str, int | None]:
        """Stop every node: SIGINT, after `timeout_s` SIGTERM, after `timeout_s` more SIGKILL.

        Returns each label's exit code (None only if a process survived SIGKILL's wait).
        Safe to call more than once.
        """
        self._stopped = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            running = [child for child in self._children if child.process.poll() is None]
            if not running:
                break
            for child in running:
                logger.info("sending %s to %s (pid %d)", sig.name, child.label, child.process.pid)
                # Popen.send_signal does nothing once the process has been reaped.
                child.process.send_signal(sig)
            self._wait_exit(running, timeout_s)
        for child in self._children:
            if child.process.poll() is None:
                logger.warning("%s ignored SIGINT and SIGTERM; killing it", child.label)
                child.process.kill()
                try:
                    child.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    logger.error("%s (pid %d) did not exit after SIGKILL", child.label, child.process.pid)
        for child in self._children:
            for reader in child.readers:
                # Readers end at EOF; a grandchild holding the pipe open must not hang us.
                reader.join(timeout=_READER_JOIN_S)
            with self._lock:
                if not child.log_closed:
                    child.log.close()
                    child.log_closed = True
        return {child.label: child.process.poll() for child in self._children}

    @staticmethod
    def _wait_exit(children: list[_Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(child.process.poll() is None for child in children) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)

    def __enter__(self) -> NodeProcessGroup:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()


def _unique_labels(nodes: Sequence[NodeAction]) -> list[str]:
    labels: list[str] = []
    counts: dict[str, int] = {}
    for node in nodes:
        base = node.name or Path(node.executable).name
        counts[base] = counts.get(base, 0) + 1
        labels.append(base if counts[base] == 1 else f"{base}-{counts[base]}")
    return labels
