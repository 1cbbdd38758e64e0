"""Static geometry of every object kind the tabletop knows, and of one task's scene.

One source of truth for three users: the scene builds its bodies from these numbers, the
predicates judge containment/support with them, and the scripted expert plans grasps and
placements with them. The drawer's numbers describe `sim/assets/drawer.urdf` (a test
compares the two). Frames: every object's pose is its base frame; movable objects'
base frame is their geometric centre, fixtures' base frame sits on the table surface at
the centre of their footprint (z up). The table top is the plane z = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

TABLE_TOP_Z_M = 0.0

MOVABLE_KINDS = ("cube", "block")
CONTAINER_KINDS = ("bowl", "tray", "drawer")
SUPPORT_KINDS = ("plate", "cube", "block")
FIXTURE_KINDS = ("bowl", "tray", "plate", "drawer")
ALL_KINDS = MOVABLE_KINDS + FIXTURE_KINDS

DEFAULT_MOVABLE_SIZE_M: dict[str, tuple[float, float, float]] = {
    "cube": (0.04, 0.04, 0.04),
    # A bar-like block: grasped across its short horizontal side.
    "block": (0.06, 0.035, 0.035),
}
MOVABLE_MASS_KG = 0.08

# Bowl: an open box (floor + four walls) built from primitives.
BOWL_OUTER_M = (0.16, 0.16, 0.06)
BOWL_WALL_M = 0.01
BOWL_FLOOR_M = 0.01

# Tray: pybullet_data's tray/traybox.urdf scaled down; its walls slant outwards, the
# flat floor spans about +-0.2 of the unscaled 0.6 m box.
TRAY_SCALE = 0.45
TRAY_OUTER_M = (0.6 * TRAY_SCALE, 0.6 * TRAY_SCALE, 0.13 * TRAY_SCALE)
TRAY_INNER_HALF_M = (0.19 * TRAY_SCALE, 0.19 * TRAY_SCALE)
TRAY_FLOOR_TOP_M = 0.015 * TRAY_SCALE

# Plate: a thin disk.
PLATE_RADIUS_M = 0.08
PLATE_THICKNESS_M = 0.012

# Drawer (sim/assets/drawer.urdf), cabinet frame: origin on the table at the footprint
# centre, +x towards the back; the opening faces -x and the drawer slides out along -x.
DRAWER_CABINET_M = (0.22, 0.26, 0.10)  # outer depth (x), width (y), height (z)
DRAWER_FRONT_X_M = -0.10  # the cabinet's open front face
DRAWER_TRAVEL_M = 0.17  # joint upper limit
DRAWER_INNER_X_M = (-0.10, 0.075)  # drawer box interior at slide 0, cabinet frame
DRAWER_INNER_HALF_Y_M = 0.105
DRAWER_FLOOR_TOP_M = 0.02
DRAWER_PANEL_TOP_M = 0.13
DRAWER_HANDLE_CENTRE_M = (-0.166, 0.0, 0.114)  # handle bar centre at slide 0
DRAWER_HANDLE_SIZE_M = (0.012, 0.10, 0.012)
# Slide positions that count as open / closed.
DRAWER_OPEN_MIN_M = 0.12
DRAWER_CLOSED_MAX_M = 0.01

# Footprints used for overlap rejection when sampling initial states (half extents in
# the object frame, centre offset in the object frame). The drawer's includes the space
# the open drawer and its handle sweep.
_DRAWER_SWEEP_MIN_X_M = DRAWER_HANDLE_CENTRE_M[0] - DRAWER_TRAVEL_M - 0.03


@dataclass(frozen=True)
class ObjectGeometry:
    """Geometry of one named object: kind, bounding-box size, footprint."""

    name: str
    kind: str
    size_m: tuple[float, float, float]  # full bounding-box extents in the object frame
    footprint_centre_m: tuple[float, float] = (0.0, 0.0)
    footprint_half_m: tuple[float, float] = (0.0, 0.0)

    @property
    def movable(self) -> bool:
        return self.kind in MOVABLE_KINDS

    def half_extent_along(self, rotation: NDArray[np.float64], axis_world: NDArray[np.float64]) -> float:
        """Half extent of the (rotated) bounding box along a world direction."""
        local = rotation.T @ axis_world
        return 0.5 * float(np.sum(np.abs(local) * np.asarray(self.size_m)))


def object_geometry(name: str, kind: str, size_m: tuple[float, float, float] | None = None) -> ObjectGeometry:
    """Geometry for an object of `kind`; only movable kinds take a custom size."""
    if kind in MOVABLE_KINDS:
        size = tuple(float(v) for v in (size_m or DEFAULT_MOVABLE_SIZE_M[kind]))
        half = (size[0] / 2, size[1] / 2)
        return ObjectGeometry(name, kind, size, (0.0, 0.0), half)  # type: ignore[arg-type]
    if size_m is not None:
        raise ValueError(f"object {name!r}: kind {kind!r} has a fixed size, got size_m={size_m}")
    if kind == "bowl":
        return ObjectGeometry(name, kind, BOWL_OUTER_M, (0.0, 0.0), (BOWL_OUTER_M[0] / 2, BOWL_OUTER_M[1] / 2))
    if kind == "tray":
        return ObjectGeometry(name, kind, TRAY_OUTER_M, (0.0, 0.0), (TRAY_OUTER_M[0] / 2, TRAY_OUTER_M[1] / 2))
    if kind == "plate":
        d = 2 * PLATE_RADIUS_M
        return ObjectGeometry(name, kind, (d, d, PLATE_THICKNESS_M), (0.0, 0.0), (PLATE_RADIUS_M, PLATE_RADIUS_M))
    if kind == "drawer":
        back_x = DRAWER_CABINET_M[0] / 2
        return ObjectGeometry(
            name,
            kind,
            DRAWER_CABINET_M,
            ((back_x + _DRAWER_SWEEP_MIN_X_M) / 2, 0.0),
            ((back_x - _DRAWER_SWEEP_MIN_X_M) / 2, DRAWER_CABINET_M[1] / 2),
        )
    raise ValueError(f"object {name!r}: unknown kind {kind!r}; known kinds: {list(ALL_KINDS)}")


@dataclass(frozen=True)
class RegionGeometry:
    """An axis-aligned xy box on the table (world frame), e.g. a push target zone."""

    name: str
    x_m: tuple[float, float]
    y_m: tuple[float, float]

    def contains(self, xy: NDArray[np.float64]) -> bool:
        return bool(self.x_m[0] <= xy[0] <= self.x_m[1] and self.y_m[0] <= xy[1] <= self.y_m[1])

    @property
    def centre(self) -> NDArray[np.float64]:
        return np.array([(self.x_m[0] + self.x_m[1]) / 2, (self.y_m[0] + self.y_m[1]) / 2])


@dataclass(frozen=True)
class SceneGeometry:
    """The static description of one task's scene: objects by name and goal regions."""

    objects: dict[str, ObjectGeometry] = field(default_factory=dict)
    regions: dict[str, RegionGeometry] = field(default_factory=dict)

    def kind(self, name: str) -> str:
        return self.objects[name].kind


def container_inner(kind: str) -> tuple[tuple[float, float], tuple[float, float], float]:
    """(x range, y range, floor top z) of a bowl/tray interior in the container frame.

    The drawer's interior is given at slide 0 (see `drawer_inner_frame_offset`).
    """
    if kind == "bowl":
        h = BOWL_OUTER_M[0] / 2 - BOWL_WALL_M
        return (-h, h), (-h, h), BOWL_FLOOR_M
    if kind == "tray":
        return (-TRAY_INNER_HALF_M[0], TRAY_INNER_HALF_M[0]), (-TRAY_INNER_HALF_M[1], TRAY_INNER_HALF_M[1]), TRAY_FLOOR_TOP_M
    if kind == "drawer":
        return DRAWER_INNER_X_M, (-DRAWER_INNER_HALF_Y_M, DRAWER_INNER_HALF_Y_M), DRAWER_FLOOR_TOP_M
    raise ValueError(f"kind {kind!r} is not a container; containers: {list(CONTAINER_KINDS)}")


def drawer_exposed_inner_x(slide_m: float) -> tuple[float, float]:
    """Cabinet-frame x range of the drawer interior that sticks out of the cabinet
    (reachable from above) at slide position `slide_m`."""
    return DRAWER_INNER_X_M[0] - slide_m, min(DRAWER_FRONT_X_M, DRAWER_INNER_X_M[1] - slide_m)


def yaw_of(quaternion_xyzw: NDArray[np.float64]) -> float:
    """Heading (rad) of a body's x axis projected on the table."""
    x, y, z, w = (float(v) for v in quaternion_xyzw)
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def rotation_matrix(quaternion_xyzw: NDArray[np.float64]) -> NDArray[np.float64]:
    """3x3 rotation matrix of an xyzw quaternion (pure numpy, no physics client needed)."""
    x, y, z, w = (float(v) for v in quaternion_xyzw)
    n = x * x + y * y + z * z + w * w
    s = 0.0 if n == 0 else 2.0 / n
    return np.array(
        [
            [1 - s * (y * y + z * z), s * (x * y - w * z), s * (x * z + w * y)],
            [s * (x * y + w * z), 1 - s * (x * x + z * z), s * (y * z - w * x)],
            [s * (x * z - w * y), s * (y * z + w * x), 1 - s * (x * x + y * y)],
        ]
    )
