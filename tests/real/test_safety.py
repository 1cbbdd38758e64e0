import numpy as np
import pytest

from real.safety import SafetyConfig, SafetyFilter, Verdict, Watchdog

NAMES = ("j1", "j2", "j3")


def make_filter(**kw):
    cfg = dict(
        joint_names=NAMES,
        position_lower=(-1.0, -1.0, 0.0),
        position_upper=(1.0, 1.0, 0.04),
        velocity_limit=(1.0, 2.0, 0.1),
    )
    cfg.update(kw)
    return SafetyFilter(SafetyConfig(**cfg))


def test_in_limits_trajectory_passes_unchanged():
    f = make_filter()
    q = np.array([[0.1, 0.2, 0.01], [0.2, 0.3, 0.02]])
    d = f.filter(NAMES, q, np.array([0.5, 1.0]), np.zeros(3))
    assert d.verdict is Verdict.PASSED
    np.testing.assert_array_equal(d.positions, q)


def test_reorders_to_config_joint_order():
    f = make_filter()
    d = f.filter(("j3", "j1", "j2"), np.array([[0.01, 0.1, 0.2]]), np.array([1.0]), None)
    np.testing.assert_allclose(d.positions, [[0.1, 0.2, 0.01]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions_are_rejected(bad):
    f = make_filter()
    d = f.filter(NAMES, np.array([[0.0, bad, 0.0]]), np.array([1.0]), np.zeros(3))
    assert d.verdict is Verdict.REJECTED and d.positions is None
    assert "non-finite" in d.reasons[0]


def test_out_of_limit_positions_are_clipped_and_reported():
    f = make_filter()
    d = f.filter(NAMES, np.array([[5.0, -5.0, 0.5]]), np.array([100.0]), None)
    assert d.verdict is Verdict.REJECTED  # 100 s horizon is beyond max_horizon_s
    d = f.filter(NAMES, np.array([[5.0, -5.0, 0.5]]), np.array([4.0]), None)
    assert d.verdict is Verdict.CLIPPED
    np.testing.assert_allclose(d.positions, [[1.0, -1.0, 0.04]])
    assert "position limit" in d.reasons[0]


def test_velocity_limit_slows_a_jump():
    f = make_filter()
    d = f.filter(NAMES, np.array([[0.9, 0.0, 0.0]]), np.array([0.1]), np.zeros(3))
    assert d.verdict is Verdict.CLIPPED
    np.testing.assert_allclose(d.positions[0, 0], 0.1)  # 1 rad/s * 0.1 s


@pytest.mark.parametrize(
    "names,q,t,fragment",
    [
        (("j1", "j2"), [[0, 0]], [1.0], "joint names"),
        (("j1", "j2", "jX"), [[0, 0, 0]], [1.0], "unknown"),
        (NAMES, [[0, 0, 0]], [0.0], "time_from_start"),
        (NAMES, [[0, 0, 0], [0, 0, 0]], [1.0, 0.5], "time_from_start"),
        (NAMES, [[0, 0]], [1.0], "positions must be"),
        (NAMES, [[0, 0, 0]], [1.0, 2.0], "one time per point"),
    ],
)
def test_malformed_commands_are_rejected_with_reason(names, q, t, fragment):
    d = make_filter().filter(names, np.array(q, dtype=float), np.array(t), None)
    assert d.verdict is Verdict.REJECTED
    assert fragment in d.reasons[0]


def test_estop_rejects_everything_until_released():
    f = make_filter()
    f.estop_engaged = True
    assert f.filter(NAMES, np.zeros((1, 3)), np.array([1.0]), None).verdict is Verdict.REJECTED
    f.estop_engaged = False
    assert f.filter(NAMES, np.zeros((1, 3)), np.array([1.0]), None).verdict is Verdict.PASSED


def test_hold_is_the_measured_position_within_limits():
    np.testing.assert_allclose(make_filter().hold(np.array([0.5, 3.0, 0.01])), [[0.5, 1.0, 0.01]])


def test_watchdog_fires_once_per_silence_and_rearms():
    w = Watchdog(0.5)
    assert not w.check(10.0)  # never fed: nothing to guard yet
    w.feed(0.0)
    assert not w.check(0.4)
    assert w.check(0.6) and w.holding
    assert not w.check(0.9)  # already holding
    w.feed(1.0)
    assert not w.holding and not w.check(1.2)
    assert w.check(1.6)


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("position_lower", (-1.0, -1.0), "position_lower must have 3"),
        ("velocity_limit", (1.0, 0.0, 1.0), "velocity_limit must be > 0"),
        ("watchdog_timeout_s", 0.0, "watchdog_timeout_s"),
        ("position_upper", (1.0, -2.0, 0.04), "position_lower[1]"),
    ],
)
def test_bad_config_names_the_field(field, value, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        make_filter(**{field: value})
