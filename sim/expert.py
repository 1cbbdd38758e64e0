"""Scripted expert for the tabletop suite: privileged motion primitives + IK.

The expert reads only observations (a WorldState with object poses and drawer slides, the
robot's joint positions) and the TaskSpec; it plans with its own `PandaKinematics`, never
with the simulated world. `act` returns a short chunk of joint-position targets at
`control_hz` and is closed loop: every call re-plans from the current observation.

Each subgoal predicate maps to a skill, a small state machine over motion primitives:
  grasped / lifted       pick: approach above, descend, close, (lift)
  in / on                pick, then transport at a safe height, lower, release, retreat
  at                     push along the line object -> region centre with the closed
                         fingers, re-aligning behind the object whenever it drifts
  open / closed          straddle-grasp the drawer handle, pull/push it along the slide
  released / not_grasped open the gripper and retreat
Skills begin by freeing the gripper (open, rise) when it holds something else, and fall
back to re-approaching when a grasp misses or an object drops.

Motion is generated on a Cartesian reference (grasp-frame position, top-down yaw, gripper
width) that moves at bounded speed toward the skill's current target; each reference
point is converted to arm joints by accurate IK seeded with the previous solution, so
consecutive targets are continuous. The reference is re-synchronised to the measured pose
when tracking is lost (e.g. after a collision).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sim.panda import (
    MAX_GRIPPER_WIDTH_M,
    N_ARM_JOINTS,
    N_JOINTS,
    POSITION_UPPER,
    IKError,
    PandaKinematics,
    finger_target_for_width,
    top_down_quaternion,
)
from sim.tasks.geometry import (
    DRAWER_CABINET_M,
    DRAWER_CLOSED_MAX_M,
    DRAWER_FLOOR_TOP_M,
    DRAWER_HANDLE_CENTRE_M,
    DRAWER_HANDLE_SIZE_M,
    DRAWER_OPEN_MIN_M,
    DRAWER_PANEL_TOP_M,
    DRAWER_TRAVEL_M,
    PLATE_RADIUS_M,
    PLATE_THICKNESS_M,
    TABLE_TOP_Z_M,
    SceneGeometry,
    container_inner,
    drawer_exposed_inner_x,
    rotation_matrix,
    yaw_of,
)
from sim.tasks.predicates import PredicateCall, grasped, parse_predicate
from sim.tasks.spec import TaskSpec
from sim.world_state import WorldState

logger = logging.getLogger(__name__)

CLOSED = -1.0  # gripper command: squeeze (finger joints driven to 0)
# Hand yaws are chosen so joint 7 stays at least this far from its limits.
YAW_JOINT_MARGIN_RAD = 0.35


@dataclass(frozen=True)
class ExpertConfig:
    """Motion parameters (metres, seconds, radians)."""

    chunk_steps: int = 6
    travel_height_m: float = 0.22  # grasp-frame height for transport (clears stacks, drawer)
    hover_above_m: float = 0.08  # pre-grasp height above an object's top
    free_speed_m_s: float = 0.35
    approach_speed_m_s: float = 0.12
    push_speed_m_s: float = 0.08
    drawer_speed_m_s: float = 0.08
    yaw_speed_rad_s: float = 2.5
    open_width_m: float = 0.07
    handle_approach_width_m: float = 0.05
    close_wait_s: float = 0.45
    open_wait_s: float = 0.3
    release_clearance_m: float = 0.008
    reach_tolerance_m: float = 0.006  # measured vs reference before closing/releasing
    resync_distance_m: float = 0.04  # measured vs reference beyond which tracking is lost
    drawer_open_target_m: float = 0.15
    drawer_close_target_m: float = -0.005

    def __post_init__(self) -> None:
        if isinstance(self.chunk_steps, bool) or not isinstance(self.chunk_steps, int) or not 1 <= self.chunk_steps <= 50:
            raise ValueError(f"ExpertConfig.chunk_steps must be an int in [1, 50], got {self.chunk_steps!r}")
        for name in (
            "travel_height_m",
            "hover_above_m",
            "free_speed_m_s",
            "approach_speed_m_s",
            "push_speed_m_s",
            "drawer_speed_m_s",
            "yaw_speed_rad_s",
            "open_width_m",
            "handle_approach_width_m",
            "close_wait_s",
            "open_wait_s",
            "reach_tolerance_m",
            "resync_distance_m",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ExpertConfig.{name} must be a positive number, got {value!r}")
        if self.open_width_m > MAX_GRIPPER_WIDTH_M:
            raise ValueError(f"ExpertConfig.open_width_m must be <= {MAX_GRIPPER_WIDTH_M:.4f}, got {self.open_width_m}")
        if not 0.0 <= self.release_clearance_m <= 0.05:
            raise ValueError(f"ExpertConfig.release_clearance_m must be in [0, 0.05], got {self.release_clearance_m!r}")
        if not DRAWER_OPEN_MIN_M < self.drawer_open_target_m <= DRAWER_TRAVEL_M:
            raise ValueError(
                f"ExpertConfig.drawer_open_target_m must be in ({DRAWER_OPEN_MIN_M}, {DRAWER_TRAVEL_M}], got {self.drawer_open_target_m!r}"
            )
        if not self.drawer_close_target_m < DRAWER_CLOSED_MAX_M:
            raise ValueError(f"ExpertConfig.drawer_close_target_m must be < {DRAWER_CLOSED_MAX_M}, got {self.drawer_close_target_m!r}")


@dataclass
class _Target:
    """Where the reference should go: grasp-frame position, yaw, gripper command, speed."""

    position: NDArray[np.float64]
    yaw: float
    width: float  # pad distance (m) or CLOSED
    speed_m_s: float


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def measured_yaw(ws: WorldState) -> float:
    """Top-down yaw of the measured grasp frame (inverse of `top_down_quaternion`, whose
    y axis points along (sin(yaw), -cos(yaw)))."""
    hand_y = rotation_matrix(ws.ee_quaternion)[:, 1]
    return math.atan2(hand_y[0], -hand_y[1])


def _yaw_gap(a: float, b: float) -> float:
    """Angle between two hand yaws; the two-finger hand is symmetric under a half turn."""
    return abs(_wrap(2 * (a - b))) / 2


def _closest_yaw(candidates: list[float], reference: float) -> float:
    return min(candidates, key=lambda a: _yaw_gap(a, reference))


def _symmetric_yaws(base: float, period: float) -> list[float]:
    """All yaws base + k * period inside (-pi, pi]."""
    n = int(round(2 * math.pi / period))
    return [_wrap(base + k * period) for k in range(n)]


# Top-down hand model for collision-aware yaw choice (grasp frame, metres): the fingers
# reach HAND_FINGER_BELOW_M below the grasp point and the hand body starts
# HAND_BODY_ABOVE_M above it; the body is long along the closing axis.
HAND_FINGER_BELOW_M = 0.012
HAND_BODY_ABOVE_M = 0.035
HAND_BODY_HALF_M = (0.107, 0.036)  # (along the closing axis, across)
FINGER_HALF_ACROSS_M = 0.015
FINGER_THICKNESS_M = 0.012
# Clearance beyond which yaw candidates count as equally good (then the smallest rotation
# wins), and below which a candidate counts as colliding.
ENOUGH_CLEARANCE_M = 0.03
MIN_CLEARANCE_M = 0.005


@dataclass(frozen=True)
class _Obstacle:
    """An object's footprint (oriented rectangle on the table) and its top height."""

    name: str
    centre: NDArray[np.float64]
    half: NDArray[np.float64]
    yaw: float
    top_z: float

    def distance(self, point: NDArray[np.float64]) -> float:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        d = point - self.centre
        local = np.array([c * d[0] + s * d[1], -s * d[0] + c * d[1]])
        return float(np.linalg.norm(np.maximum(np.abs(local) - self.half, 0.0)))

    def contains(self, point: NDArray[np.float64]) -> bool:
        return self.distance(point) == 0.0


def _obstacles(ws: WorldState, geometry: SceneGeometry, exclude: tuple[str, ...]) -> list[_Obstacle]:
    out = []
    for name, g in geometry.objects.items():
        if name in exclude:
            continue
        pos, quat = ws.object_poses[name]
        yaw = yaw_of(quat)
        rot = rotation_matrix(quat)
        if g.kind == "drawer":
            # The drawer as it is now: cabinet plus the pulled-out drawer and its handle.
            slide = ws.fixture_joints.get(name, 0.0)
            x0 = DRAWER_HANDLE_CENTRE_M[0] - DRAWER_HANDLE_SIZE_M[0] / 2 - slide
            x1 = DRAWER_CABINET_M[0] / 2
            local_c, half = np.array([(x0 + x1) / 2, 0.0]), np.array([(x1 - x0) / 2, DRAWER_CABINET_M[1] / 2])
            top = float(pos[2]) + DRAWER_PANEL_TOP_M
        else:
            local_c, half = np.array(g.footprint_centre_m), np.array(g.footprint_half_m)
            top = float(pos[2]) + (g.half_extent_along(rot, np.array([0.0, 0.0, 1.0])) if g.movable else g.size_m[2])
        out.append(_Obstacle(name, pos[:2] + rot[:2, :2] @ local_c, half, yaw, top))
    return out


def hand_clearance(obstacles: list[_Obstacle], xy: NDArray[np.float64], yaw: float, grasp_z: float, opening_m: float) -> float:
    """Smallest horizontal gap (m, negative = overlap) between the hand at (xy, grasp_z,
    yaw) and the obstacles tall enough to reach the fingers or the hand body."""
    closing = np.array([math.sin(yaw), -math.cos(yaw)])
    finger_reach = opening_m / 2 + FINGER_THICKNESS_M
    best = math.inf
    for ob in obstacles:
        if ob.top_z > grasp_z + HAND_BODY_ABOVE_M:
            reach, half_across = HAND_BODY_HALF_M
        elif ob.top_z > grasp_z - HAND_FINGER_BELOW_M:
            reach, half_across = finger_reach, FINGER_HALF_ACROSS_M
        else:
            continue
        for t in np.linspace(-reach, reach, 9):
            best = min(best, ob.distance(xy + t * closing) - half_across)
    return best


def _pick_yaw(candidates: list[tuple[float, bool]], score: Callable[[float], float], reference: float) -> float:
    """Choose among (yaw, preferred) candidates: collision-free first, then preferred,
    then the most clearance (up to ENOUGH_CLEARANCE_M), then the smallest rotation from
    `reference`."""

    def key(candidate: tuple[float, bool]) -> tuple[bool, bool, float, float]:
        yaw, preferred = candidate
        clearance = score(yaw)
        return clearance >= MIN_CLEARANCE_M, preferred, min(clearance, ENOUGH_CLEARANCE_M), -_yaw_gap(yaw, reference)

    return max(candidates, key=key)[0]


class _Skill:
    """A state machine over motion primitives for one subgoal."""

    def __init__(self, expert: ScriptedExpert, task: TaskSpec, call: PredicateCall):
        self.x = expert
        self.cfg = expert.config
        self.task = task
        self.geometry: SceneGeometry = task.geometry
        self.call = call
        self.phase = "start"
        self.phase_steps = 0

    def goto(self, phase: str) -> None:
        logger.debug("%s: %s -> %s", self.call, self.phase, phase)
        self.phase = phase
        self.phase_steps = 0

    def target(self, ws: WorldState) -> _Target:
        raise NotImplementedError

    # -- shared motion helpers ---------------------------------------------------------
    def transit(self, xy: NDArray[np.float64], z: float, yaw: float, width: float, speed: float) -> _Target:
        """Go to (xy, z) without sweeping through the scene: rise first when far away."""
        ref = self.x.ref_position
        far = float(np.linalg.norm(ref[:2] - xy)) > 0.02
        if far and ref[2] < self.cfg.travel_height_m - 0.01:
            return _Target(np.array([ref[0], ref[1], self.cfg.travel_height_m]), self.x.ref_yaw, width, self.cfg.free_speed_m_s)
        if far:
            return _Target(np.array([xy[0], xy[1], max(z, self.cfg.travel_height_m)]), yaw, width, self.cfg.free_speed_m_s)
        return _Target(np.array([xy[0], xy[1], z]), yaw, width, speed)

    def hold(self, width: float) -> _Target:
        return _Target(self.x.ref_position.copy(), self.x.ref_yaw, width, self.cfg.free_speed_m_s)

    def rise(self, width: float, height_m: float | None = None) -> _Target:
        ref = self.x.ref_position
        z = self.cfg.travel_height_m if height_m is None else height_m
        return _Target(np.array([ref[0], ref[1], max(ref[2], z)]), self.x.ref_yaw, width, self.cfg.approach_speed_m_s)

    def at(self, t: _Target) -> bool:
        """The reference has arrived at `t` (position and yaw)."""
        return bool(np.allclose(self.x.ref_position, t.position, atol=1e-4)) and _yaw_gap(self.x.ref_yaw, t.yaw) < 0.01

    def waited(self, seconds: float) -> bool:
        return self.phase_steps >= int(math.ceil(seconds * self.x.control_hz))

    def settled(self, ws: WorldState) -> bool:
        """Reference reached and the measured grasp frame within tolerance of it."""
        return (
            float(np.linalg.norm(ws.ee_position - self.x.ref_at_observation)) <= self.cfg.reach_tolerance_m
            and float(np.linalg.norm(self.x.ref_at_observation - self.x.ref_position)) < 1e-4
        )


class _PickPlace(_Skill):
    """Pick an object, then (optionally) lift it or put it in/on a destination."""

    def __init__(self, expert: ScriptedExpert, task: TaskSpec, call: PredicateCall):
        super().__init__(expert, task, call)
        self.obj = call.args[0]
        self.dest = call.args[1] if call.name in ("in", "on") else None
        self.lift_only = call.name == "lifted"
        self.grasp_yaw = 0.0
        self.hold_offset_z = 0.0
        self.release_to_m = expert.config.open_width_m
        self.place_local: NDArray[np.float64] | None = None

    # Two objects side by side in a container are placed at least this far apart.
    SPOT_CLEARANCE_M = 0.065

    # object-derived quantities
    def obj_xy(self, ws: WorldState) -> NDArray[np.float64]:
        return ws.position(self.obj)[:2]

    def obj_half_z(self, ws: WorldState) -> float:
        return self.geometry.objects[self.obj].half_extent_along(rotation_matrix(ws.quaternion(self.obj)), np.array([0.0, 0.0, 1.0]))

    def choose_grasp_yaw(self, ws: WorldState) -> float:
        g = self.geometry.objects[self.obj]
        yaw = yaw_of(ws.quaternion(self.obj))
        # Fingers close along the object's y axis (across a block's short side); a block
        # narrow enough may also be taken lengthwise when the hand would otherwise collide.
        # The hand is symmetric under a half turn, so one yaw per orientation.
        across = _wrap(2 * yaw) / 2
        lengthwise = _wrap(2 * (yaw + math.pi / 2)) / 2
        square = abs(g.size_m[0] - g.size_m[1]) < 1e-6
        candidates = [(across, True)]
        if square or g.size_m[0] <= self.cfg.open_width_m - 0.01:
            candidates.append((lengthwise, square))
        xy = self.obj_xy(ws)
        # Containers/plates the object sits in or on are not in the way.
        obstacles = [o for o in _obstacles(ws, self.geometry, (self.obj,)) if not o.contains(xy)]
        z = float(ws.position(self.obj)[2])
        return _pick_yaw(candidates, lambda a: hand_clearance(obstacles, xy, a, z, self.cfg.open_width_m), self.x.ref_yaw)

    def holding(self, ws: WorldState) -> bool:
        return grasped(ws, self.geometry, self.obj)

    def target(self, ws: WorldState) -> _Target:
        cfg = self.cfg
        if self.phase == "start":
            if self.holding(ws):
                self.goto("close")  # finish squeezing before moving
            elif ws.gripper_width < cfg.open_width_m - 0.01:
                self.goto("open")
            else:
                self.goto("approach")
        if self.phase == "open":
            # Time only: a finger may be blocked (e.g. by a drawer front) short of the
            # full opening; the approach starts by rising, which frees it.
            if self.waited(cfg.open_wait_s):
                self.goto("approach")
            else:
                return self.hold(cfg.open_width_m)
        if self.phase == "approach":
            self.place_local = None
            self.grasp_yaw = self.choose_grasp_yaw(ws)
            top = float(ws.position(self.obj)[2]) + self.obj_half_z(ws)
            t = self.transit(self.obj_xy(ws), top + cfg.hover_above_m, self.grasp_yaw, cfg.open_width_m, cfg.free_speed_m_s)
            if self.at(t) and np.allclose(t.position[:2], self.obj_xy(ws)):
                self.goto("descend")
            else:
                return t
        if self.phase == "descend":
            grasp_z = max(float(ws.position(self.obj)[2]), TABLE_TOP_Z_M + 0.015)
            xy = self.obj_xy(ws)
            if float(np.linalg.norm(xy - self.x.ref_position[:2])) > 0.02:
                self.goto("approach")  # the object moved away: re-approach from above
                return self.rise(cfg.open_width_m, float(ws.position(self.obj)[2]) + cfg.hover_above_m)
            t = _Target(np.array([xy[0], xy[1], grasp_z]), self.grasp_yaw, cfg.open_width_m, cfg.approach_speed_m_s)
            if self.at(t) and self.settled(ws):
                self.goto("close")
            else:
                return t
        if self.phase == "close":
            if self.waited(cfg.close_wait_s):
                if self.holding(ws):
                    self.hold_offset_z = float(ws.position(self.obj)[2] - ws.ee_position[2])
                    self.goto("lift")
                else:
                    self.goto("retry")
            else:
                return self.hold(CLOSED)
        if self.phase == "retry":
            t = self.rise(cfg.open_width_m, float(ws.position(self.obj)[2]) + cfg.hover_above_m)
            if self.at(t) and self.waited(cfg.open_wait_s):
                self.goto("approach")
            else:
                return t
        if self.phase in ("lift", "transport", "lower") and not self.holding(ws):
            self.goto("retry")  # dropped or slipped
            return self.rise(cfg.open_width_m, float(ws.position(self.obj)[2]) + cfg.hover_above_m)
        if self.phase == "lift":
            t = self.rise(CLOSED)
            if self.at(t) and self.dest is not None:
                self.goto("transport")
            else:
                return t
        if self.phase == "transport":
            xy, _, yaw = self.place_pose(ws)
            t = _Target(np.array([xy[0], xy[1], cfg.travel_height_m]), yaw, CLOSED, cfg.free_speed_m_s)
            if self.at(t):
                self.goto("lower")
            else:
                return t
        if self.phase == "lower":
            xy, surface_z, yaw = self.place_pose(ws)
            z = surface_z + self.obj_half_z(ws) + cfg.release_clearance_m - self.hold_offset_z
            t = _Target(np.array([xy[0], xy[1], z]), yaw, CLOSED, cfg.approach_speed_m_s)
            # Measured hand well above where it was commanded: the object touches down.
            blocked = ws.ee_position[2] - self.x.ref_at_observation[2] > 0.01
            if blocked or (self.at(t) and self.settled(ws)):
                self.goto("release")
            else:
                return t
        if self.phase == "release":
            if self.phase_steps == 0:
                self.release_to_m = self.release_width(ws)
            if self.waited(cfg.open_wait_s):
                self.goto("retreat")
            else:
                return self.hold(self.release_to_m)
        if self.phase == "retreat":
            top = float(ws.position(self.obj)[2]) + self.obj_half_z(ws)
            t = self.rise(cfg.open_width_m, top + cfg.hover_above_m)
            if self.at(t):
                # Still not satisfied after a placement (object bounced off): start over.
                self.goto("approach")
            return t
        return self.hold(cfg.open_width_m)

    def place_pose(self, ws: WorldState) -> tuple[NDArray[np.float64], float, float]:
        """(xy, support surface z, hand yaw) for releasing the held object."""
        assert self.dest is not None
        dest_pos, dest_quat = ws.object_poses[self.dest]
        kind = self.geometry.kind(self.dest)
        dest_yaw = yaw_of(dest_quat)
        obj_yaw = yaw_of(ws.quaternion(self.obj))
        # Object yaw relative to the hand from the same observation; the reference yaw is
        # where the hand will be, used to choose the smallest rotation.
        rel = _wrap(obj_yaw - measured_yaw(ws))
        hand_yaw = self.x.ref_yaw
        if kind in ("cube", "block"):
            yaw = _closest_yaw([_wrap(a - rel) for a in _symmetric_yaws(dest_yaw, math.pi / 2)], hand_yaw)
            top = float(dest_pos[2]) + self.geometry.objects[self.dest].half_extent_along(rotation_matrix(dest_quat), np.array([0.0, 0.0, 1.0]))
            return dest_pos[:2].copy(), top, yaw
        rot = rotation_matrix(dest_quat)[:2, :2]
        if self.place_local is None:
            # Chosen once per placement (in the destination's frame): re-choosing while
            # lowering would chase objects the fingers nudge.
            self.place_local = self.choose_place_spot(ws, kind, rot)
        xy = dest_pos[:2] + rot @ self.place_local
        if kind == "plate":
            return xy, float(dest_pos[2]) + PLATE_THICKNESS_M, hand_yaw
        if kind == "drawer":
            g = self.geometry.objects[self.obj]
            # The object's long side goes along the drawer's slide axis.
            long_axis_yaw = obj_yaw if g.size_m[0] >= g.size_m[1] else obj_yaw + math.pi / 2
            rel_long = _wrap(long_axis_yaw - measured_yaw(ws))
            yaw = _closest_yaw([_wrap(a - rel_long) for a in _symmetric_yaws(dest_yaw, math.pi)], hand_yaw)
            return xy, float(dest_pos[2]) + DRAWER_FLOOR_TOP_M, yaw
        return xy, float(dest_pos[2]) + container_inner(kind)[2], hand_yaw

    def choose_place_spot(self, ws: WorldState, kind: str, rot: NDArray[np.float64]) -> NDArray[np.float64]:
        """Release point in the destination frame (plate, drawer or container)."""
        assert self.dest is not None
        if kind == "drawer":
            x0, x1 = drawer_exposed_inner_x(ws.fixture_joints.get(self.dest, 0.0))
            return np.array([(x0 + x1) / 2, 0.0])
        margin = self.place_margin(ws)
        if kind == "plate":
            r = PLATE_RADIUS_M - margin
            return self.free_spot(ws, self.dest, rot, (-r, r), (-r, r), radius=r)
        (x0, x1), (y0, y1), _ = container_inner(kind)
        return self.free_spot(ws, self.dest, rot, (x0 + margin, x1 - margin), (y0 + margin, y1 - margin))

    def place_margin(self, ws: WorldState) -> float:
        """Clearance (m) between the held object's centre and a container wall: its
        footprint, or the opened fingers beside it, whichever reaches further."""
        g = self.geometry.objects[self.obj]
        half_diag = 0.5 * math.hypot(g.size_m[0], g.size_m[1])
        return max(half_diag, self.release_width(ws) / 2 + 0.01) + 0.005

    def release_width(self, ws: WorldState) -> float:
        """Open just enough to let go: the grip width plus a few millimetres per side."""
        return min(self.cfg.open_width_m, ws.gripper_width + 0.016)

    def free_spot(
        self,
        ws: WorldState,
        dest: str,
        rot: NDArray[np.float64],
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        radius: float | None = None,
    ) -> NDArray[np.float64]:
        """A point (destination frame) in the allowed box (and disk) away from the other
        movable objects. When the task puts several objects in/on `dest`, candidates are
        the box's corners (so the first one does not take the middle); otherwise a grid
        where the centre wins once it is clear enough."""
        origin = ws.position(dest)[:2]
        others = [rot.T @ (ws.position(n)[:2] - origin) for n, g in self.geometry.objects.items() if g.movable and n != self.obj]
        if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
            return np.array([(x_range[0] + x_range[1]) / 2, (y_range[0] + y_range[1]) / 2])
        placed_here = {c.args[0] for c in map(parse_predicate, (sg.predicate for sg in self.task.subgoals)) if c.name in ("in", "on") and c.args[1] == dest}
        shared = len(placed_here) > 1
        if shared:
            scale = 1 / math.sqrt(2) if radius is not None else 1.0
            points = [np.array([x * scale, y * scale]) for x in x_range for y in y_range]
        else:
            points = [np.array([x, y]) for x in np.linspace(*x_range, 7) for y in np.linspace(*y_range, 7)]
            if radius is not None:
                points = [c for c in points if float(np.linalg.norm(c)) <= radius + 1e-9]

        def key(c: NDArray[np.float64]) -> tuple[float, float]:
            clearance = min((float(np.linalg.norm(c - o)) for o in others), default=math.inf)
            return min(clearance, self.SPOT_CLEARANCE_M), -float(np.linalg.norm(c))

        return max(points, key=key)


class _Push(_Skill):
    """Push an object into a table region with the closed fingers."""

    # Half extent of the closed finger pair along the push: the fingers side by side
    # (closing axis across the push) or one behind the other (closing axis along it).
    FINGERS_HALF_ACROSS_M = 0.015
    FINGERS_HALF_ALONG_M = 0.028
    # Fingertips 1.6 cm above the table: contact on the object's upper half while the
    # hand body stays above container walls.
    PUSH_HEIGHT_M = 0.028
    APPROACH_GAP_M = 0.02

    def __init__(self, expert: ScriptedExpert, task: TaskSpec, call: PredicateCall):
        super().__init__(expert, task, call)
        self.obj, self.region = call.args
        self.dir = np.array([1.0, 0.0])
        self.yaw = 0.0
        self.finger_half_m = self.FINGERS_HALF_ACROSS_M

    def goal(self) -> NDArray[np.float64]:
        return self.geometry.regions[self.region].centre

    def contact_offset(self, ws: WorldState, direction: NDArray[np.float64]) -> float:
        g = self.geometry.objects[self.obj]
        half = g.half_extent_along(rotation_matrix(ws.quaternion(self.obj)), np.array([direction[0], direction[1], 0.0]))
        return half + self.finger_half_m

    def choose_yaw(self, ws: WorldState) -> tuple[float, float]:
        """(hand yaw, finger half extent along the push). Closing axis across the push
        unless the hand would then hit something along the way; then along it."""
        heading = math.atan2(self.dir[1], self.dir[0])
        across = _wrap(2 * heading) / 2
        along = _wrap(2 * (heading + math.pi / 2)) / 2
        obstacles = _obstacles(ws, self.geometry, (self.obj,))
        obj_xy = ws.position(self.obj)[:2]
        g = self.geometry.objects[self.obj]
        offset = g.half_extent_along(rotation_matrix(ws.quaternion(self.obj)), np.array([self.dir[0], self.dir[1], 0.0]))
        offset += self.FINGERS_HALF_ALONG_M
        start, end = obj_xy - self.dir * offset, self.goal() - self.dir * offset
        path = [start + f * (end - start) for f in (0.0, 0.5, 1.0)]

        def clearance(yaw: float) -> float:
            return min(hand_clearance(obstacles, xy, yaw, self.PUSH_HEIGHT_M, 0.0) for xy in path)

        if clearance(across) >= min(clearance(along), ENOUGH_CLEARANCE_M):
            return across, self.FINGERS_HALF_ACROSS_M
        return along, self.FINGERS_HALF_ALONG_M

    def begin_approach(self, ws: WorldState) -> None:
        """Fix the push direction and hand yaw for this attempt (re-deciding the yaw on
        every call could oscillate between the two options)."""
        to_goal = self.goal() - ws.position(self.obj)[:2]
        if float(np.linalg.norm(to_goal)) > 1e-3:
            self.dir = to_goal / float(np.linalg.norm(to_goal))
        self.yaw, self.finger_half_m = self.choose_yaw(ws)
        self.goto("approach")

    def target(self, ws: WorldState) -> _Target:
        cfg = self.cfg
        obj_xy = ws.position(self.obj)[:2]
        to_goal = self.goal() - obj_xy
        dist = float(np.linalg.norm(to_goal))
        if self.phase == "start":
            if self.x.ref_position[2] < 0.1:
                self.goto("lift_clear")
            else:
                self.begin_approach(ws)
        if self.phase == "lift_clear":
            t = self.rise(CLOSED, 0.12)
            if self.at(t):
                self.begin_approach(ws)
            else:
                return t
        if self.phase == "approach":
            if dist > 1e-3:
                self.dir = to_goal / dist
            pre = obj_xy - self.dir * (self.contact_offset(ws, self.dir) + self.APPROACH_GAP_M)
            t = self.transit(pre, 0.10, self.yaw, CLOSED, cfg.free_speed_m_s)
            if self.at(t) and np.allclose(t.position[:2], pre, atol=1e-4):
                self.goto("descend")
            else:
                return t
        if self.phase == "descend":
            pre = obj_xy - self.dir * (self.contact_offset(ws, self.dir) + self.APPROACH_GAP_M)
            t = _Target(np.array([pre[0], pre[1], self.PUSH_HEIGHT_M]), self.yaw, CLOSED, cfg.approach_speed_m_s)
            if self.at(t):
                self.goto("push")
            else:
                return t
        if self.phase == "push":
            ee_xy = self.x.ref_position[:2]
            rel = obj_xy - ee_xy
            along = float(rel @ self.dir)
            lateral = float(rel @ np.array([-self.dir[1], self.dir[0]]))
            if dist > 1e-3:
                new_dir = to_goal / dist
            else:
                new_dir = self.dir
            turn = math.degrees(math.acos(float(np.clip(new_dir @ self.dir, -1, 1))))
            if abs(lateral) > 0.012 or along < 0.0 or turn > 20.0:
                self.goto("realign")
            elif dist < 0.005:
                return self.hold(CLOSED)
            else:
                # Chase a point just past contact, along the current object->goal line.
                advance = min(0.03, dist)
                pusher = obj_xy - new_dir * self.contact_offset(ws, new_dir) + new_dir * advance
                return _Target(np.array([pusher[0], pusher[1], self.PUSH_HEIGHT_M]), self.x.ref_yaw, CLOSED, cfg.push_speed_m_s)
        if self.phase == "realign":
            t = self.rise(CLOSED, 0.10)
            if self.at(t):
                self.begin_approach(ws)
            else:
                return t
        return self.hold(CLOSED)


class _Drawer(_Skill):
    """Grasp the drawer handle (fingers straddling the bar) and slide it to a target."""

    def __init__(self, expert: ScriptedExpert, task: TaskSpec, call: PredicateCall):
        super().__init__(expert, task, call)
        self.drawer = call.args[0]
        self.target_slide = expert.config.drawer_open_target_m if call.name == "open" else expert.config.drawer_close_target_m

    def handle_position(self, ws: WorldState, slide: float) -> NDArray[np.float64]:
        pos, quat = ws.object_poses[self.drawer]
        local = np.array(DRAWER_HANDLE_CENTRE_M) - np.array([slide, 0.0, 0.0])
        return pos + rotation_matrix(quat) @ local

    def handle_yaw(self, ws: WorldState) -> float:
        # Fingers close along the slide axis (cabinet x): hand yaw = cabinet yaw - pi/2.
        return _closest_yaw(_symmetric_yaws(yaw_of(ws.quaternion(self.drawer)) - math.pi / 2, math.pi), 0.0)

    def target(self, ws: WorldState) -> _Target:
        cfg = self.cfg
        slide = ws.fixture_joints.get(self.drawer, 0.0)
        handle = self.handle_position(ws, slide)
        yaw = self.handle_yaw(ws)
        if self.phase == "start":
            near = float(np.linalg.norm(ws.ee_position - handle)) < 0.015
            if near and ws.gripper_width < DRAWER_HANDLE_SIZE_M[0] + 0.01:
                self.goto("slide")
            elif ws.gripper_width < cfg.handle_approach_width_m - 0.01:
                self.goto("open")
            else:
                self.goto("approach")
        if self.phase == "open":
            if self.waited(cfg.open_wait_s):
                self.goto("approach")
            else:
                return self.hold(cfg.handle_approach_width_m)
        if self.phase == "approach":
            hover = handle + np.array([0.0, 0.0, cfg.hover_above_m])
            t = self.transit(hover[:2], float(hover[2]), yaw, cfg.handle_approach_width_m, cfg.free_speed_m_s)
            if self.at(t) and np.allclose(t.position, hover, atol=1e-4):
                self.goto("descend")
            else:
                return t
        if self.phase == "descend":
            t = _Target(handle.copy(), yaw, cfg.handle_approach_width_m, cfg.approach_speed_m_s)
            if self.at(t) and self.settled(ws):
                self.goto("close")
            else:
                return t
        if self.phase == "close":
            if self.waited(cfg.close_wait_s):
                self.goto("slide")
            else:
                return self.hold(CLOSED)
        if self.phase == "slide":
            if float(np.linalg.norm(ws.ee_position - handle)) > 0.025:
                self.goto("regrasp")  # lost the handle
            elif abs(slide - self.target_slide) < 0.005:
                return self.hold(CLOSED)
            else:
                goal = self.handle_position(ws, self.target_slide)
                return _Target(goal, yaw, CLOSED, cfg.drawer_speed_m_s)
        if self.phase == "regrasp":
            t = self.rise(cfg.handle_approach_width_m, float(handle[2]) + cfg.hover_above_m)
            if self.at(t):
                self.goto("approach")
            return t
        return self.hold(CLOSED)


class _Release(_Skill):
    """Open the gripper and back off upwards."""

    RETREAT_M = 0.06

    def __init__(self, expert: ScriptedExpert, task: TaskSpec, call: PredicateCall):
        super().__init__(expert, task, call)
        self.retreat_z = 0.0

    def target(self, ws: WorldState) -> _Target:
        if self.phase == "start":
            self.retreat_z = float(self.x.ref_position[2]) + self.RETREAT_M
            self.goto("release")
        if self.phase == "release" and self.waited(self.cfg.open_wait_s):
            self.goto("retreat")
        if self.phase == "release":
            return self.hold(self.cfg.open_width_m)
        return self.rise(self.cfg.open_width_m, self.retreat_z)


_SKILLS: dict[str, type[_Skill]] = {
    "grasped": _PickPlace,
    "lifted": _PickPlace,
    "in": _PickPlace,
    "on": _PickPlace,
    "at": _Push,
    "open": _Drawer,
    "closed": _Drawer,
    "released": _Release,
    "not_grasped": _Release,
}


class ScriptedExpert:
    """Privileged scripted policy: `act(world_state, joint_positions, task, subgoal_index)`
    returns a (T, 9) chunk of joint-position targets at `control_hz`."""

    def __init__(self, kinematics: PandaKinematics, control_hz: float = 20, config: ExpertConfig | None = None):
        if isinstance(control_hz, bool) or not isinstance(control_hz, (int, float)) or not math.isfinite(control_hz) or control_hz <= 0:
            raise ValueError(f"control_hz must be a positive number, got {control_hz!r}")
        self.kinematics = kinematics
        self.control_hz = float(control_hz)
        self.config = config or ExpertConfig()
        self.reset()

    def reset(self) -> None:
        """Forget the reference and the current skill (call at every episode start)."""
        self._skill: _Skill | None = None
        self._skill_key: tuple[str, int] | None = None
        self.ref_position = np.zeros(3)
        self.ref_yaw = 0.0
        self.ref_at_observation = np.zeros(3)
        self._q_ref: NDArray[np.float64] | None = None
        self._finger_target = finger_target_for_width(self.config.open_width_m)

    def act(self, world_state: WorldState, joint_positions: ArrayLike, task: TaskSpec, subgoal_index: int) -> NDArray[np.float64]:
        if not 0 <= subgoal_index < len(task.subgoals):
            raise IndexError(f"subgoal_index must be in [0, {len(task.subgoals)}), got {subgoal_index}")
        q = np.asarray(joint_positions, dtype=float).reshape(-1)
        if q.size != N_JOINTS:
            raise ValueError(f"joint_positions must have {N_JOINTS} entries, got {q.size}")
        key = (task.task_id, subgoal_index)
        if key != self._skill_key:
            call = parse_predicate(task.subgoals[subgoal_index].predicate)
            self._skill = _SKILLS[call.name](self, task, call)
            self._skill_key = key
        assert self._skill is not None
        self._sync_reference(world_state, q)
        self.ref_at_observation = self.ref_position.copy()
        rows = np.empty((self.config.chunk_steps, N_JOINTS))
        for i in range(self.config.chunk_steps):
            target = self._skill.target(world_state)
            self._advance(target)
            self._skill.phase_steps += 1
            rows[i, :N_ARM_JOINTS] = self._q_ref
            rows[i, N_ARM_JOINTS:] = self._finger_target
        return rows

    # -- reference ---------------------------------------------------------------------
    def _sync_reference(self, ws: WorldState, q: NDArray[np.float64]) -> None:
        lost = self._q_ref is None or float(np.linalg.norm(ws.ee_position - self.ref_position)) > self.config.resync_distance_m
        if lost:
            if self._q_ref is not None:
                logger.debug("tracking lost (%.3f m): re-synchronising the reference", float(np.linalg.norm(ws.ee_position - self.ref_position)))
            self.ref_position = ws.ee_position.copy()
            # Top-down hand: the closing axis (hand y) heading gives the yaw.
            self.ref_yaw = measured_yaw(ws)
            self._q_ref = q[:N_ARM_JOINTS].copy()

    def _advance(self, target: _Target) -> None:
        """Move the reference one control step toward `target` and solve IK for it."""
        dt = 1.0 / self.control_hz
        delta = target.position - self.ref_position
        dist = float(np.linalg.norm(delta))
        step = target.speed_m_s * dt
        yaw_err = self._yaw_representative(target.yaw, target.position) - self.ref_yaw
        yaw_step = self.config.yaw_speed_rad_s * dt
        # Translation and rotation finish together; whichever needs longer sets the pace.
        n_steps = max(dist / step if step > 0 else 0.0, abs(yaw_err) / yaw_step, 1.0)
        new_pos = self.ref_position + delta / n_steps
        new_yaw = self.ref_yaw + yaw_err / n_steps
        if target.width == CLOSED:
            self._finger_target = 0.0
        else:
            self._finger_target = finger_target_for_width(target.width)
        try:
            q = self.kinematics.ik(new_pos, top_down_quaternion(new_yaw), self._q_ref)
        except IKError as exc:
            if exc.position_error_m > 0.01:
                logger.debug("IK failed, holding: %s", exc)
                return
            q = exc.best_q
        self.ref_position, self.ref_yaw, self._q_ref = new_pos, new_yaw, q

    def _yaw_representative(self, yaw: float, position: NDArray[np.float64]) -> float:
        """The hand yaw equivalent to `yaw` (mod pi) nearest the current one that keeps
        joint 7 away from its limits. Top-down, q7 ~ q1 + pi/4 - yaw with q1 ~ the
        azimuth of the position, so yaw must stay within q1 + pi/4 -+ (2.97 - margin)."""
        centre = math.atan2(position[1], position[0]) + math.pi / 4
        half_window = POSITION_UPPER[6] - YAW_JOINT_MARGIN_RAD
        reps = [yaw + k * math.pi for k in range(-3, 4)]
        inside = [r for r in reps if abs(r - centre) <= half_window]
        if not inside:
            return min(reps, key=lambda r: abs(r - centre))
        return min(inside, key=lambda r: abs(r - self.ref_yaw))
