"""Event camera simulated from rendered frames with the ESIM model.

Reconstructs the event generation of ESIM (H. Rebecq, D. Gehrig, D. Scaramuzza,
"ESIM: an Open Event Camera Simulator", CoRL 2018) for a stream of frames:

* each pixel keeps a reference log intensity, the level at which it last
  fired (initially the first frame's log intensity);
* between two consecutive frames at t0 < t1 the log intensity of every pixel
  is interpolated linearly in time;
* every crossing of reference + k * C+ (brightening) or reference - k * C-
  (darkening) emits one event with polarity +1 / -1, stamped at the
  interpolated crossing time, and moves the reference to the crossed level, so
  one interval can emit several events per pixel;
* an event closer than ``refractory_period_s`` to the previous *emitted* event
  of its pixel is dropped (the reference still moves, as in ESIM).

Log intensity is ln(I + log_eps) with I in [0, 1]; colour frames are reduced
to BT.601 luma. Threshold noise is a per-pixel Gaussian mismatch of C+ and C-
(fixed pattern, drawn from ``seed`` at reset and clipped to >= 0.01) rather
than ESIM's per-crossing resampling: with fixed thresholds the number of
crossings per interval has a closed form, which keeps the update vectorised.

Why not ``evlib``: its streaming ``ESIMSimulator.process_frame`` needs torch,
stamps every event with the frame time instead of the interpolated crossing
time, applies the refractory period per frame rather than per event, has no
threshold noise, and the package pulls in polars, pyarrow, pandera and h5py.
This module needs numpy only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from sim.sensors.camera import CameraConfig

logger = logging.getLogger(__name__)

# Lower bound for a noisy per-pixel threshold; a threshold near zero would
# make a pixel fire on every tiny change.
MIN_CONTRAST_THRESHOLD = 0.01
# BT.601 luma weights for R, G, B.
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class EventCameraConfig:
    """Sensor size (pixels), contrast thresholds (log-intensity units), noise,
    refractory period (s), and the rate / field of view used to render the
    frames that drive the simulator."""

    width: int = 64
    height: int = 64
    contrast_threshold_pos: float = 0.2
    contrast_threshold_neg: float = 0.2
    threshold_sigma: float = 0.0
    refractory_period_s: float = 0.0
    log_eps: float = 1e-3
    render_rate_hz: float = 200.0
    fov_y_deg: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "height", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"EventCameraConfig.{name} must be an int, got {value!r}")
        for name in ("width", "height"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EventCameraConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("contrast_threshold_pos", "contrast_threshold_neg", "log_eps", "render_rate_hz"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"EventCameraConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("threshold_sigma", "refractory_period_s"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"EventCameraConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.fov_y_deg < 180.0:
            raise ValueError(
                f"EventCameraConfig.fov_y_deg must be in (0, 180), got {self.fov_y_deg}"
            )

    def render_camera_config(self) -> CameraConfig:
        """Config of the camera whose frames feed the simulator."""
        return CameraConfig(
            width=self.width,
            height=self.height,
            fov_y_deg=self.fov_y_deg,
            rate_hz=self.render_rate_hz,
        )


@dataclass
class EventPacket:
    """Events of one update, sorted by time; arrays share the length N."""

    x: NDArray[np.uint16]  # (N,) column
    y: NDArray[np.uint16]  # (N,) row
    t_s: NDArray[np.float64]  # (N,) seconds, same clock as update()'s t_s
    polarity: NDArray[np.int8]  # (N,) +1 brighter, -1 darker
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.t_s.shape[0])

    @classmethod
    def empty(cls, width: int, height: int) -> EventPacket:
        return cls(
            x=np.zeros(0, np.uint16),
            y=np.zeros(0, np.uint16),
            t_s=np.zeros(0, np.float64),
            polarity=np.zeros(0, np.int8),
            width=width,
            height=height,
        )


class EventCameraSimulator:
    """Stateful ESIM event generator fed one frame at a time."""

    def __init__(self, cfg: EventCameraConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        """Forget the reference image; the next update() only initialises."""
        cfg = self.cfg
        shape = (cfg.height, cfg.width)
        rng = np.random.default_rng(cfg.seed)
        # (H, W) per-pixel thresholds in log-intensity units.
        self._c_pos = np.maximum(
            cfg.contrast_threshold_pos + cfg.threshold_sigma * rng.standard_normal(shape),
            MIN_CONTRAST_THRESHOLD,
        )
        self._c_neg = np.maximum(
            cfg.contrast_threshold_neg + cfg.threshold_sigma * rng.standard_normal(shape),
            MIN_CONTRAST_THRESHOLD,
        )
        self._ref_log: NDArray[np.float64] | None = None  # (H, W) level of the last crossing
        self._prev_log: NDArray[np.float64] | None = None  # (H, W) previous frame
        self._prev_t = -np.inf
        # (H * W,) time of each pixel's last emitted event, s; flat like the
        # pixel indices used in _emit.
        self._last_event_t = np.full(cfg.height * cfg.width, -np.inf)

    def update(self, image: NDArray, t_s: float) -> EventPacket:
        """Feed the frame rendered at ``t_s`` seconds; returns the events since
        the previous frame.

        ``image``: (H, W) float intensity in [0, 1], or uint8 (H, W) / (H, W, 3).
        """
        cfg = self.cfg
        log_now = np.log(self._luminance(image) + cfg.log_eps)
        t_now = float(t_s)
        if self._ref_log is None or self._prev_log is None:
            self._ref_log = log_now.copy()
            self._prev_log = log_now
            self._prev_t = t_now
            return EventPacket.empty(cfg.width, cfg.height)
        if not t_now > self._prev_t:
            raise ValueError(
                f"EventCameraSimulator.update: t_s must increase, got {t_now} after {self._prev_t}"
            )

        log_prev, ref = self._prev_log, self._ref_log
        change = log_now - log_prev
        rising = change > 0.0
        # Between two frames a pixel only moves one way. The reference always
        # lies within one threshold of the previous frame (ref - C- < L0 < ref + C+),
        # so the crossings are ref + k*C+ (k = 1..n) up to L1 when rising and
        # ref - k*C- down to L1 when falling.
        step = np.where(rising, self._c_pos, -self._c_neg)  # signed level spacing
        count = np.floor((log_now - ref) / step).astype(np.int64)
        count = np.where(change != 0.0, np.maximum(count, 0), 0)

        pix = np.flatnonzero(count)  # flat indices of pixels that fire
        packet = self._emit(
            pix,
            count.ravel()[pix],
            ref.ravel()[pix],
            step.ravel()[pix],
            log_prev.ravel()[pix],
            change.ravel()[pix],
            t_now,
        )
        self._ref_log = ref + count * step
        self._prev_log = log_now
        self._prev_t = t_now
        return packet

    def _emit(
        self,
        pix: NDArray[np.int64],
        count: NDArray[np.int64],
        ref: NDArray[np.float64],
        step: NDArray[np.float64],
        log_prev: NDArray[np.float64],
        change: NDArray[np.float64],
        t_now: float,
    ) -> EventPacket:
        """Events for the firing pixels ``pix`` (flat indices, all arrays (P,))."""
        cfg = self.cfg
        t0 = self._prev_t
        dt = t_now - t0
        last_t = self._last_event_t
        chunks_pix: list[NDArray[np.int64]] = []
        chunks_t: list[NDArray[np.float64]] = []
        chunks_pol: list[NDArray[np.int8]] = []
        # The k-th crossings of all pixels are handled together; the loop runs
        # over crossing index (the most events one pixel emits in this interval),
        # never over pixels. The refractory test needs the pixel's previous
        # emitted event, which may be the (k-1)-th crossing of this interval.
        for k in range(1, int(count.max(initial=0)) + 1):
            sel = np.flatnonzero(count >= k)
            frac = (ref[sel] + k * step[sel] - log_prev[sel]) / change[sel]
            t_k = t0 + frac * dt
            keep = t_k - last_t[pix[sel]] >= cfg.refractory_period_s
            if not np.all(keep):
                logger.debug("refractory period dropped %d events", keep.size - keep.sum())
            kept_pix = pix[sel[keep]]
            last_t[kept_pix] = t_k[keep]
            chunks_pix.append(kept_pix)
            chunks_t.append(t_k[keep])
            chunks_pol.append(np.where(step[sel[keep]] > 0.0, 1, -1).astype(np.int8))
        if not chunks_pix:
            return EventPacket.empty(cfg.width, cfg.height)

        t = np.concatenate(chunks_t)
        order = np.argsort(t, kind="stable")
        flat = np.concatenate(chunks_pix)[order]
        return EventPacket(
            x=(flat % cfg.width).astype(np.uint16),
            y=(flat // cfg.width).astype(np.uint16),
            t_s=t[order],
            polarity=np.concatenate(chunks_pol)[order],
            width=cfg.width,
            height=cfg.height,
        )

    def _luminance(self, image: NDArray) -> NDArray[np.float64]:
        """(H, W) intensity in [0, 1] from a supported image, validated."""
        cfg = self.cfg
        img = np.asarray(image)
        expected = (cfg.height, cfg.width)
        if img.shape[:2] != expected or img.ndim not in (2, 3) or (
            img.ndim == 3 and img.shape[2] != 3
        ):
            raise ValueError(
                f"EventCameraSimulator: image must be {expected} or {expected + (3,)},"
                f" got shape {img.shape}"
            )
        if img.dtype == np.uint8:
            value = img.astype(np.float64) / 255.0
            return value @ _LUMA if img.ndim == 3 else value
        if img.ndim == 3:
            raise ValueError(f"EventCameraSimulator: colour images must be uint8, got {img.dtype}")
        value = img.astype(np.float64)
        if not (np.all(np.isfinite(value)) and value.min() >= 0.0 and value.max() <= 1.0):
            raise ValueError(
                "EventCameraSimulator: float intensities must be finite and in [0, 1],"
                f" got range [{value.min()}, {value.max()}]"
            )
        return value
