"""ESIM event camera on synthetic frames with known log-intensity changes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.sensors.event_camera import EventCameraConfig, EventCameraSimulator, EventPacket

LOG_EPS = 1e-3


def _log(i: float) -> float:
    return math.log(i + LOG_EPS)


def _run(sim: EventCameraSimulator, frames, times) -> EventPacket:
    packets = [sim.update(f, t) for f, t in zip(frames, times)]
    assert len(packets[0]) == 0  # the first frame only initialises
    for pk in packets:
        assert np.all(np.diff(pk.t_s) >= 0.0)
    return EventPacket(
        x=np.concatenate([pk.x for pk in packets]),
        y=np.concatenate([pk.y for pk in packets]),
        t_s=np.concatenate([pk.t_s for pk in packets]),
        polarity=np.concatenate([pk.polarity for pk in packets]),
        width=sim.cfg.width,
        height=sim.cfg.height,
    )


def _edge_frame(width: int, height: int, edge_px: float, left: float, right: float) -> np.ndarray:
    """(H, W) step edge at column coordinate ``edge_px``, area-sampled per pixel."""
    cover = np.clip(edge_px - np.arange(width), 0.0, 1.0)  # share of each pixel left of the edge
    row = right + (left - right) * cover
    return np.tile(row, (height, 1))


@pytest.mark.parametrize(
    ("left", "right", "polarity"), [(0.8, 0.2, 1), (0.2, 0.8, -1)], ids=["brighter", "darker"]
)
def test_moving_edge(left: float, right: float, polarity: int) -> None:
    cfg = EventCameraConfig(width=48, height=3, contrast_threshold_pos=0.2, contrast_threshold_neg=0.3)
    sim = EventCameraSimulator(cfg)
    speed, start, stop = 100.0, 10.0, 40.0  # px/s, edge columns
    frame_dt = 1.0 / cfg.render_rate_hz  # 0.5 px of motion per frame
    times = np.arange(0.0, (stop - start) / speed + frame_dt / 2, frame_dt)
    frames = [_edge_frame(cfg.width, cfg.height, start + speed * t, left, right) for t in times]
    ev = _run(sim, frames, times)

    assert ev.x.dtype == np.uint16 and ev.y.dtype == np.uint16
    assert ev.t_s.dtype == np.float64 and ev.polarity.dtype == np.int8
    assert set(np.unique(ev.polarity)) == {polarity}
    columns = np.unique(ev.x)
    np.testing.assert_array_equal(columns, np.arange(int(start), int(stop)))

    # Every crossed pixel fires once per threshold in the total log contrast.
    threshold = cfg.contrast_threshold_pos if polarity > 0 else cfg.contrast_threshold_neg
    expected_count = math.floor(abs(_log(left) - _log(right)) / threshold)
    counts = np.zeros((cfg.height, cfg.width), int)
    np.add.at(counts, (ev.y, ev.x), 1)
    assert expected_count in (6, 4)
    assert (counts[:, columns] == expected_count).all()

    # The edge covers half of column c at t = (c + 0.5 - start) / speed.
    mean_t = np.array([ev.t_s[ev.x == c].mean() for c in columns])
    crossing_t = (columns + 0.5 - start) / speed
    assert np.all(np.abs(mean_t - crossing_t) <= frame_dt)
    assert np.all(np.diff(mean_t) > 0.0)


def test_static_scene_emits_nothing() -> None:
    cfg = EventCameraConfig(width=16, height=12, threshold_sigma=0.05)
    sim = EventCameraSimulator(cfg)
    image = np.random.default_rng(1).uniform(0.0, 1.0, (12, 16))
    for k in range(10):
        assert len(sim.update(image, 0.005 * k)) == 0


def test_several_crossings_in_one_interval_are_interpolated() -> None:
    cfg = EventCameraConfig(width=2, height=1, contrast_threshold_pos=0.25)
    sim = EventCameraSimulator(cfg)
    sim.update(np.array([[0.1, 0.1]]), 1.0)
    ev = sim.update(np.array([[0.1, 0.9]]), 1.01)
    change = _log(0.9) - _log(0.1)
    n = math.floor(change / 0.25)
    assert len(ev) == n == 8
    assert (ev.x == 1).all() and (ev.y == 0).all() and (ev.polarity == 1).all()
    np.testing.assert_allclose(ev.t_s, 1.0 + 0.01 * 0.25 * np.arange(1, n + 1) / change, rtol=0, atol=1e-12)


def test_sub_threshold_changes_accumulate_against_the_reference() -> None:
    cfg = EventCameraConfig(width=1, height=1, contrast_threshold_pos=0.2)
    sim = EventCameraSimulator(cfg)
    # Log intensity rises by 0.15 per frame: no event after one frame, the
    # 0.2 crossing a third of the way into the second interval.
    levels = [_log(0.3) + 0.15 * k for k in range(3)]
    images = [np.array([[math.exp(lv) - LOG_EPS]]) for lv in levels]
    assert len(sim.update(images[0], 0.0)) == 0
    assert len(sim.update(images[1], 0.1)) == 0
    ev = sim.update(images[2], 0.2)
    assert len(ev) == 1
    assert ev.t_s[0] == pytest.approx(0.1 + 0.1 * (0.2 - 0.15) / 0.15, abs=1e-9)


def _greedy_refractory(times: np.ndarray, period: float) -> np.ndarray:
    kept: list[float] = []
    for t in times:
        if not kept or t - kept[-1] >= period:
            kept.append(t)
    return np.array(kept)


def test_refractory_period_drops_close_events() -> None:
    images = [np.array([[0.01]]), np.array([[0.2]]), np.array([[1.0]])]
    times = [0.0, 0.004, 0.01]
    free = _run(EventCameraSimulator(EventCameraConfig(width=1, height=1)), images, times)
    assert len(free) == math.floor((_log(1.0) - _log(0.01)) / 0.2) == 22

    period = 1e-3
    cfg = EventCameraConfig(width=1, height=1, refractory_period_s=period)
    limited = _run(EventCameraSimulator(cfg), images, times)
    assert np.all(np.diff(limited.t_s) >= period - 1e-12)
    # Same crossings, thinned exactly as a per-event refractory filter would,
    # including across the frame boundary at 4 ms.
    np.testing.assert_allclose(limited.t_s, _greedy_refractory(free.t_s, period), atol=1e-12)
    assert 5 < len(limited) < len(free)


def test_threshold_noise_is_seeded_per_pixel() -> None:
    def events(seed: int) -> EventPacket:
        cfg = EventCameraConfig(width=16, height=16, threshold_sigma=0.05, seed=seed)
        sim = EventCameraSimulator(cfg)
        return _run(sim, [np.full((16, 16), 0.1), np.full((16, 16), 0.9)], [0.0, 0.01])

    a, b, c = events(3), events(3), events(4)
    np.testing.assert_array_equal(a.t_s, b.t_s)
    np.testing.assert_array_equal(a.x, b.x)
    assert len(a) != len(c) or not np.array_equal(a.t_s, c.t_s)
    counts = np.bincount(a.y.astype(int) * 16 + a.x, minlength=256)
    assert len(np.unique(counts)) > 1  # equal change, unequal thresholds


def test_reset_restarts_from_the_next_frame() -> None:
    sim = EventCameraSimulator(EventCameraConfig(width=4, height=4))
    sim.update(np.zeros((4, 4)), 0.0)
    assert len(sim.update(np.ones((4, 4)), 0.01)) > 0
    sim.reset()
    assert len(sim.update(np.zeros((4, 4)), 0.0)) == 0  # earlier time is fine after reset
    assert len(sim.update(np.zeros((4, 4)), 0.01)) == 0


def test_rgb_input_uses_luma() -> None:
    cfg = EventCameraConfig(width=4, height=2)
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[..., 1] = 200
    gray = np.full((2, 4), 0.587 * 200 / 255)
    dark = np.full((2, 4), 0.05)
    a, b = EventCameraSimulator(cfg), EventCameraSimulator(cfg)
    a.update(dark, 0.0)
    b.update(dark, 0.0)
    ev_rgb, ev_gray = a.update(rgb, 0.01), b.update(gray, 0.01)
    assert len(ev_rgb) > 0
    np.testing.assert_allclose(ev_rgb.t_s, ev_gray.t_s)


def test_input_validation() -> None:
    sim = EventCameraSimulator(EventCameraConfig(width=4, height=3))
    with pytest.raises(ValueError, match="image must be"):
        sim.update(np.zeros((4, 3)), 0.0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        sim.update(np.full((3, 4), 1.5), 0.0)
    sim.update(np.zeros((3, 4)), 0.0)
    with pytest.raises(ValueError, match="t_s must increase"):
        sim.update(np.zeros((3, 4)), 0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "EventCameraConfig.width must be > 0, got 0"),
        ({"contrast_threshold_neg": -0.1}, "EventCameraConfig.contrast_threshold_neg must be > 0, got -0.1"),
        ({"threshold_sigma": -1.0}, "EventCameraConfig.threshold_sigma must be >= 0, got -1.0"),
        ({"refractory_period_s": -1e-3}, "EventCameraConfig.refractory_period_s must be >= 0"),
        ({"log_eps": 0.0}, "EventCameraConfig.log_eps must be > 0, got 0.0"),
        ({"render_rate_hz": 0.0}, "EventCameraConfig.render_rate_hz must be > 0"),
        ({"fov_y_deg": 0.0}, "EventCameraConfig.fov_y_deg"),
        ({"seed": 1.5}, "EventCameraConfig.seed must be an int, got 1.5"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EventCameraConfig(**kwargs)


def test_render_camera_config_matches_sensor() -> None:
    cam = EventCameraConfig(width=32, height=24, fov_y_deg=50.0, render_rate_hz=400.0).render_camera_config()
    assert (cam.width, cam.height, cam.fov_y_deg, cam.rate_hz) == (32, 24, 50.0, 400.0)
