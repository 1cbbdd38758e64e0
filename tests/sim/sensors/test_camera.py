"""Camera against known geometry: metric depth, K vs. rendered silhouettes, ids."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from sim.sensors._geometry import quat_to_matrix
from sim.sensors.camera import Camera, CameraConfig, intrinsics, look_at


@pytest.fixture
def client(request: pytest.FixtureRequest) -> int:
    cid = p.connect(p.DIRECT)
    request.addfinalizer(lambda: p.disconnect(cid))
    return cid


def _box(cid: int, half_extents, position, rgba=(0.8, 0.2, 0.2, 1.0)) -> int:
    col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half_extents, physicsClientId=cid)
    vis = p.createVisualShape(
        p.GEOM_BOX, halfExtents=half_extents, rgbaColor=rgba, physicsClientId=cid
    )
    return p.createMultiBody(0, col, vis, basePosition=position, physicsClientId=cid)


def _project(K: np.ndarray, eye: np.ndarray, quat: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 3) world points -> (N, 2) pixel coordinates (u, v)."""
    cam = (points - eye) @ quat_to_matrix(quat)  # rows: R^T (p - eye)
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:]


def _convex_hull(pts: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull (in u-right, v-down axes) of (N, 2) points, monotone chain."""
    pts = sorted(map(tuple, pts))

    def turn(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        out: list[tuple[float, float]] = []
        for q in seq:
            while len(out) >= 2 and turn(out[-2], out[-1], q) <= 0:
                out.pop()
            out.append(q)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _signed_distance_inside(hull: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(M, 2) points -> distance inside the convex polygon (negative outside)."""
    dist = np.full(len(uv), np.inf)
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        edge = b - a
        inward = np.array([-edge[1], edge[0]]) / np.linalg.norm(edge)
        dist = np.minimum(dist, (uv - a) @ inward)
    return dist


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": -3}, "CameraConfig.width must be > 0, got -3"),
        ({"height": 0}, "CameraConfig.height must be > 0, got 0"),
        ({"fov_y_deg": 180.0}, "CameraConfig.fov_y_deg"),
        ({"near_m": 0.0}, "CameraConfig.near_m must be > 0, got 0.0"),
        ({"far_m": 0.01}, "CameraConfig.far_m"),
        ({"rate_hz": -1.0}, "CameraConfig.rate_hz must be > 0, got -1.0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CameraConfig(**kwargs)


def test_intrinsics_formula() -> None:
    K = intrinsics(CameraConfig(width=160, height=120, fov_y_deg=90.0))
    np.testing.assert_allclose(K, [[60.0, 0.0, 80.0], [0.0, 60.0, 60.0], [0.0, 0.0, 1.0]])


def test_look_at_builds_optical_frame() -> None:
    eye, target = np.array([1.0, 0.5, 0.8]), np.array([0.2, -0.1, 0.0])
    rot = quat_to_matrix(look_at(eye, target))
    forward = (target - eye) / np.linalg.norm(target - eye)
    np.testing.assert_allclose(rot[:, 2], forward, atol=1e-12)
    assert abs(rot[2, 0]) < 1e-12  # image x stays horizontal
    assert rot[2, 1] < 0.0  # image y (down) points downwards in the world
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="parallel"):
        look_at([0, 0, 1], [0, 0, 0])


def test_depth_of_facing_plane_is_its_distance(client: int) -> None:
    height = 0.8
    _box(client, [2.0, 2.0, 0.01], [0.0, 0.0, -0.01])  # top face at z = 0
    cam = Camera(CameraConfig(width=64, height=48), client)
    eye = np.array([0.1, -0.2, height])
    frame = cam.render(eye, look_at(eye, eye - [0, 0, 1], up=(1, 0, 0)))
    assert frame.depth_m.shape == (48, 64) and frame.depth_m.dtype == np.float32
    # Depth is along the optical axis, so a fronto-parallel plane reads the
    # same distance in every pixel (its range would grow towards the corners).
    np.testing.assert_allclose(frame.depth_m, height, atol=3e-3)


def test_depth_of_oblique_plane_matches_pinhole_rays(client: int) -> None:
    _box(client, [20.0, 20.0, 0.01], [0.0, 0.0, -0.01])
    cfg = CameraConfig(width=64, height=48, far_m=5.0)
    cam = Camera(cfg, client)
    eye = np.array([0.0, 0.0, 1.0])
    quat = look_at(eye, [1.0, 0.3, 0.0])
    frame = cam.render(eye, quat)
    # Ray through each pixel centre (integer u, v) in the optical frame, z = 1,
    # so the ray parameter at the plane z = 0 is the depth along the axis.
    u, v = np.meshgrid(np.arange(cfg.width), np.arange(cfg.height))
    rays = np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(frame.K).T
    expected = -eye[2] / (rays @ quat_to_matrix(quat).T)[..., 2]
    near_enough = expected < 3.0  # far, grazing pixels have cm-per-pixel depth slopes
    assert near_enough.sum() > 0.5 * expected.size
    np.testing.assert_allclose(frame.depth_m[near_enough], expected[near_enough], atol=5e-3)


def test_box_corners_project_onto_mask_edges(client: int) -> None:
    half, centre = np.array([0.08, 0.12, 0.05]), np.array([0.9, 0.1, 0.3])
    box = _box(client, half, centre)
    cfg = CameraConfig(width=96, height=64)
    cam = Camera(cfg, client)
    eye = np.array([0.1, -0.3, 0.8])
    quat = look_at(eye, centre + [0.05, -0.02, 0.03])
    frame = cam.render(eye, quat)
    mask = frame.segmentation == box

    corners = centre + half * np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    uv = _project(frame.K, eye, quat, corners)
    hull = _convex_hull(uv)
    u, v = np.meshgrid(np.arange(cfg.width), np.arange(cfg.height))
    inside = _signed_distance_inside(hull, np.stack([u.ravel(), v.ravel()], axis=1)).reshape(mask.shape)
    # Pixel (u, v) is covered iff its integer centre lies inside the projected
    # outline. The 0.3 px slack is TinyRenderer's rasterisation; a half-pixel
    # convention error would show up as ~0.5-1 px violations here.
    assert mask[inside > 0.3].all()
    assert not mask[inside < -0.3].any()
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    np.testing.assert_allclose([cols[0], cols[-1]], [uv[:, 0].min(), uv[:, 0].max()], atol=1.0)
    np.testing.assert_allclose([rows[0], rows[-1]], [uv[:, 1].min(), uv[:, 1].max()], atol=1.0)


def test_segmentation_ids_and_colours_match_bodies(client: int) -> None:
    red = _box(client, [0.05, 0.05, 0.05], [1.0, 0.15, 0.0], rgba=(1.0, 0.0, 0.0, 1.0))
    blue = _box(client, [0.05, 0.05, 0.05], [1.0, -0.15, 0.0], rgba=(0.0, 0.0, 1.0, 1.0))
    cfg = CameraConfig(width=64, height=64)
    cam = Camera(cfg, client)
    eye, quat = np.zeros(3), look_at(np.zeros(3), [1.0, 0.0, 0.0])
    frame = cam.render(eye, quat)
    assert frame.segmentation.dtype == np.int32 and frame.rgb.dtype == np.uint8
    assert frame.rgb.shape == (64, 64, 3)
    assert set(np.unique(frame.segmentation)) == {-1, red, blue}
    assert np.isinf(frame.depth_m[frame.segmentation == -1]).all()
    for body, centre, channel in ((red, [0.95, 0.15, 0.0], 0), (blue, [0.95, -0.15, 0.0], 2)):
        u, v = np.round(_project(frame.K, eye, quat, np.array([centre]))[0]).astype(int)
        assert frame.segmentation[v, u] == body
        assert frame.depth_m[v, u] == pytest.approx(0.95, abs=3e-3)
        pixels = frame.rgb[frame.segmentation == body].astype(int)
        assert (pixels[:, channel] > pixels.sum(axis=1) - pixels[:, channel]).mean() > 0.9


def test_clients_render_their_own_world(client: int) -> None:
    other = p.connect(p.DIRECT)
    try:
        _box(other, [0.2, 0.2, 0.2], [1.0, 0.0, 0.0])
        cam = Camera(CameraConfig(width=32, height=32), client)
        frame = cam.render(np.zeros(3), look_at(np.zeros(3), [1.0, 0.0, 0.0]))
        assert (frame.segmentation == -1).all()
        cam_other = Camera(CameraConfig(width=32, height=32), other)
        frame_other = cam_other.render(np.zeros(3), look_at(np.zeros(3), [1.0, 0.0, 0.0]))
        assert (frame_other.segmentation == 0).any()
    finally:
        p.disconnect(other)
