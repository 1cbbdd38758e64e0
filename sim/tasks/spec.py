"""Declarative task specifications (in the spirit of LIBERO's BDDL goals) and their loader.

A task is a YAML file: an instruction, the objects/fixtures with their initial-state
distribution (an xy box and a yaw range each, plus the drawer's initial slide range), goal
regions on the table, and an ordered list of subgoals, each a predicate call such as
``in(red_cube, bowl)``. Everything is validated at load time; errors name the file, the
field path and the bad value (`TaskSpecError`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.config import ConfigError, load_config
from sim.tasks.geometry import (
    ALL_KINDS,
    DRAWER_TRAVEL_M,
    MOVABLE_KINDS,
    ObjectGeometry,
    RegionGeometry,
    SceneGeometry,
    object_geometry,
)
from sim.tasks.predicates import PredicateError, check_predicate, parse_predicate

# Reachable, top-down-graspable part of the table for the Panda at the origin.
WORKSPACE_X_M = (0.25, 0.80)
WORKSPACE_Y_M = (-0.42, 0.42)

COLORS_RGBA: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.1, 0.1, 1.0),
    "green": (0.1, 0.7, 0.2, 1.0),
    "blue": (0.1, 0.25, 0.85, 1.0),
    "yellow": (0.95, 0.85, 0.1, 1.0),
    "orange": (0.95, 0.5, 0.05, 1.0),
    "purple": (0.55, 0.2, 0.7, 1.0),
    "white": (0.92, 0.92, 0.92, 1.0),
    "grey": (0.55, 0.55, 0.55, 1.0),
    "brown": (0.55, 0.35, 0.2, 1.0),
    "black": (0.1, 0.1, 0.1, 1.0),
}


class TaskSpecError(ConfigError):
    """A task file or mapping is malformed; the message names file, field and value."""


def _range(value: Any, field_name: str, allow_equal: bool = True) -> tuple[float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise ValueError(f"{field_name} must be [lo, hi] (two finite numbers), got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi or (lo == hi and not allow_equal):
        raise ValueError(f"{field_name} must have lo {'<=' if allow_equal else '<'} hi, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class RegionSpec:
    """An xy box on the table (world frame, metres); `color` draws it as a goal marker."""

    x_m: tuple[float, float]
    y_m: tuple[float, float]
    color: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "x_m", _range(self.x_m, "x_m"))
        object.__setattr__(self, "y_m", _range(self.y_m, "y_m"))
        if not (WORKSPACE_X_M[0] <= self.x_m[0] and self.x_m[1] <= WORKSPACE_X_M[1]):
            raise ValueError(f"x_m must lie within the workspace {list(WORKSPACE_X_M)}, got {list(self.x_m)}")
        if not (WORKSPACE_Y_M[0] <= self.y_m[0] and self.y_m[1] <= WORKSPACE_Y_M[1]):
            raise ValueError(f"y_m must lie within the workspace {list(WORKSPACE_Y_M)}, got {list(self.y_m)}")
        if self.color is not None and self.color not in COLORS_RGBA:
            raise ValueError(f"color must be one of {sorted(COLORS_RGBA)}, got {self.color!r}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object or fixture and its initial-state distribution."""

    name: str
    kind: str
    color: str
    region: RegionSpec
    yaw_deg: tuple[float, float] = (0.0, 0.0)
    size_m: tuple[float, float, float] | None = None
    initial_joint_m: tuple[float, float] | None = None  # drawer only: slide range at reset

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name must be an identifier, got {self.name!r}")
        if self.kind not in ALL_KINDS:
            raise ValueError(f"kind must be one of {list(ALL_KINDS)}, got {self.kind!r}")
        if self.color not in COLORS_RGBA:
            raise ValueError(f"color must be one of {sorted(COLORS_RGBA)}, got {self.color!r}")
        lo, hi = _range(self.yaw_deg, "yaw_deg")
        if lo < -180 or hi > 180:
            raise ValueError(f"yaw_deg must lie within [-180, 180], got {list(self.yaw_deg)}")
        object.__setattr__(self, "yaw_deg", (lo, hi))
        if self.size_m is not None:
            if self.kind not in MOVABLE_KINDS:
                raise ValueError(f"size_m is only allowed for {list(MOVABLE_KINDS)}, got size_m={self.size_m!r} for kind {self.kind!r}")
            if len(self.size_m) != 3 or not all(0.015 <= float(v) <= 0.1 for v in self.size_m):
                raise ValueError(f"size_m must be three extents in [0.015, 0.1] m, got {self.size_m!r}")
            if min(float(v) for v in self.size_m[:2]) > 0.07:
                raise ValueError(f"size_m must have a horizontal side <= 0.07 m to fit the gripper, got {self.size_m!r}")
            object.__setattr__(self, "size_m", tuple(float(v) for v in self.size_m))
        if self.initial_joint_m is not None:
            if self.kind != "drawer":
                raise ValueError(f"initial_joint_m is only allowed for drawers, got {self.initial_joint_m!r} for kind {self.kind!r}")
            lo, hi = _range(self.initial_joint_m, "initial_joint_m")
            if lo < 0 or hi > DRAWER_TRAVEL_M:
                raise ValueError(f"initial_joint_m must lie within [0, {DRAWER_TRAVEL_M}], got {list(self.initial_joint_m)}")
            object.__setattr__(self, "initial_joint_m", (lo, hi))

    @property
    def geometry(self) -> ObjectGeometry:
        return object_geometry(self.name, self.kind, self.size_m)


@dataclass(frozen=True)
class SubgoalSpec:
    """A named subgoal; `predicate` is a call such as ``in(red_cube, bowl)``."""

    name: str
    predicate: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        try:
            parse_predicate(self.predicate)
        except PredicateError as exc:
            raise ValueError(str(exc)) from exc


@dataclass(frozen=True)
class TaskSpec:
    """A long-horizon task: objects, goal regions and 3-6 ordered subgoals."""

    task_id: str
    instruction: str
    objects: tuple[ObjectSpec, ...]
    subgoals: tuple[SubgoalSpec, ...]
    max_steps_per_subgoal: int = 200
    regions: dict[str, RegionSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id.isidentifier():
            raise ValueError(f"task_id must be an identifier, got {self.task_id!r}")
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {self.instruction!r}")
        if not self.objects:
            raise ValueError("objects must not be empty")
        names = [o.name for o in self.objects]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"objects: duplicate names {dup}")
        clash = sorted(set(names) & set(self.regions))
        if clash:
            raise ValueError(f"regions: names {clash} are also object names")
        if sum(o.kind == "drawer" for o in self.objects) > 1:
            raise ValueError("objects: at most one drawer per task")
        if not 3 <= len(self.subgoals) <= 6:
            raise ValueError(f"subgoals must have 3 to 6 entries, got {len(self.subgoals)}")
        if isinstance(self.max_steps_per_subgoal, bool) or not isinstance(self.max_steps_per_subgoal, int) or self.max_steps_per_subgoal <= 0:
            raise ValueError(f"max_steps_per_subgoal must be a positive int, got {self.max_steps_per_subgoal!r}")
        geometry = self.geometry
        for i, sg in enumerate(self.subgoals):
            try:
                check_predicate(parse_predicate(sg.predicate), geometry)
            except PredicateError as exc:
                raise ValueError(f"subgoals[{i}].predicate: {exc}") from exc

    @property
    def geometry(self) -> SceneGeometry:
        """The static scene description the predicates and the expert use."""
        return SceneGeometry(
            objects={o.name: o.geometry for o in self.objects},
            regions={name: RegionGeometry(name, r.x_m, r.y_m) for name, r in self.regions.items()},
        )

    def object(self, name: str) -> ObjectSpec:
        for o in self.objects:
            if o.name == name:
                return o
        raise KeyError(f"task {self.task_id!r} has no object {name!r}; objects: {[o.name for o in self.objects]}")


# -- loading ------------------------------------------------------------------------------
def task_from_dict(data: Any, origin: str = "<dict>") -> TaskSpec:
    """Build and validate a TaskSpec from a parsed YAML mapping."""
    if not isinstance(data, Mapping):
        raise TaskSpecError(f"{origin}: task must be a mapping, got {data!r}")
    try:
        return load_config(TaskSpec, dict(data), root="task", origin=origin)
    except ConfigError as exc:
        raise TaskSpecError(str(exc)) from exc


def load_task_file(path: str | Path) -> TaskSpec:
    """Load one task YAML file."""
    try:
        return load_config(TaskSpec, Path(path), root="task")
    except ConfigError as exc:
        raise TaskSpecError(str(exc)) from exc
