"""Safety layer core: joint limits, rate limiting, NaN rejection, watchdog and e-stop.

Runs between every command source and the robot, in simulation and on hardware alike
(the `safety_node` wraps it). It never raises on bad commands: it returns a decision the
node logs and acts on. Commands are joint-position trajectories (what a ros2_control
joint trajectory controller accepts): `positions (T, n)` targets reached at
`times_s (T,)` seconds after the command is received.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class SafetyConfig:
    joint_names: tuple[str, ...]
    position_lower: tuple[float, ...]
    position_upper: tuple[float, ...]
    velocity_limit: tuple[float, ...]  # rad/s (m/s for prismatic joints)
    watchdog_timeout_s: float = 0.5
    max_horizon_s: float = 5.0  # a single command may not plan further ahead than this

    def __post_init__(self) -> None:
        n = len(self.joint_names)
        if n == 0:
            raise ValueError("SafetyConfig.joint_names must not be empty")
        for name in ("position_lower", "position_upper", "velocity_limit"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SafetyConfig.{name} must have {n} entries (one per joint), got {len(getattr(self, name))}")
        for i, (lo, hi) in enumerate(zip(self.position_lower, self.position_upper)):
            if not lo < hi:
                raise ValueError(f"SafetyConfig.position_lower[{i}] must be < position_upper[{i}], got {lo} >= {hi}")
        if any(v <= 0 for v in self.velocity_limit):
            raise ValueError(f"SafetyConfig.velocity_limit must be > 0, got {self.velocity_limit}")
        if self.watchdog_timeout_s <= 0:
            raise ValueError(f"SafetyConfig.watchdog_timeout_s must be > 0, got {self.watchdog_timeout_s}")
        if self.max_horizon_s <= 0:
            raise ValueError(f"SafetyConfig.max_horizon_s must be > 0, got {self.max_horizon_s}")


class Verdict(str, Enum):
    PASSED = "passed"
    CLIPPED = "clipped"
    REJECTED = "rejected"


@dataclass
class SafetyDecision:
    verdict: Verdict
    positions: np.ndarray | None  # (T, n) in config joint order; None when rejected
    times_s: np.ndarray | None  # (T,)
    reasons: list[str] = field(default_factory=list)


class SafetyFilter:
    """Checks and clips joint trajectories; holds the e-stop latch."""

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        self._lower = np.asarray(config.position_lower, dtype=np.float64)
        self._upper = np.asarray(config.position_upper, dtype=np.float64)
        self._vmax = np.asarray(config.velocity_limit, dtype=np.float64)
        self.estop_engaged = False

    def filter(
        self,
        joint_names: list[str] | tuple[str, ...],
        positions: np.ndarray,
        times_s: np.ndarray,
        current_positions: np.ndarray | None,
    ) -> SafetyDecision:
        """Validate a trajectory given in `joint_names` order; return it in config order."""
        if self.estop_engaged:
            return _reject("e-stop engaged")
        names = list(joint_names)
        missing = [n for n in self.config.joint_names if n not in names]
        unknown = [n for n in names if n not in self.config.joint_names]
        if unknown or missing or len(set(names)) != len(names):
            return _reject(f"joint names do not match the robot: unknown {unknown}, missing {missing}")
        positions = np.asarray(positions, dtype=np.float64)
        times_s = np.asarray(times_s, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[0] == 0 or positions.shape[1] != len(names):
            return _reject(f"positions must be (T>0, {len(names)}), got {positions.shape}")
        if times_s.shape != (positions.shape[0],):
            return _reject(f"need one time per point: {times_s.shape[0] if times_s.ndim else 0} times for {positions.shape[0]} points")
        if not np.all(np.isfinite(positions)):
            return _reject("non-finite joint position (NaN or inf)")
        if not np.all(np.isfinite(times_s)) or times_s[0] <= 0.0 or np.any(np.diff(times_s) <= 0.0):
            return _reject(f"time_from_start must be finite, positive and increasing, got {times_s.tolist()}")
        if times_s[-1] > self.config.max_horizon_s:
            return _reject(f"trajectory spans {times_s[-1]:.2f} s > max_horizon_s {self.config.max_horizon_s}")
        order = [names.index(n) for n in self.config.joint_names]
        q = positions[:, order]
        reasons: list[str] = []

        clipped = np.clip(q, self._lower, self._upper)
        if not np.array_equal(clipped, q):
            worst = int(np.argmax(np.max(np.abs(clipped - q), axis=0)))
            reasons.append(f"position limit: {self.config.joint_names[worst]} clipped by {np.max(np.abs(clipped - q)):.3g}")
            q = clipped

        if current_positions is not None and np.all(np.isfinite(current_positions)):
            q, rate_limited = self._rate_limit(q, times_s, np.asarray(current_positions, dtype=np.float64))
            if rate_limited:
                reasons.append("velocity limit: trajectory slowed to the joint velocity limits")
        verdict = Verdict.CLIPPED if reasons else Verdict.PASSED
        return SafetyDecision(verdict, q, times_s, reasons)

    def _rate_limit(self, q: np.ndarray, times_s: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, bool]:
        """Limit each segment's displacement to vmax * dt, starting from the measured state."""
        out = q.copy()
        prev, prev_t = start, 0.0
        limited = False
        for k in range(out.shape[0]):
            max_step = self._vmax * (times_s[k] - prev_t)
            step = out[k] - prev
            bounded = np.clip(step, -max_step, max_step)
            if not np.array_equal(bounded, step):
                limited = True
                out[k] = prev + bounded
            prev, prev_t = out[k], times_s[k]
        return out, limited

    def hold(self, current_positions: np.ndarray) -> np.ndarray:
        """Hold target: the measured position, clipped into the limits. Shape (1, n)."""
        return np.clip(np.asarray(current_positions, dtype=np.float64), self._lower, self._upper)[None, :]


def _reject(reason: str) -> SafetyDecision:
    return SafetyDecision(Verdict.REJECTED, None, None, [reason])


class Watchdog:
    """Fires once when no command arrived within `timeout_s`; re-arms on the next command."""

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0 or not math.isfinite(timeout_s):
            raise ValueError(f"Watchdog timeout_s must be a positive number, got {timeout_s}")
        self.timeout_s = timeout_s
        self._last_feed_s: float | None = None
        self._fired = False

    def feed(self, now_s: float) -> None:
        self._last_feed_s = now_s
        self._fired = False

    def check(self, now_s: float) -> bool:
        """True exactly once per silence longer than the timeout (the moment to hold)."""
        if self._last_feed_s is None or self._fired:
            return False
        if now_s - self._last_feed_s > self.timeout_s:
            self._fired = True
            return True
        return False

    @property
    def holding(self) -> bool:
        return self._fired
