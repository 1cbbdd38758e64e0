"""The long-horizon tabletop task suite: declarative task files (suite/*.yaml), their
validated specs (spec), subgoal predicates (predicates), static scene geometry (geometry),
the seeded initial-state distribution (sampling) and the suite/seed-split API (suite)."""
from sim.tasks.spec import TaskSpec, TaskSpecError
from sim.tasks.suite import UnknownTaskError, get_task, initial_state_seeds, load_suite

__all__ = ["TaskSpec", "TaskSpecError", "UnknownTaskError", "get_task", "initial_state_seeds", "load_suite"]
