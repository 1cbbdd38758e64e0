"""Subgoal predicates: pure functions of a WorldState and the scene's static geometry.

A subgoal is written as a call, e.g. ``in(red_cube, bowl)``; `parse_predicate` turns it
into a `PredicateCall`, `check_predicate` validates names and argument roles against a
scene, `evaluate` decides it. The thresholds are tolerant (a cube a few millimetres off
still counts) but not trivial: placements require the object to be released and resting
low in/on its target, a grasp requires the fingers to be closed on the object's width
with the object between them.

Predicates:
  grasped(obj)          fingers closed on obj, obj between the pads
  released(obj)         not grasped (alias: not_grasped)
  lifted(obj)           grasped and its bottom at least LIFT_MIN_HEIGHT_M above the table
  in(obj, container)    bowl / tray / drawer: centre inside the inner walls, resting low
  on(obj, support)      plate / cube / block (stacking): centre over the top face, resting on it
  at(obj, region)       centre inside a task region, resting on the table (push targets)
  open(drawer)          slide >= DRAWER_OPEN_MIN_M
  closed(drawer)        slide <= DRAWER_CLOSED_MAX_M
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from sim.tasks.geometry import (
    CONTAINER_KINDS,
    DRAWER_CLOSED_MAX_M,
    DRAWER_OPEN_MIN_M,
    MOVABLE_KINDS,
    PLATE_RADIUS_M,
    PLATE_THICKNESS_M,
    SUPPORT_KINDS,
    TABLE_TOP_Z_M,
    SceneGeometry,
    container_inner,
    rotation_matrix,
)
from sim.world_state import WorldState

# Grasp: pad distance within this of the object's extent across the closing axis, object
# centre within these distances of the grasp frame (closing axis, approach axis, third).
GRASP_WIDTH_TOLERANCE_M = 0.012
GRASP_MAX_OFFSET_M = (0.02, 0.035, 0.035)
LIFT_MIN_HEIGHT_M = 0.05
# "Resting": bottom of the object at most this far above the surface it should rest on
# (negative side covers interpenetration and tilt).
REST_MAX_GAP_M = 0.015
REST_MIN_GAP_M = -0.01


class PredicateError(ValueError):
    """A predicate string is malformed or refers to unknown/unsuitable objects."""


@dataclass(frozen=True)
class PredicateCall:
    name: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(self.args)})"


_CALL_RE = re.compile(r"^\s*([a-z_]+)\s*\(\s*([^()]*?)\s*\)\s*$")
_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_predicate(text: str) -> PredicateCall:
    """Parse ``name(arg, ...)``; raises PredicateError on bad syntax or unknown names."""
    m = _CALL_RE.match(text)
    if m is None:
        raise PredicateError(f"predicate {text!r} is not of the form name(arg, ...)")
    name = m.group(1)
    args = tuple(a.strip() for a in m.group(2).split(",")) if m.group(2) else ()
    if name not in PREDICATES:
        raise PredicateError(f"predicate {text!r}: unknown predicate {name!r}; known: {sorted(PREDICATES)}")
    roles = PREDICATES[name][0]
    if len(args) != len(roles):
        raise PredicateError(f"predicate {text!r}: {name} takes {len(roles)} argument(s) ({', '.join(roles)}), got {len(args)}")
    for a in args:
        if not _ARG_RE.match(a):
            raise PredicateError(f"predicate {text!r}: bad argument {a!r}")
    return PredicateCall(name, args)


_ROLE_KINDS: dict[str, tuple[str, ...]] = {
    "movable": MOVABLE_KINDS,
    "container": CONTAINER_KINDS,
    "support": SUPPORT_KINDS,
    "drawer": ("drawer",),
}


def check_predicate(call: PredicateCall, geometry: SceneGeometry) -> None:
    """Every argument must name an object (or region) of a kind the role accepts."""
    roles = PREDICATES[call.name][0]
    for role, arg in zip(roles, call.args):
        if role == "region":
            if arg not in geometry.regions:
                raise PredicateError(f"predicate {call}: unknown region {arg!r}; task regions: {sorted(geometry.regions)}")
            continue
        if arg not in geometry.objects:
            raise PredicateError(f"predicate {call}: unknown object {arg!r}; task objects: {sorted(geometry.objects)}")
        kind = geometry.objects[arg].kind
        if kind not in _ROLE_KINDS[role]:
            raise PredicateError(f"predicate {call}: {arg!r} is a {kind}, but {call.name} needs a {role} ({', '.join(_ROLE_KINDS[role])})")
    if len(call.args) == 2 and call.args[0] == call.args[1]:
        raise PredicateError(f"predicate {call}: both arguments are {call.args[0]!r}")


def evaluate(predicate: str | PredicateCall, ws: WorldState, geometry: SceneGeometry) -> bool:
    """Decide a predicate on a world state."""
    call = parse_predicate(predicate) if isinstance(predicate, str) else predicate
    return PREDICATES[call.name][1](ws, geometry, *call.args)


# -- helpers ------------------------------------------------------------------------------
def _bottom_z(ws: WorldState, geometry: SceneGeometry, obj: str) -> float:
    pos, quat = ws.object_poses[obj]
    half_z = geometry.objects[obj].half_extent_along(rotation_matrix(quat), np.array([0.0, 0.0, 1.0]))
    return float(pos[2]) - half_z


def _top_z(ws: WorldState, geometry: SceneGeometry, obj: str) -> float:
    pos, quat = ws.object_poses[obj]
    half_z = geometry.objects[obj].half_extent_along(rotation_matrix(quat), np.array([0.0, 0.0, 1.0]))
    return float(pos[2]) + half_z


def _local(ws: WorldState, frame_obj: str, point: NDArray[np.float64]) -> NDArray[np.float64]:
    pos, quat = ws.object_poses[frame_obj]
    return rotation_matrix(quat).T @ (point - pos)


def _resting(gap_m: float) -> bool:
    return REST_MIN_GAP_M <= gap_m <= REST_MAX_GAP_M


def drawer_frame_point(ws: WorldState, drawer: str, point: NDArray[np.float64]) -> NDArray[np.float64]:
    """A world point in the drawer box's frame (cabinet frame shifted by the slide)."""
    local = _local(ws, drawer, point)
    local[0] += ws.fixture_joints.get(drawer, 0.0)
    return local


# -- predicates ---------------------------------------------------------------------------
def grasped(ws: WorldState, geometry: SceneGeometry, obj: str) -> bool:
    pos, quat = ws.object_poses[obj]
    hand = rotation_matrix(ws.ee_quaternion)
    closing_axis = hand[:, 1]
    # Object centre in the grasp frame: y is the closing axis, z the approach axis.
    offset = hand.T @ (pos - ws.ee_position)
    if abs(offset[1]) > GRASP_MAX_OFFSET_M[0] or abs(offset[2]) > GRASP_MAX_OFFSET_M[1] or abs(offset[0]) > GRASP_MAX_OFFSET_M[2]:
        return False
    extent = 2 * geometry.objects[obj].half_extent_along(rotation_matrix(quat), closing_axis)
    return abs(ws.gripper_width - extent) <= GRASP_WIDTH_TOLERANCE_M


def released(ws: WorldState, geometry: SceneGeometry, obj: str) -> bool:
    return not grasped(ws, geometry, obj)


def lifted(ws: WorldState, geometry: SceneGeometry, obj: str) -> bool:
    return grasped(ws, geometry, obj) and _bottom_z(ws, geometry, obj) >= TABLE_TOP_Z_M + LIFT_MIN_HEIGHT_M


def inside(ws: WorldState, geometry: SceneGeometry, obj: str, container: str) -> bool:
    if grasped(ws, geometry, obj):
        return False
    kind = geometry.kind(container)
    centre = ws.position(obj)
    (x0, x1), (y0, y1), floor_z = container_inner(kind)
    local = drawer_frame_point(ws, container, centre) if kind == "drawer" else _local(ws, container, centre)
    if not (x0 <= local[0] <= x1 and y0 <= local[1] <= y1):
        return False
    floor_world_z = float(ws.position(container)[2]) + floor_z
    return _resting(_bottom_z(ws, geometry, obj) - floor_world_z)


def on(ws: WorldState, geometry: SceneGeometry, obj: str, support: str) -> bool:
    if grasped(ws, geometry, obj):
        return False
    centre = ws.position(obj)
    sup = geometry.objects[support]
    if sup.kind == "plate":
        local = _local(ws, support, centre)
        if float(np.hypot(local[0], local[1])) > PLATE_RADIUS_M:
            return False
        top_z = float(ws.position(support)[2]) + PLATE_THICKNESS_M
    else:
        if grasped(ws, geometry, support):
            return False
        local = _local(ws, support, centre)
        if not (abs(local[0]) <= sup.size_m[0] / 2 and abs(local[1]) <= sup.size_m[1] / 2):
            return False
        top_z = _top_z(ws, geometry, support)
    return _resting(_bottom_z(ws, geometry, obj) - top_z)


def at(ws: WorldState, geometry: SceneGeometry, obj: str, region: str) -> bool:
    if grasped(ws, geometry, obj):
        return False
    if not geometry.regions[region].contains(ws.position(obj)[:2]):
        return False
    return _resting(_bottom_z(ws, geometry, obj) - TABLE_TOP_Z_M)


def is_open(ws: WorldState, geometry: SceneGeometry, drawer: str) -> bool:
    return ws.fixture_joints.get(drawer, 0.0) >= DRAWER_OPEN_MIN_M


def is_closed(ws: WorldState, geometry: SceneGeometry, drawer: str) -> bool:
    return ws.fixture_joints.get(drawer, 0.0) <= DRAWER_CLOSED_MAX_M


PredicateFn = Callable[..., bool]
# name -> (argument roles, function)
PREDICATES: dict[str, tuple[tuple[str, ...], PredicateFn]] = {
    "grasped": (("movable",), grasped),
    "released": (("movable",), released),
    "not_grasped": (("movable",), released),
    "lifted": (("movable",), lifted),
    "in": (("movable", "container"), inside),
    "on": (("movable", "support"), on),
    "at": (("movable", "region"), at),
    "open": (("drawer",), is_open),
    "closed": (("drawer",), is_closed),
}
