"""Initial-state distribution of a task: per-object xy boxes and yaw ranges, sampled from a
seed with rejection of overlapping footprints.

The sample depends only on (task, seed): a `numpy.random.Generator` seeded with the seed,
objects drawn in a fixed order (fixtures first, then movables, in file order). Footprints
are oriented rectangles (the drawer's includes the space its drawer sweeps when opened);
goal regions count as occupied so no object starts inside one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from sim.tasks.spec import ObjectSpec, TaskSpec

FOOTPRINT_MARGIN_M = 0.025
MAX_TRIES_PER_OBJECT = 500


class InitialStateError(RuntimeError):
    """No overlap-free placement was found for an object (the task's regions are too tight)."""


@dataclass(frozen=True)
class ObjectPlacement:
    xy_m: tuple[float, float]
    yaw_rad: float


@dataclass(frozen=True)
class InitialState:
    placements: dict[str, ObjectPlacement]
    fixture_joints: dict[str, float]


@dataclass(frozen=True)
class _Rect:
    centre: NDArray[np.float64]
    half: NDArray[np.float64]
    yaw: float

    def axes(self) -> NDArray[np.float64]:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, s], [-s, c]])

    def corners(self) -> NDArray[np.float64]:
        ax = self.axes()
        signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float)
        return self.centre + (signs * self.half) @ ax


def _overlap(a: _Rect, b: _Rect) -> bool:
    """Separating-axis test for two oriented rectangles."""
    ca, cb = a.corners(), b.corners()
    for axis in np.vstack([a.axes(), b.axes()]):
        pa, pb = ca @ axis, cb @ axis
        if pa.max() < pb.min() or pb.max() < pa.min():
            return False
    return True


def _footprint(obj: ObjectSpec, xy: NDArray[np.float64], yaw: float) -> _Rect:
    g = obj.geometry
    c, s = math.cos(yaw), math.sin(yaw)
    offset = np.array(g.footprint_centre_m)
    centre = xy + np.array([c * offset[0] - s * offset[1], s * offset[0] + c * offset[1]])
    return _Rect(centre, np.array(g.footprint_half_m) + FOOTPRINT_MARGIN_M / 2, yaw)


def sample_initial_state(task: TaskSpec, seed: int) -> InitialState:
    """Object placements (table xy + yaw) and fixture joint positions for `seed`."""
    rng = np.random.default_rng(seed)
    occupied = [
        _Rect(np.array([(r.x_m[0] + r.x_m[1]) / 2, (r.y_m[0] + r.y_m[1]) / 2]), np.array([(r.x_m[1] - r.x_m[0]) / 2, (r.y_m[1] - r.y_m[0]) / 2]), 0.0)
        for r in task.regions.values()
    ]
    ordered = [o for o in task.objects if not o.geometry.movable] + [o for o in task.objects if o.geometry.movable]
    placements: dict[str, ObjectPlacement] = {}
    for obj in ordered:
        for _ in range(MAX_TRIES_PER_OBJECT):
            xy = np.array([rng.uniform(*obj.region.x_m), rng.uniform(*obj.region.y_m)])
            yaw = math.radians(rng.uniform(*obj.yaw_deg))
            rect = _footprint(obj, xy, yaw)
            if not any(_overlap(rect, other) for other in occupied):
                occupied.append(rect)
                placements[obj.name] = ObjectPlacement((float(xy[0]), float(xy[1])), yaw)
                break
        else:
            raise InitialStateError(
                f"task {task.task_id!r}, seed {seed}: no overlap-free placement for {obj.name!r} in "
                f"x_m={list(obj.region.x_m)}, y_m={list(obj.region.y_m)} after {MAX_TRIES_PER_OBJECT} tries"
            )
    joints = {
        o.name: float(rng.uniform(*o.initial_joint_m)) if o.initial_joint_m is not None else 0.0
        for o in task.objects
        if o.kind == "drawer"
    }
    return InitialState(placements, joints)
