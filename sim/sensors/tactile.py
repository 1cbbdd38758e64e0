"""Taxel-array tactile pads driven by pybullet contact normal forces.

A pad is a rectangle on a robot link, given in the link (URDF) frame by its
centre, its outward normal n and an in-plane axis u; v = n x u completes a
right-handed pad frame. Taxel (r, c) sits at u = (c + 1/2) / cols * size_u -
size_u / 2 and v = (r + 1/2) / rows * size_v - size_v / 2, so columns run
along u and rows along v. Each contact on the pad spreads its normal force over
the taxels with a Gaussian of width ``sigma_m`` normalised to sum to one, so a
reading sums to the total normal force on the pad.

Franka Panda finger pads, derived from pybullet_data's franka_panda/panda.urdf
and meshes/collision/finger.obj (checked by ray casting the loaded model):

* the finger link frames are parallel to panda_hand; the prismatic joints move
  the left finger along +y and the right finger along -y when opening;
* finger.obj spans x in [-10.5, 10.5] mm, y in [0, 26.4] mm, z in [0, 53.8] mm.
  Its face at y = 0 is the gripping surface: slanted 2.5 mm over z in
  [0, 36] mm and flat for z in [36, 54] mm, x within about +-9 mm. The right
  finger's collision shape is the same mesh turned by pi about z;
* hence pad centre (0, 0, 0.045) m in both finger frames, 18 x 18 mm; the
  left pad faces -y, the right pad +y. With u = +x (left) / -x (right), v is
  +z for both: rows run from the finger base (row 0) to the tip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pybullet as p
from numpy.typing import ArrayLike, NDArray

from sim.sensors._geometry import as_position, quat_to_matrix

logger = logging.getLogger(__name__)

# A contact counts for the pad when its point lies within this distance of the
# pad plane (pybullet reports points on the collision margin, ~1 mm out) ...
PAD_PLANE_TOLERANCE_M = 3e-3
# ... within the pad rectangle grown by this much on each side ...
PAD_EDGE_TOLERANCE_M = 1e-3
# ... and the force pushes into the pad to within 60 degrees of its normal.
MIN_NORMAL_ALIGNMENT = 0.5

PANDA_PAD_CENTER_LOCAL = (0.0, 0.0, 0.045)
PANDA_LEFT_PAD_NORMAL_LOCAL = (0.0, -1.0, 0.0)
PANDA_LEFT_PAD_U_LOCAL = (1.0, 0.0, 0.0)
PANDA_RIGHT_PAD_NORMAL_LOCAL = (0.0, 1.0, 0.0)
PANDA_RIGHT_PAD_U_LOCAL = (-1.0, 0.0, 0.0)


@dataclass(frozen=True)
class TactileConfig:
    """Taxel grid (rows along v, cols along u), pad size (u, v) in metres and
    the Gaussian spread of one contact in metres."""

    rows: int = 4
    cols: int = 4
    pad_size_m: tuple[float, float] = (0.018, 0.018)
    sigma_m: float = 0.003

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"TactileConfig.{name} must be an int >= 1, got {value!r}")
        size = self.pad_size_m
        if len(size) != 2 or not (size[0] > 0.0 and size[1] > 0.0):
            raise ValueError(f"TactileConfig.pad_size_m must be two values > 0, got {size!r}")
        if not self.sigma_m > 0.0:
            raise ValueError(f"TactileConfig.sigma_m must be > 0, got {self.sigma_m}")


def _unit(vector: ArrayLike, name: str) -> NDArray[np.float64]:
    v = as_position(vector, name)
    norm = np.linalg.norm(v)
    if norm < 1e-9:
        raise ValueError(f"TactileSensor.{name} must be non-zero, got {vector!r}")
    return v / norm


class TactileSensor:
    """Taxel grid on one link of one body in one pybullet client."""

    def __init__(
        self,
        cfg: TactileConfig,
        client_id: int,
        body_id: int,
        link_index: int,
        pad_center_local: ArrayLike,
        pad_normal_local: ArrayLike,
        pad_u_local: ArrayLike,
    ) -> None:
        if link_index < 0:
            raise ValueError(f"TactileSensor.link_index must be >= 0, got {link_index}")
        normal = _unit(pad_normal_local, "pad_normal_local")
        u = _unit(pad_u_local, "pad_u_local")
        if abs(float(normal @ u)) > 1e-3:
            raise ValueError(
                "TactileSensor.pad_u_local must be perpendicular to pad_normal_local,"
                f" got u={pad_u_local!r}, n={pad_normal_local!r}"
            )
        u = u - (normal @ u) * normal
        u /= np.linalg.norm(u)
        self.cfg = cfg
        self.client_id = client_id
        self.body_id = body_id
        self.link_index = link_index
        self.center_local = as_position(pad_center_local, "pad_center_local")
        # (3, 3) rows u, v, n: link-frame vector -> pad-frame coordinates.
        self.pad_axes_local = np.stack([u, np.cross(normal, u), normal])
        size_u, size_v = cfg.pad_size_m
        self._taxel_u = ((np.arange(cfg.cols) + 0.5) / cfg.cols - 0.5) * size_u  # (cols,) m
        self._taxel_v = ((np.arange(cfg.rows) + 0.5) / cfg.rows - 0.5) * size_v  # (rows,) m

    def read(self) -> NDArray[np.float32]:
        """(rows, cols) normal force per taxel in newtons, from the last step's contacts."""
        cfg = self.cfg
        grid = np.zeros((cfg.rows, cfg.cols))
        contacts = p.getContactPoints(
            bodyA=self.body_id, linkIndexA=self.link_index, physicsClientId=self.client_id
        )
        if not contacts:
            return grid.astype(np.float32)

        # Contact tuple fields used: 5 positionOnA, 7 contactNormalOnB (B -> A), 9 normalForce.
        pos_world = np.array([c[5] for c in contacts])  # (K, 3)
        normal_on_b = np.array([c[7] for c in contacts])  # (K, 3)
        force = np.array([c[9] for c in contacts])  # (K,) N
        state = p.getLinkState(
            self.body_id, self.link_index, computeForwardKinematics=True,
            physicsClientId=self.client_id,
        )
        link_pos, link_rot = np.asarray(state[4]), quat_to_matrix(state[5])  # URDF link frame
        to_pad = self.pad_axes_local @ link_rot.T  # world vector -> pad (u, v, n)
        local = (pos_world - link_pos) @ to_pad.T - self.pad_axes_local @ self.center_local
        # A force pressing on the pad pushes from B into A, against the pad normal.
        alignment = -(normal_on_b @ to_pad.T)[:, 2]
        half_u, half_v = (np.asarray(cfg.pad_size_m) / 2.0) + PAD_EDGE_TOLERANCE_M
        on_pad = (
            (np.abs(local[:, 0]) <= half_u)
            & (np.abs(local[:, 1]) <= half_v)
            & (np.abs(local[:, 2]) <= PAD_PLANE_TOLERANCE_M)
            & (alignment >= MIN_NORMAL_ALIGNMENT)
            & (force > 0.0)
        )
        if not np.all(on_pad):
            logger.debug("%d of %d contacts are off the pad", (~on_pad).sum(), on_pad.size)
        if not np.any(on_pad):
            return grid.astype(np.float32)

        cu = local[on_pad, 0][:, None, None]  # (K', 1, 1)
        cv = local[on_pad, 1][:, None, None]
        dist2 = (self._taxel_v[None, :, None] - cv) ** 2 + (self._taxel_u[None, None, :] - cu) ** 2
        # Offset by each contact's nearest taxel so the exponent cannot
        # underflow to all zeros when sigma is small against the taxel pitch.
        dist2 -= dist2.min(axis=(1, 2), keepdims=True)
        weight = np.exp(-dist2 / (2.0 * cfg.sigma_m**2))  # (K', rows, cols)
        weight /= weight.sum(axis=(1, 2), keepdims=True)
        grid = np.einsum("k,krc->rc", force[on_pad], weight)
        return grid.astype(np.float32)


def _link_index(client_id: int, body_id: int, link_name: str) -> int:
    for joint in range(p.getNumJoints(body_id, physicsClientId=client_id)):
        # Joint info field 12 is the child link name.
        if p.getJointInfo(body_id, joint, physicsClientId=client_id)[12].decode() == link_name:
            return joint
    raise ValueError(f"body {body_id} has no link named {link_name!r}")


def panda_finger_pads(
    client_id: int, robot_body_id: int, cfg: TactileConfig | None = None
) -> list[TactileSensor]:
    """[left, right] finger-pad sensors of a Panda loaded from pybullet_data's panda.urdf."""
    cfg = cfg or TactileConfig()
    left = TactileSensor(
        cfg,
        client_id,
        robot_body_id,
        _link_index(client_id, robot_body_id, "panda_leftfinger"),
        PANDA_PAD_CENTER_LOCAL,
        PANDA_LEFT_PAD_NORMAL_LOCAL,
        PANDA_LEFT_PAD_U_LOCAL,
    )
    right = TactileSensor(
        cfg,
        client_id,
        robot_body_id,
        _link_index(client_id, robot_body_id, "panda_rightfinger"),
        PANDA_PAD_CENTER_LOCAL,
        PANDA_RIGHT_PAD_NORMAL_LOCAL,
        PANDA_RIGHT_PAD_U_LOCAL,
    )
    return [left, right]
