"""A policy served over HTTP: plugs an external vision-language-action model (an
OpenVLA-style server) into the `Policy` interface.

Why: large VLAs run in their own process or on another machine with its own Python and
GPU stack; the harness only needs their action chunks. Each `select_action` sends one
JSON request and turns the reply into an `ActionChunk`, or raises `PolicyServerError`.
Nothing else leaves this module: a timeout, an HTTP error or a reply that fails validation
never becomes an action, and the caller (the policy node, the harness) treats the error
as internal and holds the robot.

Request (POST `url`, ``Content-Type: application/json``)::

    {
      "instruction":   "put the red cube in the bowl, then ...",  # the task instruction
      "subgoal":       "pick up the red cube",                    # the current subgoal's name
      "subgoal_index": 0,
      "new_episode":   true,               # first request after reset()
      "time_s":        12.35,              # observation time
      "image": {"camera": "front", "format": "png", "width": 128, "height": 128,
                "data": "<base64 PNG, 8-bit RGB>"},
      "proprio": {"joint_names": ["panda_joint1", ..., "panda_finger_joint2"],
                  "joint_positions": [9 numbers, rad for the arm, m per finger]},
      "action_space":  "joint_positions"   # or "joint_deltas": what "actions" must hold
    }

Response (HTTP 200, JSON object; other keys are ignored)::

    {
      "actions": [[9 numbers], ...],  # required: T rows (1 <= T <= max_chunk_steps), JOINT_NAMES order
      "times_s": [T numbers]          # optional: seconds after issue, > 0 and strictly increasing;
    }                                 # default (k + 1) / control_hz

With ``action_space: joint_positions`` each row is a joint-position target; with
``joint_deltas`` each row is the change from the previous row's target (the first from the
observed joint positions), so the targets are the observed positions plus the running sum.
Every value must be finite and every resulting target within the Panda's joint limits
(`sim.panda.POSITION_LOWER`/`POSITION_UPPER`, plus `LIMIT_TOLERANCE`); anything else is
rejected, not clipped, because a server that answers out-of-range targets is broken.

`timeout_s` bounds connecting and each socket read (urllib's timeout), so a server that
stops answering is cut off within that time. Core module: no ROS imports.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import numbers
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from policies.base import ActionChunk, Observation, Policy
from runtime.config import ConfigError, load_config
from sim.panda import JOINT_NAMES, N_JOINTS, POSITION_LOWER, POSITION_UPPER

logger = logging.getLogger(__name__)

ACTION_SPACES = ("joint_positions", "joint_deltas")
#: Slack on the joint limits: servers round, and the safety layer clips the last bit.
LIMIT_TOLERANCE = 1e-3
#: Replies larger than this are rejected unread (64 steps x 9 joints is a few kB).
MAX_REPLY_BYTES = 4 << 20
#: Environment variable naming the YAML config file the registry factory reads.
CONFIG_ENV = "HELMSTACK_HTTP_VLA_CONFIG"


class PolicyServerError(RuntimeError):
    """The policy server was unreachable, timed out, failed, or answered something that is
    not a valid action chunk. Internal error: the caller proposes nothing and holds."""


@dataclass(frozen=True)
class HttpVlaConfig:
    """Where the policy server is and what it returns (see the module docstring)."""

    url: str
    timeout_s: float = 1.0
    action_space: Literal["joint_positions", "joint_deltas"] = "joint_positions"
    camera: str = "front"  # the key of Observation.images sent as the image
    max_chunk_steps: int = 64

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be an http(s) URL with a host, got {self.url!r}")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s!r}")
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f"action_space must be one of {list(ACTION_SPACES)}, got {self.action_space!r}")
        if not self.camera:
            raise ValueError("camera must name an image of the observation, got ''")
        if self.max_chunk_steps < 1:
            raise ValueError(f"max_chunk_steps must be >= 1, got {self.max_chunk_steps}")


class HttpVlaPolicy(Policy):
    """Asks a policy server for each action chunk."""

    requires_privileged_state = False

    def __init__(self, config: HttpVlaConfig, control_hz: float = 20.0) -> None:
        if not math.isfinite(control_hz) or control_hz <= 0:
            raise ValueError(f"control_hz must be a finite number > 0, got {control_hz!r}")
        self.config = config
        self.control_hz = control_hz
        self._new_episode = True

    def reset(self) -> None:
        self._new_episode = True

    def select_action(self, obs: Observation) -> ActionChunk:
        q = np.asarray(obs.joint_positions, dtype=np.float64)
        if q.shape != (N_JOINTS,) or not np.all(np.isfinite(q)):
            raise ValueError(f"observation joint_positions must be {N_JOINTS} finite values, got {obs.joint_positions!r}")
        request = self._request(obs, q)
        started = time.monotonic()
        reply = self._post(request)
        chunk = self._chunk(reply, q)
        logger.debug("policy server answered %d steps in %.3f s", chunk.positions.shape[0], time.monotonic() - started)
        self._new_episode = False
        return chunk

    # -- request --------------------------------------------------------------------------
    def _request(self, obs: Observation, q: np.ndarray) -> dict[str, Any]:
        if not 0 <= obs.subgoal_index < len(obs.task.subgoals):
            raise ValueError(f"subgoal_index {obs.subgoal_index} is outside task {obs.task.task_id!r}'s "
                             f"{len(obs.task.subgoals)} subgoals")
        image = obs.images.get(self.config.camera)
        if image is None:
            raise ValueError(f"observation has no {self.config.camera!r} image (images: {sorted(obs.images)})")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {self.config.camera!r} must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return {
            "instruction": obs.task.instruction,
            "subgoal": obs.task.subgoals[obs.subgoal_index].name,
            "subgoal_index": obs.subgoal_index,
            "new_episode": self._new_episode,
            "time_s": float(obs.sim_time_s),
            "image": {
                "camera": self.config.camera,
                "format": "png",
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "data": base64.b64encode(encode_png(image)).decode("ascii"),
            },
            "proprio": {"joint_names": list(JOINT_NAMES), "joint_positions": q.tolist()},
            "action_space": self.config.action_space,
        }

    def _post(self, payload: dict[str, Any]) -> Any:
        url = self.config.url
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as exc:
            detail = _error_body(exc)
            raise PolicyServerError(f"policy server {url} answered HTTP {exc.code} {exc.reason}: {detail!r}") from exc
        except urllib.error.URLError as exc:
            raise PolicyServerError(f"policy server {url} unreachable: {exc.reason}") from exc
        except TimeoutError as exc:
            raise PolicyServerError(f"policy server {url} did not answer within {self.config.timeout_s} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise PolicyServerError(f"policy server {url} failed: {type(exc).__name__}: {exc}") from exc
        if len(raw) > MAX_REPLY_BYTES:
            raise PolicyServerError(f"policy server {url} sent more than {MAX_REPLY_BYTES} bytes")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise PolicyServerError(f"policy server {url} sent invalid JSON: {exc}") from exc

    # -- response -------------------------------------------------------------------------
    def _chunk(self, reply: Any, q: np.ndarray) -> ActionChunk:
        if not isinstance(reply, dict):
            raise PolicyServerError(f"reply must be a JSON object, got {type(reply).__name__}")
        if "actions" not in reply:
            raise PolicyServerError(f"reply lacks the required key 'actions' (keys: {sorted(reply)})")
        actions = _number_matrix(reply["actions"], "actions")
        steps = actions.shape[0]
        if actions.shape[1] != N_JOINTS or not 1 <= steps <= self.config.max_chunk_steps:
            raise PolicyServerError(f"'actions' must have shape (T, {N_JOINTS}) with 1 <= T <= "
                                    f"{self.config.max_chunk_steps}, got {actions.shape}")
        if "times_s" in reply:
            times = _number_matrix([reply["times_s"]], "times_s")[0] if isinstance(reply["times_s"], list) else None
            if times is None or times.shape != (steps,):
                raise PolicyServerError(f"'times_s' must be a list of {steps} numbers (one per action), "
                                        f"got {str(reply['times_s'])[:200]}")
            if times[0] <= 0 or np.any(np.diff(times) <= 0):
                raise PolicyServerError(f"'times_s' must be > 0 and strictly increasing, got {times.tolist()}")
        else:
            times = np.arange(1, steps + 1, dtype=np.float64) / self.control_hz
        positions = q + np.cumsum(actions, axis=0) if self.config.action_space == "joint_deltas" else actions
        low, high = POSITION_LOWER - LIMIT_TOLERANCE, POSITION_UPPER + LIMIT_TOLERANCE
        bad = np.argwhere((positions < low) | (positions > high))
        if bad.size:
            step, joint = (int(i) for i in bad[0])
            raise PolicyServerError(
                f"target {positions[step, joint]:.4f} for {JOINT_NAMES[joint]} at step {step} is outside "
                f"its limits [{POSITION_LOWER[joint]}, {POSITION_UPPER[joint]}] ({len(bad)} such values)")
        return ActionChunk(positions, times)


def _number_matrix(value: Any, key: str) -> np.ndarray:
    """A non-empty list of equally long lists of finite JSON numbers, as a float array.
    Strings and booleans are refused rather than converted."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise PolicyServerError(f"{key!r} must be a non-empty list of lists of numbers, got {str(value)[:200]}")
    if len({len(row) for row in value}) != 1:
        raise PolicyServerError(f"{key!r} rows differ in length: {[len(row) for row in value]}")
    for row in value:
        for x in row:
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise PolicyServerError(f"{key!r} holds a non-number {x!r}")
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise PolicyServerError(f"{key!r} holds non-finite values (NaN or infinity)")
    return array


def _error_body(exc: urllib.error.HTTPError) -> str:
    """The start of an error reply's body, for the message; empty if it cannot be read."""
    try:
        return exc.read(200).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        exc.close()


def encode_png(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 RGB image as PNG bytes (lossless, so the server sees our pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def policy_from_env(control_hz: float) -> HttpVlaPolicy:
    """Registry factory: the config comes from the YAML file named by $HELMSTACK_HTTP_VLA_CONFIG."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"policy 'http_vla' needs ${CONFIG_ENV} set to a YAML file with at least 'url'")
    return HttpVlaPolicy(load_config(HttpVlaConfig, Path(path)), control_hz)
