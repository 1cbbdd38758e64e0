"""Policy registry: the `policy` parameter/flag names one of these."""
from __future__ import annotations

from collections.abc import Callable

from policies.base import Policy


def _scripted_expert(control_hz: float) -> Policy:
    from policies.scripted_expert import ScriptedExpertPolicy

    return ScriptedExpertPolicy(control_hz=control_hz)


def _http_vla(control_hz: float) -> Policy:
    # A remote policy server; its YAML config is named by $HELMSTACK_HTTP_VLA_CONFIG.
    from policies.http_vla import policy_from_env

    return policy_from_env(control_hz)


def _bc(control_hz: float) -> Policy:
    # A trained behaviour-cloning run; its directory is named by $HELMSTACK_BC_CHECKPOINT (default runs/bc).
    from policies.bc import policy_from_env

    return policy_from_env(control_hz)


POLICIES: dict[str, Callable[[float], Policy]] = {
    "scripted_expert": _scripted_expert,
    "http_vla": _http_vla,
    "bc": _bc,
}


def make_policy(name: str, control_hz: float) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (available: {', '.join(POLICIES)})") from None
    return factory(control_hz)
