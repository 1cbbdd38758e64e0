"""Spinning multi-channel LiDAR simulated by batched ray casting in pybullet.

The sensor frame follows ROS: x forward, y left, z up. Channel (ring) 0 is the
lowest beam; elevations are spread evenly over ``vertical_fov_deg``, azimuths
(counter-clockwise from +x, about +z) every ``horizontal_resolution_deg`` over
``horizontal_fov_deg`` centred on +x. Rays start at the sensor origin so that a
surface closer than ``min_range_m`` occludes (and gives no return), like the
blind zone of a real unit.

Bodies listed in ``ignore_body_ids`` (typically the robot carrying the sensor)
are made transparent by re-casting the affected rays from just beneath the
hit surface, at most ``MAX_RECASTS`` times. Bullet does not report a hit for a
ray that starts inside a box or convex-hull shape (what URDF meshes load as),
so one re-cast per ignored shape suffices. Spheres and capsules do report a hit
at the start of a ray cast from inside them, so rays entering such an ignored
shape, like rays that run out of re-casts, end with no return.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pybullet as p
from numpy.typing import ArrayLike, NDArray

from sim.sensors._geometry import as_position, quat_to_matrix

logger = logging.getLogger(__name__)

# Re-casts allowed per ray past ignored bodies. Neighbouring link hulls of an
# arm overlap, so a ray through a robot can enter three of them in a row.
MAX_RECASTS = 3
# Bullet still reports a hit at the start of a ray that begins within about a
# millimetre (the collision margin) beneath a surface, so a re-cast starts this
# deep beneath the ignored surface, measured along its normal ...
RECAST_DEPTH_M = 3e-3
# ... which for grazing rays means a longer step along the ray, capped here.
RECAST_MAX_STEP_M = 0.03


@dataclass(frozen=True)
class LidarConfig:
    """Beam layout (degrees), range limits (metres) and scan rate of the driving node."""

    num_channels: int = 16
    vertical_fov_deg: tuple[float, float] = (-15.0, 15.0)
    horizontal_resolution_deg: float = 1.0
    horizontal_fov_deg: float = 360.0
    min_range_m: float = 0.05
    max_range_m: float = 5.0
    rate_hz: float = 10.0

    def __post_init__(self) -> None:
        n = self.num_channels
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"LidarConfig.num_channels must be an int >= 1, got {n!r}")
        fov = self.vertical_fov_deg
        if len(fov) != 2 or not -90.0 <= fov[0] <= fov[1] <= 90.0:
            raise ValueError(
                f"LidarConfig.vertical_fov_deg must be (low, high) with -90 <= low <= high <= 90,"
                f" got {fov!r}"
            )
        if n > 1 and fov[0] == fov[1]:
            raise ValueError(
                f"LidarConfig.vertical_fov_deg must span a range for {n} channels, got {fov!r}"
            )
        if not self.horizontal_resolution_deg > 0.0:
            raise ValueError(
                "LidarConfig.horizontal_resolution_deg must be > 0,"
                f" got {self.horizontal_resolution_deg}"
            )
        if not 0.0 < self.horizontal_fov_deg <= 360.0:
            raise ValueError(
                f"LidarConfig.horizontal_fov_deg must be in (0, 360], got {self.horizontal_fov_deg}"
            )
        if not self.min_range_m >= 0.0:
            raise ValueError(f"LidarConfig.min_range_m must be >= 0, got {self.min_range_m}")
        if not self.max_range_m > self.min_range_m:
            raise ValueError(
                f"LidarConfig.max_range_m must be > min_range_m ({self.min_range_m}),"
                f" got {self.max_range_m}"
            )
        if not self.rate_hz > 0.0:
            raise ValueError(f"LidarConfig.rate_hz must be > 0, got {self.rate_hz}")

    def elevations_rad(self) -> NDArray[np.float64]:
        """(num_channels,) beam elevations, ring 0 lowest."""
        low, high = self.vertical_fov_deg
        return np.radians(np.linspace(low, high, self.num_channels))

    def azimuths_rad(self) -> NDArray[np.float64]:
        """(num_azimuth,) column azimuths, counter-clockwise about +z from +x."""
        res = self.horizontal_resolution_deg
        fov = self.horizontal_fov_deg
        if fov >= 360.0:
            # Full turn: no duplicate column at +180 deg.
            count = max(1, round(360.0 / res))
            return np.radians(-180.0 + res * np.arange(count))
        count = math.floor(fov / res + 1e-9) + 1
        return np.radians(-fov / 2.0 + res * np.arange(count))


@dataclass
class LidarScan:
    """One scan. Points and ring only cover returns; ranges cover every beam."""

    points: NDArray[np.float32]  # (N, 3) metres, sensor frame
    ranges: NDArray[np.float32]  # (num_channels, num_azimuth) metres, inf = no return
    ring: NDArray[np.uint16]  # (N,) channel index of each point
    azimuth_rad: NDArray[np.float32]  # (num_azimuth,) column azimuths
    elevation_rad: NDArray[np.float32]  # (num_channels,) channel elevations


class Lidar:
    """Casts the configured beam pattern into one pybullet client."""

    def __init__(self, cfg: LidarConfig, client_id: int) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._elevation = cfg.elevations_rad()
        self._azimuth = cfg.azimuths_rad()
        el = self._elevation[:, None]
        az = self._azimuth[None, :]
        # (C, A, 3) unit beam directions in the sensor frame.
        self._dirs = np.stack(
            np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)),
            axis=-1,
        )
        self._ring_grid = np.broadcast_to(
            np.arange(cfg.num_channels, dtype=np.uint16)[:, None], self._dirs.shape[:2]
        )

    def scan(
        self,
        position: ArrayLike,
        quaternion: ArrayLike,
        ignore_body_ids: Iterable[int] = (),
    ) -> LidarScan:
        """Scan from the sensor pose (position (3,) m, quaternion (4,) xyzw, world frame)."""
        origin = as_position(position)
        rot = quat_to_matrix(quaternion)
        dirs_sensor = self._dirs.reshape(-1, 3)
        dirs_world = dirs_sensor @ rot.T  # (R, 3)
        ends = origin + dirs_world * self.cfg.max_range_m

        starts = np.broadcast_to(origin, ends.shape)
        body, hit, normal = self._cast(starts, ends)
        ignored = np.fromiter(ignore_body_ids, dtype=np.int64)
        for _ in range(MAX_RECASTS):
            redo = np.flatnonzero(np.isin(body, ignored))
            if redo.size == 0:
                break
            cos_incidence = np.abs(np.einsum("ij,ij->i", dirs_world[redo], normal[redo]))
            step = np.minimum(RECAST_DEPTH_M / np.maximum(cos_incidence, 1e-6), RECAST_MAX_STEP_M)
            body[redo], hit[redo], normal[redo] = self._cast(
                hit[redo] + dirs_world[redo] * step[:, None], ends[redo]
            )
        # Rays still ending on an ignored body ran out of re-casts: no return.
        exhausted = np.isin(body, ignored)
        if np.any(exhausted):
            logger.debug("%d rays still on ignored bodies after %d re-casts", exhausted.sum(), MAX_RECASTS)
            body[exhausted] = -1

        ranges = np.full(body.shape, np.inf)
        valid = body >= 0
        ranges[valid] = np.einsum("ij,ij->i", hit[valid] - origin, dirs_world[valid])
        ranges[ranges < self.cfg.min_range_m] = np.inf
        ranges = ranges.reshape(self._dirs.shape[:2])

        returned = np.isfinite(ranges)
        points = ranges[returned][:, None] * self._dirs[returned]
        return LidarScan(
            points=points.astype(np.float32),
            ranges=ranges.astype(np.float32),
            ring=self._ring_grid[returned],
            azimuth_rad=self._azimuth.astype(np.float32),
            elevation_rad=self._elevation.astype(np.float32),
        )

    def _cast(
        self, starts: NDArray[np.float64], ends: NDArray[np.float64]
    ) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
        """Cast rays (R, 3) -> first-hit body ids (R,) (-1 = none), hit points (R, 3)
        and hit surface normals (R, 3), all in the world frame."""
        body = np.full(len(starts), -1, dtype=np.int64)
        hit = np.zeros((len(starts), 3))
        normal = np.zeros((len(starts), 3))
        # pybullet 3.2.7 answers a batch of exactly MAX_RAY_INTERSECTION_BATCH_SIZE
        # rays with one result fewer, so batches stay one below that size.
        batch = p.MAX_RAY_INTERSECTION_BATCH_SIZE - 1
        for lo in range(0, len(starts), batch):
            chunk = slice(lo, min(lo + batch, len(starts)))
            results = p.rayTestBatch(
                starts[chunk].tolist(),
                ends[chunk].tolist(),
                numThreads=1,  # deterministic and fair on a shared machine
                physicsClientId=self.client_id,
            )
            if len(results) != chunk.stop - chunk.start:
                raise RuntimeError(
                    f"rayTestBatch returned {len(results)} results for {chunk.stop - chunk.start} rays"
                )
            # Each result: (body id, link index, hit fraction, hit position, hit normal).
            body[chunk] = [r[0] for r in results]
            hit[chunk] = [r[3] for r in results]
            normal[chunk] = [r[4] for r in results]
        return body, hit, normal
