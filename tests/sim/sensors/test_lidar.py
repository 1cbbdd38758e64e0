"""LiDAR against known geometry: ground plane, a wall, ignored bodies, big batches."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from sim.sensors._geometry import quat_to_matrix
from sim.sensors.lidar import Lidar, LidarConfig

IDENTITY = (0.0, 0.0, 0.0, 1.0)


@pytest.fixture
def client(request: pytest.FixtureRequest) -> int:
    cid = p.connect(p.DIRECT)
    request.addfinalizer(lambda: p.disconnect(cid))
    return cid


def _box(cid: int, half_extents, position) -> int:
    col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half_extents, physicsClientId=cid)
    return p.createMultiBody(0, col, -1, basePosition=position, physicsClientId=cid)


def _ground(cid: int) -> int:
    """Static slab whose top face is the plane z = 0."""
    return _box(cid, [20.0, 20.0, 0.05], [0.0, 0.0, -0.05])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_channels": 0}, "LidarConfig.num_channels must be an int >= 1, got 0"),
        ({"vertical_fov_deg": (10.0, -10.0)}, "LidarConfig.vertical_fov_deg"),
        ({"horizontal_resolution_deg": 0.0}, "LidarConfig.horizontal_resolution_deg must be > 0, got 0.0"),
        ({"horizontal_fov_deg": 400.0}, "LidarConfig.horizontal_fov_deg"),
        ({"min_range_m": 6.0}, "LidarConfig.max_range_m must be > min_range_m"),
        ({"rate_hz": 0.0}, "LidarConfig.rate_hz must be > 0, got 0.0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LidarConfig(**kwargs)


def test_beam_layout() -> None:
    cfg = LidarConfig()
    np.testing.assert_allclose(np.degrees(cfg.elevations_rad()), np.linspace(-15, 15, 16))
    az = np.degrees(cfg.azimuths_rad())
    assert az.shape == (360,) and az[0] == pytest.approx(-180.0) and az[-1] == pytest.approx(179.0)
    partial = np.degrees(LidarConfig(horizontal_fov_deg=90.0, horizontal_resolution_deg=2.0).azimuths_rad())
    np.testing.assert_allclose(partial, np.arange(-45.0, 45.1, 2.0))


def test_ground_plane_ranges_and_points(client: int) -> None:
    _ground(client)
    height = 0.6
    lidar = Lidar(LidarConfig(), client)
    scan = lidar.scan([0.3, -0.2, height], IDENTITY)
    el = scan.elevation_rad.astype(np.float64)
    assert scan.ranges.shape == (16, 360) and scan.ranges.dtype == np.float32

    with np.errstate(divide="ignore"):
        expected = np.where(el < 0.0, height / np.sin(-el), np.inf)  # (16,)
    expected[expected > 5.0] = np.inf  # shallow beams reach the ground beyond max range
    assert np.isfinite(expected).sum() == 5  # -15 .. -7 deg
    np.testing.assert_allclose(scan.ranges, np.broadcast_to(expected[:, None], (16, 360)), atol=1e-3)

    # Points exist exactly for the returns and lie on the plane.
    hit_rings = np.flatnonzero(np.isfinite(expected))
    assert scan.points.shape == (hit_rings.size * 360, 3) and scan.points.dtype == np.float32
    np.testing.assert_allclose(scan.points[:, 2], -height, atol=1e-3)
    np.testing.assert_array_equal(np.unique(scan.ring), hit_rings)
    assert scan.ring.dtype == np.uint16


def test_wall_range_with_rotated_sensor(client: int) -> None:
    distance = 1.7
    _box(client, [0.05, 5.0, 5.0], [distance + 0.05, 0.0, 0.0])  # face at x = distance
    cfg = LidarConfig(num_channels=3, vertical_fov_deg=(-10.0, 10.0))
    lidar = Lidar(cfg, client)
    # Yaw +90 deg: sensor x = world y, sensor y = world -x, so the wall (+x)
    # is at azimuth -90 deg in the sensor frame.
    quat = p.getQuaternionFromEuler([0.0, 0.0, np.pi / 2])
    scan = lidar.scan([0.0, 0.0, 0.0], quat)
    az = scan.azimuth_rad.astype(np.float64)
    col = int(np.argmin(np.abs(az + np.pi / 2)))
    assert scan.ranges[1, col] == pytest.approx(distance, abs=1e-3)  # horizontal channel
    # Off-axis beams of the horizontal channel: distance / cos(offset).
    for offset_deg in (-30.0, 20.0, 45.0):
        c = int(np.argmin(np.abs(az + np.pi / 2 - np.radians(offset_deg))))
        expected = distance / np.cos(az[c] + np.pi / 2)
        assert scan.ranges[1, c] == pytest.approx(expected, abs=1e-3)
    # Tilted channels: distance / (cos(elevation) cos(offset)).
    assert scan.ranges[0, col] == pytest.approx(distance / np.cos(np.radians(10.0)), abs=1e-3)
    # Points of the wall lie on x_world = distance.
    world = scan.points.astype(np.float64) @ quat_to_matrix(quat).T
    np.testing.assert_allclose(world[:, 0], distance, atol=1e-3)


def test_range_limits(client: int) -> None:
    _box(client, [0.01, 5.0, 5.0], [0.03, 0.0, 0.0])  # face at 2 cm ahead: blind zone
    _box(client, [0.05, 5.0, 5.0], [-6.0, 0.0, 0.0])  # 5.95 m behind: beyond max range
    cfg = LidarConfig(num_channels=1, vertical_fov_deg=(0.0, 0.0), horizontal_fov_deg=20.0)
    lidar = Lidar(cfg, client)
    for yaw in (0.0, np.pi):
        scan = lidar.scan([0.0, 0.0, 0.0], p.getQuaternionFromEuler([0.0, 0.0, yaw]))
        assert np.isinf(scan.ranges).all()
        assert scan.points.shape == (0, 3) and scan.ring.shape == (0,)


def test_ignored_bodies_are_transparent(client: int) -> None:
    distance = 2.0
    _box(client, [0.05, 5.0, 5.0], [distance + 0.05, 0.0, 0.0])
    # A "robot" of two overlapping blocks right in front of the sensor.
    robot_a = _box(client, [0.1, 0.3, 0.3], [0.3, 0.0, 0.0])
    robot_b = _box(client, [0.1, 0.3, 0.3], [0.45, 0.35, 0.0])  # overlaps a, covers y > 0.05
    cfg = LidarConfig(num_channels=1, vertical_fov_deg=(0.0, 0.0), horizontal_fov_deg=40.0)
    lidar = Lidar(cfg, client)
    expected = distance / np.cos(cfg.azimuths_rad())

    blocked = lidar.scan([0.0, 0.0, 0.0], IDENTITY)
    assert (blocked.ranges[0] < 0.5).all()
    clear = lidar.scan([0.0, 0.0, 0.0], IDENTITY, ignore_body_ids=[robot_a, robot_b])
    np.testing.assert_allclose(clear.ranges[0], expected, atol=1e-3)
    # Ignoring only a: beams that cross b's lower face y = 0.05 before its back
    # face x = 0.55 stop on b, the others reach the wall.
    half = lidar.scan([0.0, 0.0, 0.0], IDENTITY, ignore_body_ids=[robot_a])
    slope = np.tan(cfg.azimuths_rad())
    on_b, past_b = slope > 0.05 / 0.55 + 0.01, slope < 0.05 / 0.55 - 0.01
    assert on_b.any() and past_b.any()
    assert (half.ranges[0, on_b] < 0.6).all()
    np.testing.assert_allclose(half.ranges[0, past_b], expected[past_b], atol=1e-3)


def test_scan_larger_than_one_ray_batch(client: int) -> None:
    _ground(client)
    cfg = LidarConfig(num_channels=32, vertical_fov_deg=(-30.0, -5.0), horizontal_resolution_deg=0.5)
    assert cfg.num_channels * 720 > p.MAX_RAY_INTERSECTION_BATCH_SIZE
    scan = Lidar(cfg, client).scan([0.0, 0.0, 0.3], IDENTITY)
    expected = 0.3 / np.sin(-cfg.elevations_rad())
    np.testing.assert_allclose(scan.ranges, np.broadcast_to(expected[:, None], (32, 720)), atol=1e-3)
