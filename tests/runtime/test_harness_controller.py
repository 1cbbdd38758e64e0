"""Harness Controller state machine, driven by small deterministic collaborators.

The policy, verifier, planner and environment below are scripted stand-ins for the
controller's collaborators: each records its calls so the tests can check what the
controller asked for and in which order. Observations and chunks are the project's real
types (policies.base), subgoals real SubgoalSpecs.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from policies.base import ActionChunk, Observation
from runtime.config import ConfigError, load_config
from runtime.harness_controller import (
    ExecutionReport,
    HarnessController,
    HarnessControllerConfig,
    HarnessState,
    KeyframeLog,
)
from sim.tasks.spec import SubgoalSpec
from sim.tasks.suite import get_task

TASK = get_task("pick_place_bowl")
SUBGOALS = list(TASK.subgoals)  # pick up / lift / put in the bowl
NAMES = [s.name for s in SUBGOALS]


class ScriptedEnv:
    """Subgoal `name` is done once `needed[name]` chunks were executed for it (default 1).
    Every executed chunk advances the clock by `chunk_s`."""

    def __init__(self, needed: dict[str, int] | None = None, chunk_s: float = 0.5,
                 fail: dict[str, Exception] | None = None, cut_short: int = 0) -> None:
        self.needed = needed or {}
        self.chunk_s = chunk_s
        self.fail = fail or {}
        self.cut_short = cut_short  # report the first n chunks as cut short
        self.now = 0.0
        self.executed: list[ActionChunk] = []
        self.progress: dict[str, int] = {}
        self.current = ""
        self.snapshots: list[str] = []
        self.restored: list[str] = []
        self.holds = 0

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def observe(self) -> Observation:
        self._maybe_fail("observe")
        return Observation(joint_positions=np.zeros(9), sim_time_s=self.now, task=TASK, subgoal_index=0)

    def execute(self, chunk: ActionChunk) -> ExecutionReport:
        self._maybe_fail("execute")
        self.executed.append(chunk)
        self.progress[self.current] = self.progress.get(self.current, 0) + 1
        self.now += self.chunk_s
        if len(self.executed) <= self.cut_short:
            return ExecutionReport(completed=False, detail="joint limit")
        return ExecutionReport()

    def subgoal_done(self, subgoal: SubgoalSpec) -> bool:
        self._maybe_fail("subgoal_done")
        return self.progress.get(subgoal.name, 0) >= self.needed.get(subgoal.name, 1)

    def snapshot(self) -> str:
        self._maybe_fail("snapshot")
        self.snapshots.append(f"snap-{len(self.snapshots)}")
        return self.snapshots[-1]

    def restore(self, handle: str) -> None:
        self._maybe_fail("restore")
        self.restored.append(handle)

    def hold(self) -> None:
        self.holds += 1
        self._maybe_fail("hold")


class ScriptedPolicy:
    """Chunk values encode the attempt number, so tests can see which sample ran."""

    def __init__(self, env: ScriptedEnv, error: Exception | None = None) -> None:
        self.env = env
        self.error = error
        self.calls: list[tuple[str, int]] = []

    def propose(self, observation: Observation, subgoal: SubgoalSpec, attempt: int) -> ActionChunk:
        self.calls.append((subgoal.name, attempt))
        if self.error is not None:
            raise self.error
        self.env.current = subgoal.name
        return ActionChunk(positions=np.full((2, 9), float(attempt)), times_s=np.array([0.1, 0.2]))


class ScriptedVerifier:
    """Returns `values` in order, then `default`."""

    def __init__(self, values: list = (), default: float = 0.1) -> None:
        self.values = list(values)
        self.default = default
        self.calls: list[str] = []

    def p_fail(self, observation, chunk, subgoal, memory) -> float:
        self.calls.append(subgoal.name)
        value = self.values.pop(0) if self.values else self.default
        if isinstance(value, Exception):
            raise value
        return value


class ScriptedPlanner:
    def __init__(self, plan: list[SubgoalSpec], remaining: list[SubgoalSpec] | None = None,
                 error: Exception | None = None) -> None:
        self._plan = plan
        self.remaining = remaining or []
        self.error = error
        self.replan_calls: list[tuple[str, list[str], Observation]] = []

    def plan(self, instruction: str) -> list[SubgoalSpec]:
        return self._plan

    def replan(self, instruction: str, done, observation: Observation) -> list[SubgoalSpec]:
        if self.error is not None:
            raise self.error
        self.replan_calls.append((instruction, [s.name for s in done], observation))
        return self.remaining


def make(config: HarnessControllerConfig | None = None, env: ScriptedEnv | None = None,
         verifier: ScriptedVerifier | None = None, planner: ScriptedPlanner | None = None,
         policy_error: Exception | None = None, memory=None):
    env = env or ScriptedEnv()
    policy = ScriptedPolicy(env, policy_error)
    verifier = verifier if verifier is not None else ScriptedVerifier()
    planner = planner or ScriptedPlanner(SUBGOALS)
    controller = HarnessController(config or HarnessControllerConfig(), policy, env, verifier=verifier,
                                   planner=planner, memory=memory, clock=lambda: env.now)
    return controller, env, policy, verifier, planner


def edges(result) -> list[tuple[str, str]]:
    return [(t.from_state, t.to_state) for t in result.transitions]


CHUNK_CYCLE = [("propose", "verify"), ("verify", "execute"), ("execute", "check")]


def test_happy_path_runs_every_subgoal_in_order():
    controller, env, policy, verifier, _ = make(memory=(memory := KeyframeLog()))
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success and result.final_state is HarnessState.DONE
    assert result.reason == "all 3 subgoals reached"
    assert edges(result) == ([("start", "propose")] + CHUNK_CYCLE + [("check", "propose")] + CHUNK_CYCLE
                             + [("check", "propose")] + CHUNK_CYCLE + [("check", "done")])
    assert [t.subgoal for t in result.transitions if t.from_state == "propose"] == NAMES
    assert [t.p_fail for t in result.transitions if t.from_state == "verify"] == [0.1] * 3
    assert policy.calls == [(n, 0) for n in NAMES] and verifier.calls == NAMES
    assert [(o.name, o.outcome, o.chunks, o.retries) for o in result.subgoals] == [(n, "reached", 1, 0) for n in NAMES]
    assert (result.resamples, result.rollbacks, result.replans, result.rejections) == (0, 0, 0, 0)
    assert result.chunks_executed == 3 and env.holds == 0
    # One verified keyframe (with its snapshot) at the start of every subgoal.
    assert [(k.kind, k.subgoal_index, k.handle, k.verified) for k in memory.keyframes] == [
        ("episode_start", 0, "snap-0", True), ("subgoal_start", 1, "snap-1", True), ("subgoal_start", 2, "snap-2", True)]


def test_instruction_only_goal_is_planned_first():
    controller, _, _, _, _ = make()
    result = controller.run(TASK.instruction)
    assert result.success
    assert edges(result)[:2] == [("start", "plan"), ("plan", "propose")]
    assert NAMES[0] in result.transitions[1].reason


def test_rejected_chunk_is_resampled_then_accepted():
    verifier = ScriptedVerifier([0.9, 0.2])
    controller, env, policy, _, _ = make(verifier=verifier, memory=(memory := KeyframeLog()))
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success and (result.resamples, result.rejections, result.verifier_calls) == (1, 1, 4)
    assert edges(result)[:7] == [("start", "propose"), ("propose", "verify"), ("verify", "resample"),
                                 ("resample", "propose"), ("propose", "verify"), ("verify", "execute"),
                                 ("execute", "check")]
    rejection = result.transitions[2]
    assert rejection.p_fail == 0.9 and "p_fail 0.900 > tau 0.5" in rejection.reason
    assert policy.calls[:2] == [(NAMES[0], 0), (NAMES[0], 1)]
    assert env.executed[0].positions[0, 0] == 1.0  # the resampled chunk ran, the rejected one never did
    assert ("alarm", False) in [(k.kind, k.verified) for k in memory.keyframes]
    # Another proposal for the same decision is not a retry, and the next decision gets the
    # policy's own chunk again.
    assert result.subgoals[0].retries == 0
    assert policy.calls[2:] == [(NAMES[1], 0), (NAMES[2], 0)]


def test_resample_limit_leads_to_rollback_to_last_verified_keyframe():
    # Subgoal 0 passes; subgoal 1 is rejected three times (two resamples, then rollback).
    verifier = ScriptedVerifier([0.1, 0.9, 0.9, 0.9, 0.1])
    config = HarnessControllerConfig(n_resample=2, max_rollbacks=1)
    controller, env, policy, _, _ = make(config, verifier=verifier)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success
    recovery = [(t.from_state, t.to_state) for t in result.transitions if t.subgoal == NAMES[1]
                and t.to_state in ("resample", "rollback", "replan")]
    assert recovery == [("verify", "resample"), ("verify", "resample"), ("verify", "rollback")]
    # snap-1 was taken when subgoal 1 began: the last verified point before the rejections.
    assert env.restored == ["snap-1"]
    assert result.rollbacks == 1 and result.resamples == 2
    assert [a for n, a in policy.calls if n == NAMES[1]] == [0, 1, 2, 3]
    rollback = next(t for t in result.transitions if t.from_state == "rollback")
    assert rollback.to_state == "propose" and rollback.resamples == 0 and rollback.rollbacks == 1


def test_rollback_limit_leads_to_replan_of_the_remaining_subgoals():
    new_tail = [SubgoalSpec("regrasp the red cube", "grasped(red_cube)"),
                SubgoalSpec("drop the red cube in the bowl", "in(red_cube, bowl)")]
    planner = ScriptedPlanner(SUBGOALS, remaining=new_tail)
    # Subgoal 1: resample; rollback (which restarts the resample streak); resample; replan.
    verifier = ScriptedVerifier([0.1, 0.8, 0.8, 0.8, 0.8])
    config = HarnessControllerConfig(n_resample=1, max_rollbacks=1, max_replans=1)
    controller, env, _, _, _ = make(config, verifier=verifier, planner=planner)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success, result.reason
    assert [t.to_state for t in result.transitions if t.to_state in ("resample", "rollback", "replan")] == [
        "resample", "rollback", "resample", "replan"]
    instruction, done, observation = planner.replan_calls[0]
    assert instruction == TASK.instruction and done == [NAMES[0]] and isinstance(observation, Observation)
    assert [(o.name, o.outcome) for o in result.subgoals] == [
        (NAMES[0], "reached"), (NAMES[1], "replanned"), (new_tail[0].name, "reached"), (new_tail[1].name, "reached")]
    assert (result.resamples, result.rollbacks, result.replans) == (2, 1, 1)
    assert env.restored == ["snap-1"]


def test_replan_finding_nothing_left_finishes_the_episode():
    # The planner observes every remaining effect already satisfied (e.g. a knocked object
    # fell into place): an empty remainder is success, not a planner fault.
    planner = ScriptedPlanner(SUBGOALS, remaining=[])
    config = HarnessControllerConfig(ladder=("replan",), max_replans=1)
    controller, _, _, _, _ = make(config, verifier=ScriptedVerifier([0.1, 0.9]), planner=planner)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success and result.final_state is HarnessState.DONE, result.reason
    assert result.transitions[-1].from_state == "replan" and result.replans == 1


def test_exhausted_ladder_fails_with_the_reason():
    config = HarnessControllerConfig(n_resample=1, max_rollbacks=1, max_replans=1, after_rejections="fail")
    planner = ScriptedPlanner(SUBGOALS, remaining=SUBGOALS[1:])
    controller, env, _, _, _ = make(config, verifier=ScriptedVerifier(default=0.95), planner=planner)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert not result.success and result.final_state is HarnessState.FAILED
    assert "p_fail 0.950 > tau 0.5" in result.reason
    assert "recovery ladder exhausted (resample 1/1, rollback 1/1, replan 1/1)" in result.reason
    # After the replan the new subgoal gets its own resamples and rollback before giving up.
    assert [t.to_state for t in result.transitions if t.from_state == "verify"] == [
        "resample", "rollback", "resample", "replan", "resample", "rollback", "resample", "failed"]
    assert env.restored == ["snap-0", "snap-0"]
    assert result.chunks_executed == 0 and env.executed == [] and env.holds == 0
    assert result.subgoals[-1].outcome == "failed" and result.transitions[-1].reason == result.reason


def test_exhausted_ladder_after_rejections_runs_the_least_risky_proposal():
    # Subgoal 0: three proposals (sample 0, 1, 2) all rejected; sample 1 has the lowest p_fail.
    config = HarnessControllerConfig(n_resample=2, ladder=("resample",))
    controller, env, policy, _, _ = make(config, verifier=ScriptedVerifier([0.9, 0.7, 0.8]))
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success, result.reason
    assert [a for n, a in policy.calls if n == NAMES[0]] == [0, 1, 2]
    chosen = next(t for t in result.transitions if t.from_state == "verify" and t.to_state == "execute")
    assert "recovery ladder exhausted (resample 2/2)" in chosen.reason
    assert "executing the least risky of 3 proposals (p_fail 0.700)" in chosen.reason
    assert env.executed[0].positions[0, 0] == 1.0  # sample 1's chunk
    assert result.rejections == 3 and result.subgoals[0].retries == 0


def test_rejection_resamples_are_bounded_per_decision_not_by_the_retry_caps():
    # Every decision of every subgoal is rejected once: 3 resamples in all, more than the caps
    # allow retries, and none of them is a retry.
    config = HarnessControllerConfig(n_resample=1, ladder=("resample",), max_retries_subgoal=0, max_retries_episode=0)
    controller, _, _, _, _ = make(config, verifier=ScriptedVerifier([0.9, 0.1] * 3))
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success, result.reason
    assert result.resamples == 3 and all(o.retries == 0 for o in result.subgoals)


@pytest.mark.parametrize("field, value, phrase", [
    ("max_retries_subgoal", 2, "subgoal retry cap reached (2/2 max_retries_subgoal)"),
    ("max_retries_episode", 3, "episode retry cap reached (3/3 max_retries_episode)"),
])
def test_retry_caps_bound_recovery(field, value, phrase):
    # Subgoal 0 is never reached within an attempt's one chunk: every check fails.
    env = ScriptedEnv(needed={NAMES[0]: 100})
    config = HarnessControllerConfig(n_resample=10, ladder=("resample",), max_chunks_per_attempt=1, **{field: value})
    controller, _, _, _, _ = make(config, env=env)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.final_state is HarnessState.FAILED and phrase in result.reason
    assert result.resamples == value


def test_failed_check_climbs_the_ladder():
    # Subgoal 0 needs 3 chunks but an attempt gets 2; the resample gives a fresh budget.
    env = ScriptedEnv(needed={NAMES[0]: 3})
    config = HarnessControllerConfig(max_chunks_per_attempt=2)
    controller, _, _, _, _ = make(config, env=env, memory=(memory := KeyframeLog()))
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success
    failure = next(t for t in result.transitions if t.from_state == "check" and t.to_state == "resample")
    assert failure.reason.startswith(f"subgoal {NAMES[0]!r} not reached within 2 chunks")
    assert failure.p_fail is None
    assert ("failure", False) in [(k.kind, k.verified) for k in memory.keyframes]
    assert result.subgoals[0].chunks == 3 and result.subgoals[0].retries == 1


def test_chunk_cut_short_is_a_detected_failure():
    controller, _, _, _, _ = make(env=ScriptedEnv(needed={NAMES[0]: 2}, cut_short=1))
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success
    failure = next(t for t in result.transitions if t.to_state == "resample")
    assert failure.from_state == "check" and "cut short: joint limit" in failure.reason


def test_rollback_is_skipped_without_a_verified_keyframe():
    class NoKeyframes(KeyframeLog):
        def last_verified(self):
            return None

    config = HarnessControllerConfig(n_resample=0)
    planner = ScriptedPlanner(SUBGOALS, remaining=SUBGOALS)
    controller, env, _, _, _ = make(config, verifier=ScriptedVerifier([0.9]), planner=planner, memory=NoKeyframes())
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success and env.restored == [] and result.replans == 1


def test_time_budget_ends_the_episode():
    env = ScriptedEnv(needed={NAMES[0]: 10}, chunk_s=1.0)
    controller, _, _, _, _ = make(HarnessControllerConfig(time_budget_s=2.5), env=env)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.final_state is HarnessState.FAILED
    assert result.reason == "time budget of 2.5 s exceeded (3 s elapsed)"
    assert result.chunks_executed == 3 and env.holds == 0
    assert result.subgoals[0].outcome == "failed"


@pytest.mark.parametrize("answer, phrase", [
    (math.nan, "verifier.p_fail returned nan"),
    (1.5, "verifier.p_fail returned 1.5"),
    ("0.2", "verifier.p_fail returned '0.2'"),
    (RuntimeError("model not loaded"), "verifier.p_fail raised RuntimeError: model not loaded"),
])
def test_bad_verifier_answer_holds_the_robot(answer, phrase):
    controller, env, _, _, _ = make(verifier=ScriptedVerifier([answer]))
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.final_state is HarnessState.HOLD and not result.success
    assert phrase in result.reason and env.holds == 1 and env.executed == []
    assert edges(result)[-1] == ("verify", "hold")
    assert result.subgoals[-1].outcome == "held"


@pytest.mark.parametrize("where, phrase", [
    ("policy", "policy.propose raised ValueError: bad image"),
    ("execute", "env.execute raised ValueError: bad image"),
    ("subgoal_done", "env.subgoal_done raised ValueError: bad image"),
    ("snapshot", "env.snapshot raised ValueError: bad image"),
    ("planner", "planner.replan raised ValueError: bad image"),
])
def test_collaborator_exception_holds_the_robot(where, phrase):
    error = ValueError("bad image")
    env = ScriptedEnv(fail={where: error} if where not in ("policy", "planner") else None)
    planner = ScriptedPlanner(SUBGOALS, error=error if where == "planner" else None)
    # The planner is only asked after a rejection with resampling and rollback disabled.
    config = HarnessControllerConfig(ladder=("replan",)) if where == "planner" else None
    verifier = ScriptedVerifier([0.9]) if where == "planner" else None
    controller, env, _, _, _ = make(config, env=env, verifier=verifier, planner=planner,
                                    policy_error=error if where == "policy" else None)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.final_state is HarnessState.HOLD and phrase in result.reason
    assert env.holds == 1


def test_hold_failure_is_reported_not_raised():
    env = ScriptedEnv(fail={"execute": OSError("bus off"), "hold": OSError("bus off")})
    controller, _, _, _, _ = make(env=env)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.final_state is HarnessState.HOLD
    assert result.reason == "env.execute raised OSError: bus off; env.hold also failed: OSError: bus off"


def test_interrupt_holds_then_propagates():
    controller, env, _, _, _ = make(policy_error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        controller.run(TASK.instruction, SUBGOALS)
    assert env.holds == 1


def test_pass_through_executes_every_chunk_unverified():
    class ForbiddenVerifier:
        def p_fail(self, *args):
            raise AssertionError("pass-through must not call the verifier")

    env = ScriptedEnv(needed={NAMES[1]: 3}, cut_short=5)
    policy = ScriptedPolicy(env)
    proposed: list[ActionChunk] = []
    original = policy.propose
    policy.propose = lambda *args: proposed.append(original(*args)) or proposed[-1]
    controller = HarnessController(HarnessControllerConfig(mode="pass_through"), policy, env,
                                   verifier=ForbiddenVerifier(), clock=lambda: env.now)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.success and result.verifier_calls == 0
    assert all(a is b for a, b in zip(env.executed, proposed, strict=True))  # forwarded unchanged
    assert {attempt for _, attempt in policy.calls} == {0}
    assert env.snapshots == [] and result.resamples == result.rollbacks == result.replans == 0
    assert ("propose", "verify") not in edges(result)
    assert [o.chunks for o in result.subgoals] == [1, 3, 1]


def test_pass_through_fails_like_the_baseline_step_budget():
    env = ScriptedEnv(needed={NAMES[0]: 100})
    controller = HarnessController(HarnessControllerConfig(mode="pass_through", max_chunks_per_attempt=4),
                                   ScriptedPolicy(env), env, clock=lambda: env.now)
    result = controller.run(TASK.instruction, SUBGOALS)
    assert result.final_state is HarnessState.FAILED and env.holds == 0
    assert result.reason == f"subgoal {NAMES[0]!r} not reached within 4 chunks"
    assert result.chunks_executed == 4 and [(o.name, o.outcome) for o in result.subgoals] == [(NAMES[0], "failed")]


def test_result_with_every_rung_is_json_serialisable():
    planner = ScriptedPlanner(SUBGOALS, remaining=SUBGOALS[1:])
    verifier = ScriptedVerifier([np.float32(0.2), np.float64(0.7), 0.7, 0.7, 0.7], default=np.float32(0.25))
    config = HarnessControllerConfig(n_resample=1, max_rollbacks=1, max_replans=1)
    controller, _, _, _, _ = make(config, verifier=verifier, planner=planner)
    result = controller.run(TASK.instruction, SUBGOALS)
    data = result.as_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["final_state"] == "done" and data["replans"] == 1
    assert len(data["transitions"]) == len(result.transitions)
    assert {"from_state", "to_state", "subgoal_index", "subgoal", "reason", "p_fail", "attempt", "resamples",
            "rollbacks", "replans", "retries_subgoal", "retries_episode", "time_s"} <= set(data["transitions"][0])


@pytest.mark.parametrize("kwargs, phrase", [
    ({"tau": math.nan}, "tau must be a finite number in [0, 1], got nan"),
    ({"tau": 1.2}, "tau must be"),
    ({"n_resample": -1}, "n_resample must be an integer >= 0, got -1"),
    ({"max_rollbacks": True}, "max_rollbacks must be an integer"),
    ({"max_chunks_per_attempt": 0}, "max_chunks_per_attempt must be an integer >= 1"),
    ({"time_budget_s": 0.0}, "time_budget_s must be a finite number > 0"),
    ({"ladder": ("resample", "jump")}, "ladder has unknown rung(s) ['jump']"),
    ({"ladder": ("rollback", "rollback")}, "ladder must not repeat a rung"),
    ({"mode": "yolo"}, "mode must be 'verified' or 'pass_through'"),
])
def test_config_errors_name_the_field(kwargs, phrase):
    with pytest.raises(ValueError) as info:
        HarnessControllerConfig(**kwargs)
    assert phrase in str(info.value)


def test_config_loads_from_a_mapping_with_field_paths_in_errors():
    config = load_config(HarnessControllerConfig, {"tau": 0.3, "ladder": ["rollback", "resample"]}, root="harness")
    assert config.tau == 0.3 and config.ladder == ("rollback", "resample")
    with pytest.raises(ConfigError, match=r"harness\.tau must be a finite number"):
        load_config(HarnessControllerConfig, {"tau": -0.1}, root="harness")
    with pytest.raises(ConfigError, match=r"harness\.ladder\[1\] must be one of"):
        load_config(HarnessControllerConfig, {"ladder": ["resample", "teleport"]}, root="harness")
    with pytest.raises(ConfigError, match=r"harness: unknown field\(s\) \['n_resamples'\]"):
        load_config(HarnessControllerConfig, {"n_resamples": 3}, root="harness")


def test_controller_refuses_inconsistent_collaborators():
    env = ScriptedEnv()
    with pytest.raises(ValueError, match="mode 'verified' needs a verifier"):
        HarnessController(HarnessControllerConfig(), ScriptedPolicy(env), env)
    with pytest.raises(ValueError, match="ladder includes 'replan' but no planner"):
        HarnessController(HarnessControllerConfig(), ScriptedPolicy(env), env, verifier=ScriptedVerifier())
    controller = HarnessController(HarnessControllerConfig(ladder=("resample",)), ScriptedPolicy(env), env,
                                   verifier=ScriptedVerifier())
    with pytest.raises(ValueError, match="run\\(\\) needs subgoals"):
        controller.run(TASK.instruction)
    with pytest.raises(ValueError, match=r"subgoals\[1\] has no non-empty str name"):
        controller.run(TASK.instruction, [SUBGOALS[0], "lift"])
