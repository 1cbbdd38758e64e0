"""Pinhole RGB / depth / segmentation camera rendered with pybullet's TinyRenderer.

The camera pose is the pose of its ROS *optical* frame in the world (z forward,
x right, y down). pybullet renders through an OpenGL-style camera (x right,
y up, z backward), so the view matrix is built from the optical pose rotated by
diag(1, -1, -1). The depth image is the OpenGL z-buffer linearised back to
metric depth along the optical axis.

Pixel convention (ROS CameraInfo / OpenCV): pixel (u, v) = (column, row) has its
centre at the integer image coordinates (u, v). Measured against rendered masks,
TinyRenderer samples column i at x = i but row r at y = r + 1 for a projection
centred at (w/2, h/2): its vertical flip is one row off. The projection matrix
is therefore shifted by one pixel vertically, after which the image obeys
``intrinsics(cfg)`` exactly (fx = fy = (h/2) / tan(fov_y/2), cx = w/2, cy = h/2),
to within TinyRenderer's ~0.2 px rasterisation slack; tests/sim/sensors checks it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pybullet as p
from numpy.typing import ArrayLike, NDArray

from sim.sensors._geometry import as_position, matrix_to_quat, quat_to_matrix

logger = logging.getLogger(__name__)

# OpenGL camera axes expressed in the optical frame: same x, flipped y and z.
_OPTICAL_TO_GL = np.diag([1.0, -1.0, -1.0])


@dataclass(frozen=True)
class CameraConfig:
    """Image size in pixels, vertical field of view, clip planes in metres and
    the rate at which the driving node renders frames."""

    width: int = 128
    height: int = 128
    fov_y_deg: float = 60.0
    near_m: float = 0.02
    far_m: float = 3.0
    rate_hz: float = 10.0

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"CameraConfig.{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"CameraConfig.{name} must be > 0, got {value}")
        if not 0.0 < self.fov_y_deg < 180.0:
            raise ValueError(f"CameraConfig.fov_y_deg must be in (0, 180), got {self.fov_y_deg}")
        if not self.near_m > 0.0:
            raise ValueError(f"CameraConfig.near_m must be > 0, got {self.near_m}")
        if not self.far_m > self.near_m:
            raise ValueError(
                f"CameraConfig.far_m must be > near_m ({self.near_m}), got {self.far_m}"
            )
        if not self.rate_hz > 0.0:
            raise ValueError(f"CameraConfig.rate_hz must be > 0, got {self.rate_hz}")


@dataclass
class CameraFrame:
    """One rendered frame; all images are row-major (row = v, column = u)."""

    rgb: NDArray[np.uint8]  # (H, W, 3)
    depth_m: NDArray[np.float32]  # (H, W) depth along optical z; inf where nothing was hit
    segmentation: NDArray[np.int32]  # (H, W) pybullet body unique id, -1 for background
    K: NDArray[np.float64]  # (3, 3) intrinsics


def intrinsics(cfg: CameraConfig) -> NDArray[np.float64]:
    """(3, 3) pinhole matrix matching pybullet's projection for ``cfg``.

    Square pixels: pybullet's projection uses aspect = w / h, so fx = fy.
    """
    f = (cfg.height / 2.0) / math.tan(math.radians(cfg.fov_y_deg) / 2.0)
    return np.array(
        [[f, 0.0, cfg.width / 2.0], [0.0, f, cfg.height / 2.0], [0.0, 0.0, 1.0]]
    )


def look_at(
    eye: ArrayLike, target: ArrayLike, up: ArrayLike = (0.0, 0.0, 1.0)
) -> NDArray[np.float64]:
    """Quaternion (x, y, z, w) of an optical frame at ``eye`` looking at ``target``.

    The image "up" direction (-y of the optical frame) is as close to ``up`` as
    possible; raises ValueError when the viewing direction is parallel to ``up``.
    """
    eye_w = as_position(eye, "eye")
    target_w = as_position(target, "target")
    up_w = as_position(up, "up")
    z = target_w - eye_w
    if np.linalg.norm(z) < 1e-9:
        raise ValueError(f"look_at: eye and target coincide at {eye_w.tolist()}")
    z /= np.linalg.norm(z)
    x = np.cross(z, up_w)
    if np.linalg.norm(x) < 1e-6:
        raise ValueError(f"look_at: viewing direction {z.tolist()} is parallel to up {up_w.tolist()}")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return matrix_to_quat(np.column_stack([x, y, z]))


class Camera:
    """Renders RGB, metric depth and body-id segmentation from one pybullet client."""

    def __init__(self, cfg: CameraConfig, client_id: int) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.K = intrinsics(cfg)
        # The projection only depends on the config, so it is computed once.
        projection = list(
            p.computeProjectionMatrixFOV(
                fov=cfg.fov_y_deg,
                aspect=cfg.width / cfg.height,
                nearVal=cfg.near_m,
                farVal=cfg.far_m,
                physicsClientId=client_id,
            )
        )
        # Column-major element (row 1, col 2) offsets y_ndc by a constant; 2/h
        # in NDC is one pixel, which cancels TinyRenderer's off-by-one row
        # (see the module docstring) so that cy = h/2 holds.
        projection[2 * 4 + 1] += 2.0 / cfg.height
        self._projection = projection
        logger.debug("camera %dx%d on client %d, K=%s", cfg.width, cfg.height, client_id, self.K.tolist())

    def view_matrix(self, position: ArrayLike, quaternion: ArrayLike) -> list[float]:
        """Column-major OpenGL view matrix (16 floats) for an optical-frame pose."""
        t = as_position(position)
        r_gl = quat_to_matrix(quaternion) @ _OPTICAL_TO_GL  # world <- GL camera
        view = np.eye(4)
        view[:3, :3] = r_gl.T
        view[:3, 3] = -r_gl.T @ t
        return view.flatten(order="F").tolist()

    def render(self, position: ArrayLike, quaternion: ArrayLike) -> CameraFrame:
        """Render from the optical-frame pose (position (3,) m, quaternion (4,) xyzw)."""
        cfg = self.cfg
        _, _, rgba, zbuf, seg = p.getCameraImage(
            width=cfg.width,
            height=cfg.height,
            viewMatrix=self.view_matrix(position, quaternion),
            projectionMatrix=self._projection,
            renderer=p.ER_TINY_RENDERER,
            physicsClientId=self.client_id,
        )
        # pybullet returns numpy arrays when built with numpy, nested lists otherwise.
        rgba = np.asarray(rgba, dtype=np.uint8).reshape(cfg.height, cfg.width, 4)
        zbuf = np.asarray(zbuf, dtype=np.float64).reshape(cfg.height, cfg.width)
        seg = np.asarray(seg, dtype=np.int32).reshape(cfg.height, cfg.width)

        # Invert the perspective z-buffer mapping z_ndc = 2 d - 1 of the
        # OpenGL projection to get eye-space depth along the optical axis.
        near, far = cfg.near_m, cfg.far_m
        depth = far * near / (far - (far - near) * zbuf)
        # TinyRenderer clears the z-buffer to just below 1.0, so "nothing drawn"
        # is read from the segmentation rather than from the depth value.
        depth[seg < 0] = np.inf
        return CameraFrame(
            rgb=np.ascontiguousarray(rgba[:, :, :3]),
            depth_m=depth.astype(np.float32),
            segmentation=seg,
            K=self.K.copy(),
        )
