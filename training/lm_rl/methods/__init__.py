"""Registry of LM RL methods: each a ``Method`` (group constructor + advantage function +
mask function) that runs on the shared GRPO core, in our trainer and in the TRL adapter.

The loss presets of the core (grpo, dr_grpo, dapo, gspo, rloo) are registered as
methods that build plain groups; the papers' methods (docs/papers/lm-rl.md) register
themselves from their own modules, imported below.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from training.lm_rl.core import preset_names
from training.lm_rl.methods.base import GroupBatch, Method, RolloutContext, concat_batches

MethodFactory = Callable[..., Method]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Register a factory (usually the Method subclass) under ``name``."""

    def decorator(factory: MethodFactory) -> MethodFactory:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = factory
        return factory

    return decorator


def method_names() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str, **options: Any) -> Method:
    """Build the method ``name`` with its options (a ValueError names the valid methods)."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    factory = _METHODS[name]
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        valid = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options: {valid}")
    return factory(**options)


def _plain(preset: str) -> MethodFactory:
    def factory() -> Method:
        method = Method()
        method.name = preset
        method.default_loss = preset
        return method

    factory.__doc__ = f"Plain groups with the {preset!r} loss preset."
    return factory


for _preset in preset_names():
    register_method(_preset)(_plain(_preset))

# The papers' methods register themselves on import; they need register_method defined above.
for _module in ("cerl", "difference_feedback", "eqlen", "ibpo", "internalize", "mgrpo", "tgc"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "GroupBatch",
    "Method",
    "RolloutContext",
    "concat_batches",
    "get_method",
    "method_names",
    "register_method",
]
