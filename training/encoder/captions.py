"""Captions of a tabletop state, generated from the world state, for the image-text encoder.

Why generated: the encoder is trained on simulator renders, and the simulator knows exactly
what is where. A scene caption lists, in the task's object order, one fact per movable
object and one per drawer, decided by the same predicates the subgoals use
(`sim.tasks.predicates`), so a caption is true of its frame by construction and two frames
share a caption exactly when they agree on every fact:

  held                 "the gripper holds the red cube"
  in a container       "the red cube is in the bowl"          (bowl, tray, drawer)
  on a support         "the blue cube is on the green cube"   (plate, cube, block)
  in a goal region     "the red cube is in the blue zone"
  otherwise            "the red cube is on the table" (resting on it) / "... is in the air"
  drawer               "the drawer is open" / "closed" / "half open"
  gripper              "the gripper is empty" when it holds nothing

Facts are joined with ". ". The subgoal caption is the subgoal's own name from the task
file ("pick up the red cube"), the text the harness keys its memory with.
"""
from __future__ import annotations

import numpy as np

from sim.tasks.geometry import (
    CONTAINER_KINDS,
    DRAWER_CLOSED_MAX_M,
    DRAWER_OPEN_MIN_M,
    SUPPORT_KINDS,
    TABLE_TOP_Z_M,
    SceneGeometry,
    rotation_matrix,
)
from sim.tasks.predicates import REST_MAX_GAP_M, at, grasped, inside, on
from sim.tasks.spec import TaskSpec
from sim.world_state import WorldState

FACT_SEPARATOR = ". "


class CaptionError(ValueError):
    """A world state does not fit the task it is captioned for (missing objects, bad index)."""


def phrase(name: str) -> str:
    """An object or region name as a noun phrase: "red_cube" -> "the red cube"."""
    return "the " + name.replace("_", " ")


def _bottom_gap(world: WorldState, geometry: SceneGeometry, name: str) -> float:
    pos, quat = world.object_poses[name]
    half_z = geometry.objects[name].half_extent_along(rotation_matrix(quat), np.array([0.0, 0.0, 1.0]))
    return float(pos[2]) - half_z - TABLE_TOP_Z_M


def scene_facts(world: WorldState, task: TaskSpec) -> list[str]:
    """One fact per movable object and drawer of `task`, in the task's object order."""
    missing = sorted({o.name for o in task.objects} - set(world.object_poses))
    if missing:
        raise CaptionError(f"task {task.task_id!r}: the world state has no pose for {missing}")
    geometry = task.geometry
    movables = [o.name for o in task.objects if o.geometry.movable]
    containers = [o.name for o in task.objects if o.kind in CONTAINER_KINDS]
    supports = [o.name for o in task.objects if o.kind in SUPPORT_KINDS]
    facts: list[str] = []
    holding = False
    for obj in task.objects:
        name = obj.name
        if obj.kind == "drawer":
            slide = world.fixture_joints.get(name, 0.0)
            state = "open" if slide >= DRAWER_OPEN_MIN_M else "closed" if slide <= DRAWER_CLOSED_MAX_M else "half open"
            facts.append(f"{phrase(name)} is {state}")
            continue
        if name not in movables:
            continue
        if grasped(world, geometry, name):
            facts.append(f"the gripper holds {phrase(name)}")
            holding = True
            continue
        where = next((f"in {phrase(c)}" for c in containers if inside(world, geometry, name, c)), None)
        where = where or next((f"on {phrase(s)}" for s in supports if s != name and on(world, geometry, name, s)), None)
        where = where or next((f"in {phrase(r)}" for r in task.regions if at(world, geometry, name, r)), None)
        if where is None:
            where = "on the table" if _bottom_gap(world, geometry, name) <= REST_MAX_GAP_M else "in the air"
        facts.append(f"{phrase(name)} is {where}")
    if not holding:
        facts.append("the gripper is empty")
    return facts


def scene_caption(world: WorldState, task: TaskSpec) -> str:
    """The facts of `scene_facts` as one caption."""
    return FACT_SEPARATOR.join(scene_facts(world, task))


def subgoal_caption(task: TaskSpec, subgoal_index: int) -> str:
    """The text of subgoal `subgoal_index` of `task` (its name in the task file)."""
    if isinstance(subgoal_index, bool) or not isinstance(subgoal_index, (int, np.integer)) or not 0 <= subgoal_index < len(task.subgoals):
        raise CaptionError(f"task {task.task_id!r} has subgoals 0..{len(task.subgoals) - 1}, got subgoal_index={subgoal_index!r}")
    return task.subgoals[int(subgoal_index)].name
