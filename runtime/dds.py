"""DDS environment for every helmstack process: loopback only, fixed domain.

Fast DDS multicasts discovery on every interface by default. The shipped profile
(fastdds_loopback.xml) keeps discovery and data on 127.0.0.1 and shared memory. It only
holds with ROS_AUTOMATIC_DISCOVERY_RANGE=SYSTEM_DEFAULT: with LOCALHOST the rmw adds its
own unrestricted UDP transport on top of the profile.
"""
from __future__ import annotations

import os
from pathlib import Path

LOOPBACK_PROFILE = Path(__file__).with_name("fastdds_loopback.xml")
DEFAULT_DOMAIN_ID = 42


def loopback_env(domain_id: int | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Return a copy of `base` (default: os.environ) with the loopback DDS settings applied.

    An explicit `domain_id` wins; otherwise an existing ROS_DOMAIN_ID is kept (so tests can
    isolate themselves), else DEFAULT_DOMAIN_ID.
    """
    env = dict(os.environ if base is None else base)
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    else:
        env.setdefault("ROS_DOMAIN_ID", str(DEFAULT_DOMAIN_ID))
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SYSTEM_DEFAULT"
    env.pop("ROS_STATIC_PEERS", None)
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(LOOPBACK_PROFILE)
    return env


def apply_loopback_env(domain_id: int | None = None) -> None:
    """Apply loopback_env() to this process; call before rclpy.init()."""
    os.environ.update(loopback_env(domain_id))
