"""Task suite, task-file validation, predicates on hand-built world states, initial-state
sampling and the train/held-out seed split."""
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from sim.panda import top_down_quaternion
from sim.tasks import geometry as geo
from sim.tasks.predicates import PredicateError, evaluate, parse_predicate
from sim.tasks.sampling import FOOTPRINT_MARGIN_M, sample_initial_state
from sim.tasks.spec import TaskSpecError, load_task_file, task_from_dict
from sim.tasks.suite import (
    HELDOUT_SEED_BASE,
    SUITE_DIR,
    UnknownTaskError,
    get_task,
    initial_state_seeds,
    load_suite,
    split_of_seed,
)
from sim.world_state import WorldState

PREDICATE_NAMES = ("grasped", "lifted", "in", "on", "at", "open", "closed")

SCENE_TASK = {
    "task_id": "predicate_fixture",
    "instruction": "everything at once",
    "regions": {"zone": {"x_m": [0.30, 0.40], "y_m": [0.20, 0.30], "color": "blue"}},
    "objects": [
        {"name": "red_cube", "kind": "cube", "color": "red", "region": {"x_m": [0.4, 0.5], "y_m": [0.0, 0.1]}},
        {"name": "blue_cube", "kind": "cube", "color": "blue", "region": {"x_m": [0.4, 0.5], "y_m": [0.0, 0.1]}},
        {"name": "bar", "kind": "block", "color": "yellow", "region": {"x_m": [0.4, 0.5], "y_m": [0.0, 0.1]}},
        {"name": "bowl", "kind": "bowl", "color": "white", "region": {"x_m": [0.5, 0.6], "y_m": [-0.3, -0.2]}},
        {"name": "tray", "kind": "tray", "color": "grey", "region": {"x_m": [0.5, 0.6], "y_m": [0.2, 0.3]}},
        {"name": "plate", "kind": "plate", "color": "white", "region": {"x_m": [0.3, 0.4], "y_m": [-0.3, -0.2]}},
        {"name": "drawer", "kind": "drawer", "color": "brown", "region": {"x_m": [0.6, 0.7], "y_m": [0.0, 0.1]}},
    ],
    "subgoals": [
        {"name": "a", "predicate": "grasped(red_cube)"},
        {"name": "b", "predicate": "in(red_cube, bowl)"},
        {"name": "c", "predicate": "open(drawer)"},
    ],
}

CUBE_Z = 0.02  # a 4 cm cube resting on the table


def yaw_q(yaw: float) -> np.ndarray:
    return np.array([0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)])


@pytest.fixture(scope="module")
def scene_task():
    return task_from_dict(SCENE_TASK)


@pytest.fixture(scope="module")
def geometry(scene_task):
    return scene_task.geometry


def world(**overrides) -> WorldState:
    """A tidy scene: fixtures where the fixture task puts them, cubes on the table, the
    open gripper high above everything; `overrides` replace object poses (xyz, yaw) or set
    ee=(xyz, yaw), width=..., drawer=slide."""
    poses = {
        "red_cube": ((0.45, 0.05, CUBE_Z), 0.0),
        "blue_cube": ((0.45, -0.05, CUBE_Z), 0.3),
        "bar": ((0.40, 0.10, 0.0175), 0.0),
        "bowl": ((0.55, -0.25, 0.0), 0.2),
        "tray": ((0.55, 0.25, 0.0), 0.0),
        "plate": ((0.35, -0.25, 0.0), 0.0),
        "drawer": ((0.65, 0.05, 0.0), 0.0),
    }
    ee, width, slide = ((0.4, 0.0, 0.4), 0.0), 0.078, 0.0
    for key, value in overrides.items():
        if key == "ee":
            ee = value
        elif key == "width":
            width = value
        elif key == "drawer_slide":
            slide = value
        else:
            poses[key] = value
    return WorldState(
        object_poses={n: (np.array(xyz, dtype=float), yaw_q(yaw)) for n, (xyz, yaw) in poses.items()},
        fixture_joints={"drawer": slide},
        ee_position=np.array(ee[0], dtype=float),
        ee_quaternion=top_down_quaternion(ee[1]),
        gripper_width=width,
        sim_time_s=0.0,
    )


def holding_red(z: float = CUBE_Z, **more) -> WorldState:
    """The red cube pinched between the pads at height z."""
    return world(**{"red_cube": ((0.45, 0.05, z), 0.0), "ee": ((0.45, 0.05, z), 0.0), "width": 0.039, **more})


# -- suite ---------------------------------------------------------------------------------
def test_suite_loads_with_enough_long_horizon_tasks():
    suite = load_suite()
    assert len(suite) >= 10
    used = set()
    for task_id, task in suite.items():
        assert task.task_id == task_id
        assert 3 <= len(task.subgoals) <= 6
        used |= {parse_predicate(sg.predicate).name for sg in task.subgoals}
        sample_initial_state(task, HELDOUT_SEED_BASE)
    # The suite exercises pick, place in/on, stacking, pushing and the drawer both ways.
    assert {"grasped", "in", "on", "at", "open", "closed", "lifted"} <= used
    calls = [(t, parse_predicate(sg.predicate)) for t in suite.values() for sg in t.subgoals]
    assert {t.geometry.kind(c.args[1]) for t, c in calls if c.name == "on"} >= {"cube", "block", "plate"}
    assert {t.geometry.kind(c.args[1]) for t, c in calls if c.name == "in"} == {"bowl", "tray", "drawer"}


def test_unknown_task_id_lists_valid_ids():
    with pytest.raises(UnknownTaskError) as err:
        get_task("make_coffee")
    assert "make_coffee" in str(err.value) and "bowl_then_stack" in str(err.value)
    assert isinstance(err.value, KeyError)


def test_train_and_heldout_seeds_are_disjoint():
    train, heldout = initial_state_seeds("train", 500), initial_state_seeds("heldout", 500)
    assert len(set(train)) == 500 and len(set(heldout)) == 500
    assert not set(train) & set(heldout)
    assert {split_of_seed(s) for s in train} == {"train"} and {split_of_seed(s) for s in heldout} == {"heldout"}
    assert initial_state_seeds("heldout", 3) == [HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + 1, HELDOUT_SEED_BASE + 2]
    with pytest.raises(ValueError, match="split"):
        initial_state_seeds("test", 3)


def test_initial_states_are_seeded_in_region_and_overlap_free():
    task = get_task("sort_three")
    a, b = sample_initial_state(task, 7), sample_initial_state(task, 7)
    assert a == b
    assert a != sample_initial_state(task, 8)
    for seed in range(40):
        init = sample_initial_state(task, seed)
        for obj in task.objects:
            pl = init.placements[obj.name]
            assert obj.region.x_m[0] <= pl.xy_m[0] <= obj.region.x_m[1]
            assert obj.region.y_m[0] <= pl.xy_m[1] <= obj.region.y_m[1]
            assert math.radians(obj.yaw_deg[0]) - 1e-9 <= pl.yaw_rad <= math.radians(obj.yaw_deg[1]) + 1e-9
        cubes = [np.array(init.placements[n].xy_m) for n in ("red_cube", "blue_cube", "green_cube")]
        for i in range(3):
            for j in range(i + 1, 3):
                # Footprints (cube half diagonal) plus the margin never overlap.
                assert np.linalg.norm(cubes[i] - cubes[j]) >= 0.04 + FOOTPRINT_MARGIN_M - 1e-9
    drawer_task = get_task("tray_then_close_drawer")
    lo, hi = drawer_task.object("drawer").initial_joint_m
    assert lo <= sample_initial_state(drawer_task, 3).fixture_joints["drawer"] <= hi


# -- task file validation ---------------------------------------------------------------------
def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _suite_task_dict(name: str = "bowl_then_stack") -> dict:
    return yaml.safe_load((SUITE_DIR / f"{name}.yaml").read_text())


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["objects"][1]["region"].update(x_m=[0.6, 0.4]), r"task\.objects\[1\]\.region\.x_m"),
        (lambda d: d["objects"][2].update(kind="sphere"), r"task\.objects\[2\]\.kind.*'sphere'"),
        (lambda d: d["objects"][0].update(color="mauve"), r"task\.objects\[0\]\.color.*'mauve'"),
        (lambda d: d["objects"][1].update(weight_kg=1.0), r"task\.objects\[1\]: unknown field\(s\) \['weight_kg'\]"),
        (lambda d: d["objects"][1].pop("region"), r"task\.objects\[1\]: missing field\(s\) \['region'\]"),
        (lambda d: d["subgoals"][1].update(predicate="inside(red_cube, bowl)"), r"task\.subgoals\[1\]\.predicate.*unknown predicate 'inside'"),
        (lambda d: d["subgoals"][3].update(predicate="on(blue_cube, purple_cube)"), r"subgoals\[3\]\.predicate.*unknown object 'purple_cube'"),
        (lambda d: d["subgoals"][1].update(predicate="in(red_cube, green_cube)"), r"'green_cube' is a cube, but in needs a container"),
        (lambda d: d["subgoals"][0].update(predicate="grasped(red_cube"), r"subgoals\[0\]\.predicate.*not of the form"),
        (lambda d: d.update(subgoals=d["subgoals"][:2]), r"task\.subgoals must have 3 to 6 entries, got 2"),
        (lambda d: d.update(max_steps_per_subgoal=0), r"task\.max_steps_per_subgoal.*got 0"),
        (lambda d: d["objects"][1]["region"].update(y_m=[0.3, 0.9]), r"region\.y_m must lie within the workspace"),
        (lambda d: d["objects"][1].update(size_m=[0.2, 0.04, 0.04]), r"objects\[1\]\.size_m"),
    ],
)
def test_malformed_task_file_errors_name_file_field_and_value(tmp_path, mutate, expected):
    data = _suite_task_dict()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(TaskSpecError, match=expected) as err:
        load_task_file(path)
    assert str(path) in str(err.value)


def test_invalid_yaml_and_unreadable_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task_id: [unclosed\n")
    with pytest.raises(TaskSpecError, match="invalid YAML"):
        load_task_file(bad)
    with pytest.raises(TaskSpecError, match="cannot read"):
        load_task_file(tmp_path / "missing.yaml")


def test_parse_predicate():
    call = parse_predicate(" in( red_cube ,bowl ) ")
    assert call.name == "in" and call.args == ("red_cube", "bowl") and str(call) == "in(red_cube, bowl)"
    for text in ("in(red_cube)", "float(red_cube)", "in red_cube bowl", "on(a, b, c)"):
        with pytest.raises(PredicateError):
            parse_predicate(text)


# -- predicates ------------------------------------------------------------------------------
def test_grasped_and_released(geometry):
    assert evaluate("grasped(red_cube)", holding_red(), geometry)
    assert not evaluate("released(red_cube)", holding_red(), geometry)
    assert evaluate("not_grasped(red_cube)", world(), geometry)
    # Fingers open wide, or closed on nothing, around the cube: not a grasp.
    assert not evaluate("grasped(red_cube)", holding_red(width=0.07), geometry)
    assert not evaluate("grasped(red_cube)", holding_red(width=0.0), geometry)
    # Pads at the right width but the cube 5 cm away along the approach axis.
    assert not evaluate("grasped(red_cube)", world(ee=((0.45, 0.05, 0.07), 0.0), width=0.039), geometry)
    # The bar pinched across its 3.5 cm side (hand yaw = bar yaw) but not across its length.
    bar_at = ((0.40, 0.10, 0.0175), 0.5)
    assert evaluate("grasped(bar)", world(bar=bar_at, ee=((0.40, 0.10, 0.0175), 0.5), width=0.034), geometry)
    assert not evaluate("grasped(bar)", world(bar=bar_at, ee=((0.40, 0.10, 0.0175), 0.5 + math.pi / 2), width=0.034), geometry)


def test_lifted(geometry):
    assert evaluate("lifted(red_cube)", holding_red(z=0.12), geometry)
    assert not evaluate("lifted(red_cube)", holding_red(z=0.05), geometry)  # bottom only 3 cm up
    assert not evaluate("lifted(red_cube)", world(red_cube=((0.45, 0.05, 0.12), 0.0)), geometry)  # not held


def test_in_bowl_tray_and_drawer(geometry):
    floor = geo.BOWL_FLOOR_M + 0.02
    assert evaluate("in(red_cube, bowl)", world(red_cube=((0.56, -0.26, floor), 0.7)), geometry)
    assert not evaluate("in(red_cube, bowl)", world(red_cube=((0.56, -0.26, floor + 0.05), 0.7)), geometry)  # hovering
    assert not evaluate("in(red_cube, bowl)", world(red_cube=((0.64, -0.25, CUBE_Z), 0.0)), geometry)  # beside it
    held = holding_red(z=floor)
    held.object_poses["red_cube"] = (np.array([0.55, -0.25, floor]), yaw_q(0.0))
    held.ee_position = np.array([0.55, -0.25, floor])
    assert not evaluate("in(red_cube, bowl)", held, geometry)  # still in the hand
    tray_floor = geo.TRAY_FLOOR_TOP_M + 0.02
    assert evaluate("in(red_cube, tray)", world(red_cube=((0.60, 0.30, tray_floor), 0.0)), geometry)
    assert not evaluate("in(red_cube, tray)", world(red_cube=((0.65, 0.25, tray_floor), 0.0)), geometry)  # on the rim side
    # Drawer at (0.65, 0.05), pulled out 0.15 m: its exposed interior is at x ~ 0.65 - 0.175.
    inside = world(red_cube=((0.475, 0.05, geo.DRAWER_FLOOR_TOP_M + 0.02), 0.0), drawer_slide=0.15)
    assert evaluate("in(red_cube, drawer)", inside, geometry)
    inside.fixture_joints["drawer"] = 0.0  # same point, drawer shut: that is in front of it
    assert not evaluate("in(red_cube, drawer)", inside, geometry)
    # Carried along when the drawer closes: still in.
    assert evaluate("in(red_cube, drawer)", world(red_cube=((0.625, 0.05, geo.DRAWER_FLOOR_TOP_M + 0.02), 0.0)), geometry)


def test_on_plate_and_stacking(geometry):
    plate_top = geo.PLATE_THICKNESS_M
    assert evaluate("on(red_cube, plate)", world(red_cube=((0.38, -0.23, plate_top + 0.02), 0.0)), geometry)
    assert not evaluate("on(red_cube, plate)", world(red_cube=((0.47, -0.25, CUBE_Z), 0.0)), geometry)
    stacked = world(red_cube=((0.455, -0.045, 0.06), 0.1))  # on blue_cube at (0.45, -0.05)
    assert evaluate("on(red_cube, blue_cube)", stacked, geometry)
    assert not evaluate("on(blue_cube, red_cube)", stacked, geometry)
    assert not evaluate("on(red_cube, blue_cube)", world(red_cube=((0.48, -0.05, 0.06), 0.0)), geometry)  # overhangs
    assert not evaluate("on(red_cube, blue_cube)", world(red_cube=((0.45, -0.05, 0.10), 0.0)), geometry)  # floating
    assert not evaluate("on(red_cube, blue_cube)", world(red_cube=((0.50, 0.05, CUBE_Z), 0.0)), geometry)  # beside


def test_at_region(geometry):
    assert evaluate("at(red_cube, zone)", world(red_cube=((0.35, 0.25, CUBE_Z), 0.4)), geometry)
    assert not evaluate("at(red_cube, zone)", world(red_cube=((0.35, 0.32, CUBE_Z), 0.0)), geometry)
    assert not evaluate("at(red_cube, zone)", world(red_cube=((0.35, 0.25, 0.15), 0.0)), geometry)  # above, not on


def test_drawer_open_and_closed(geometry):
    assert evaluate("open(drawer)", world(drawer_slide=0.15), geometry)
    assert not evaluate("open(drawer)", world(drawer_slide=0.05), geometry)
    assert evaluate("closed(drawer)", world(drawer_slide=0.002), geometry)
    assert not evaluate("closed(drawer)", world(drawer_slide=0.05), geometry)


def test_every_predicate_is_covered():
    from sim.tasks.predicates import PREDICATES

    assert set(PREDICATE_NAMES) | {"released", "not_grasped"} == set(PREDICATES)
