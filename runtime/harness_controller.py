"""The HELM Harness Controller: an explicit state machine that wraps any chunking policy.

Why it exists: a reactive policy executes whatever it proposes and never looks back. The
harness puts a check before every action and a bounded way back after every failure
(HELM, arXiv 2604.18791; see papers/helm.md):

    START -> [PLAN] -> PROPOSE -> VERIFY -> EXECUTE -> CHECK -> PROPOSE (same or next subgoal) | DONE

A chunk whose predicted failure probability exceeds ``tau`` is not executed; a chunk that
ran but left its subgoal unreached (execution aborted, or the attempt's chunk budget used
up) is a detected failure. Both climb the recovery ladder, whose rungs are tried in the
configured order, each bounded:

    RESAMPLE  ask the policy for another chunk: after a rejection, another proposal for the
              same decision (at most `n_resample` per decision); after a failed check, a new
              attempt with a fresh chunk budget (at most `n_resample` per subgoal)
    ROLLBACK  restore the last verified keyframe through the environment: a simulator state
              handle in sim, a recorded robot pose on hardware; the controller cannot tell
    REPLAN    ask the planner for new remaining subgoals

Only a recovery asks the policy for a new sample (a nonzero `attempt`); the decisions after
it get the policy's own chunk again, so one rejection does not perturb the rest of the
subgoal. When every rung, a retry cap or the time budget is used up after a failed check,
the episode ends FAILED with the reason. When that happens after a rejection, the verifier
has only predicted a failure: with ``after_rejections: least_risky`` (the default) the
proposal with the lowest p_fail at this decision is executed, and CHECK still judges it;
with ``fail`` the episode ends FAILED. Any exception or invalid answer from a
collaborator (policy, verifier, planner, environment, memory) ends it in HOLD: the
environment is told to hold position and `run()` returns normally, so a ROS node or a
benchmark that drives the controller never crashes on it.

The ``pass_through`` mode is the baseline harness: no verifier, no snapshots or keyframes,
no recovery; every proposed chunk is executed unchanged and a subgoal fails when it is not
reached within its chunk budget.

Every transition is recorded (from/to state, subgoal, reason, p_fail, counters, time) and
logged; `HarnessResult.as_dict()` is JSON-serialisable for result files. This is a core
module: no ROS imports (DESIGN.md rule 1).
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol

import numpy as np

from policies.base import ActionChunk, Observation

logger = logging.getLogger(__name__)

RecoveryRung = Literal["resample", "rollback", "replan"]
RECOVERY_RUNGS: tuple[str, ...] = ("resample", "rollback", "replan")


class HarnessState(str, Enum):
    START = "start"
    PLAN = "plan"
    PROPOSE = "propose"
    VERIFY = "verify"
    EXECUTE = "execute"
    CHECK = "check"
    RESAMPLE = "resample"
    ROLLBACK = "rollback"
    REPLAN = "replan"
    DONE = "done"
    FAILED = "failed"
    HOLD = "hold"


TERMINAL_STATES = frozenset({HarnessState.DONE, HarnessState.FAILED, HarnessState.HOLD})
# Logged at INFO (as is reaching a subgoal); the routine per-chunk loop goes to DEBUG.
_NOTABLE_TARGETS = frozenset({HarnessState.PLAN, HarnessState.RESAMPLE, HarnessState.ROLLBACK,
                              HarnessState.REPLAN, HarnessState.DONE})


# -- what the controller drives ------------------------------------------------------------
class Subgoal(Protocol):
    """A named step of the task (sim.tasks.spec.SubgoalSpec is one)."""

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class ExecutionReport:
    """What the environment says about one executed chunk.

    `completed` is False when the chunk was cut short (safety clipping stopped it, a
    contact limit, a lost controller); `detail` says why.
    """

    completed: bool = True
    detail: str = ""


class ChunkProposer(Protocol):
    """The wrapped policy. `attempt` counts recoveries at this subgoal: a stochastic policy
    uses it to draw a different sample (e.g. as a seed offset) after a rejection."""

    def propose(self, observation: Observation, subgoal: Subgoal, attempt: int) -> ActionChunk: ...


class VerifiedKeyframe(Protocol):
    """The part of a keyframe that rollback needs."""

    @property
    def handle(self) -> Any: ...

    @property
    def subgoal_index(self) -> int: ...


class KeyframeStore(Protocol):
    """Episodic memory as the controller sees it: keyframes written at verified points
    (episode start, every subgoal start) and at alarms/failures (unverified)."""

    def write(self, kind: str, subgoal_index: int, subgoal: Subgoal, observation: Observation,
              handle: Any, verified: bool) -> None: ...

    def last_verified(self) -> VerifiedKeyframe | None: ...


class FailurePredictor(Protocol):
    """The state verifier: probability that executing `chunk` now fails `subgoal`."""

    def p_fail(self, observation: Observation, chunk: ActionChunk, subgoal: Subgoal, memory: KeyframeStore) -> float: ...


class HarnessEnv(Protocol):
    """The robot, simulated or real, as the harness drives it."""

    def observe(self) -> Observation: ...

    def execute(self, chunk: ActionChunk) -> ExecutionReport: ...

    def subgoal_done(self, subgoal: Subgoal) -> bool: ...

    def snapshot(self) -> Any:
        """A handle to return to later: a simulator state id, or the robot's pose."""

    def restore(self, handle: Any) -> None:
        """Return to `handle`: restore the simulator state, or move the robot back."""

    def hold(self) -> None:
        """Stop and hold the current position (safe state)."""


class SubgoalPlanner(Protocol):
    def plan(self, instruction: str) -> Sequence[Subgoal]: ...

    def replan(self, instruction: str, done: Sequence[Subgoal], observation: Observation) -> Sequence[Subgoal]: ...


# -- a keyframe log for when no episodic memory is plugged in -----------------------------
@dataclass(frozen=True)
class Keyframe:
    kind: str
    subgoal_index: int
    subgoal_name: str
    observation: Observation
    handle: Any
    verified: bool


class KeyframeLog:
    """The minimal KeyframeStore: an in-order list of keyframes, no retrieval."""

    def __init__(self) -> None:
        self.keyframes: list[Keyframe] = []

    def write(self, kind: str, subgoal_index: int, subgoal: Subgoal, observation: Observation,
              handle: Any, verified: bool) -> None:
        self.keyframes.append(Keyframe(kind, subgoal_index, subgoal.name, observation, handle, verified))

    def last_verified(self) -> Keyframe | None:
        for keyframe in reversed(self.keyframes):
            if keyframe.verified and keyframe.handle is not None:
                return keyframe
        return None


# -- configuration -----------------------------------------------------------------------
def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class HarnessControllerConfig:
    """Schema of the `harness` config section (load with runtime.config.load_config).

    Counts: `n_resample` resamples of rejected proposals per decision, and of failed
    attempts per subgoal (reset by a rollback), before the next rung; `max_rollbacks` per
    subgoal, `max_replans` per episode; `max_retries_subgoal` and `max_retries_episode` cap
    the recovery actions that start a new attempt (a rollback, a replan, a resample after a
    failed check) together; resampling a rejected proposal is bounded by `n_resample`.
    `after_rejections` says what happens when a rejected proposal has no rung left (see the
    module docstring). `max_chunks_per_attempt` is how many executed chunks an attempt gets
    to reach its subgoal before CHECK calls it a failure. `time_budget_s` is measured on the
    controller's clock (wall or sim time).
    """

    mode: Literal["verified", "pass_through"] = "verified"
    tau: float = 0.5
    n_resample: int = 2
    max_rollbacks: int = 1
    max_replans: int = 1
    max_retries_subgoal: int = 6
    max_retries_episode: int = 12
    max_chunks_per_attempt: int = 20
    time_budget_s: float = 600.0
    ladder: tuple[RecoveryRung, ...] = ("resample", "rollback", "replan")
    after_rejections: Literal["least_risky", "fail"] = "least_risky"

    def __post_init__(self) -> None:
        if self.mode not in ("verified", "pass_through"):
            raise ValueError(f"mode must be 'verified' or 'pass_through', got {self.mode!r}")
        if self.after_rejections not in ("least_risky", "fail"):
            raise ValueError(f"after_rejections must be 'least_risky' or 'fail', got {self.after_rejections!r}")
        if (isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real)
                or not math.isfinite(self.tau) or not 0.0 <= self.tau <= 1.0):
            raise ValueError(f"tau must be a finite number in [0, 1], got {self.tau!r}")
        _check_count("n_resample", self.n_resample, 0)
        _check_count("max_rollbacks", self.max_rollbacks, 0)
        _check_count("max_replans", self.max_replans, 0)
        _check_count("max_retries_subgoal", self.max_retries_subgoal, 0)
        _check_count("max_retries_episode", self.max_retries_episode, 0)
        _check_count("max_chunks_per_attempt", self.max_chunks_per_attempt, 1)
        if (isinstance(self.time_budget_s, bool) or not isinstance(self.time_budget_s, numbers.Real)
                or not math.isfinite(self.time_budget_s) or self.time_budget_s <= 0):
            raise ValueError(f"time_budget_s must be a finite number > 0, got {self.time_budget_s!r}")
        if not isinstance(self.ladder, (tuple, list)):
            raise ValueError(f"ladder must be a list of rungs from {list(RECOVERY_RUNGS)}, got {self.ladder!r}")
        unknown = [rung for rung in self.ladder if rung not in RECOVERY_RUNGS]
        if unknown:
            raise ValueError(f"ladder has unknown rung(s) {unknown}; allowed: {list(RECOVERY_RUNGS)}")
        if len(set(self.ladder)) != len(self.ladder):
            raise ValueError(f"ladder must not repeat a rung, got {list(self.ladder)}")
        object.__setattr__(self, "ladder", tuple(self.ladder))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "time_budget_s", float(self.time_budget_s))


# -- records -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Transition:
    """One state change. Counters are those in force when it is recorded: `resamples` is the
    current resample streak, `rollbacks`/`retries_subgoal` count at the current subgoal,
    `replans`/`retries_episode` over the episode."""

    seq: int
    time_s: float
    from_state: str
    to_state: str
    subgoal_index: int
    subgoal: str
    reason: str
    p_fail: float | None
    attempt: int
    resamples: int
    rollbacks: int
    replans: int
    retries_subgoal: int
    retries_episode: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "time_s": round(self.time_s, 6), "from_state": self.from_state,
            "to_state": self.to_state, "subgoal_index": self.subgoal_index, "subgoal": self.subgoal,
            "reason": self.reason, "p_fail": self.p_fail, "attempt": self.attempt,
            "resamples": self.resamples, "rollbacks": self.rollbacks, "replans": self.replans,
            "retries_subgoal": self.retries_subgoal, "retries_episode": self.retries_episode,
        }


SubgoalOutcomeKind = Literal["reached", "failed", "held", "replanned"]


@dataclass(frozen=True)
class SubgoalOutcome:
    """How one attempt at a subgoal ended; a subgoal reached again after a rollback to an
    earlier keyframe appears twice."""

    index: int
    name: str
    outcome: SubgoalOutcomeKind
    chunks: int
    retries: int
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "outcome": self.outcome, "chunks": self.chunks,
                "retries": self.retries, "duration_s": round(self.duration_s, 6)}


@dataclass
class HarnessResult:
    success: bool
    final_state: HarnessState
    reason: str
    subgoals: list[SubgoalOutcome]
    resamples: int
    rollbacks: int
    replans: int
    rejections: int
    verifier_calls: int
    chunks_executed: int
    elapsed_s: float
    transitions: list[Transition]

    def as_dict(self) -> dict[str, Any]:
        return {
            "success": self.success, "final_state": self.final_state.value, "reason": self.reason,
            "subgoals": [s.as_dict() for s in self.subgoals], "resamples": self.resamples,
            "rollbacks": self.rollbacks, "replans": self.replans, "rejections": self.rejections,
            "verifier_calls": self.verifier_calls, "chunks_executed": self.chunks_executed,
            "elapsed_s": round(self.elapsed_s, 6), "transitions": [t.as_dict() for t in self.transitions],
        }


# -- the controller ----------------------------------------------------------------------
class HarnessFault(Exception):
    """A collaborator raised or answered something unusable; the episode goes to HOLD."""


@dataclass
class _SubgoalCounters:
    """Bookkeeping for the subgoal being worked on; reset when it is reached or replaced."""

    started_s: float
    attempt: int = 0
    resample_streak: int = 0  # resamples since the subgoal began or was rolled back (both kinds)
    proposals_resampled: int = 0  # rejected proposals resampled at the current decision
    attempts_resampled: int = 0  # failed attempts resampled since the last rollback
    rollbacks: int = 0
    retries: int = 0
    chunks: int = 0
    chunks_in_attempt: int = 0


@dataclass
class _Episode:
    instruction: str
    start_s: float
    current: _SubgoalCounters
    subgoals: list[Subgoal] = field(default_factory=list)
    index: int = 0
    resamples: int = 0
    rollbacks: int = 0
    replans: int = 0
    retries: int = 0
    rejections: int = 0
    verifier_calls: int = 0
    chunks_executed: int = 0
    observation: Observation | None = None
    chunk: ActionChunk | None = None
    report: ExecutionReport | None = None
    rollback_to: VerifiedKeyframe | None = None
    # Proposals verified at the current decision (p_fail, chunk); cleared when a chunk runs
    # or the world or the plan changes.
    candidates: list[tuple[float, ActionChunk]] = field(default_factory=list)
    new_sample: bool = False  # a recovery asked for a new sample: the next proposal is one
    resample_after_rejection: bool = False
    reason: str = ""
    transitions: list[Transition] = field(default_factory=list)
    outcomes: list[SubgoalOutcome] = field(default_factory=list)

    @property
    def subgoal(self) -> Subgoal | None:
        return self.subgoals[self.index] if self.index < len(self.subgoals) else None


class HarnessController:
    """Runs one task episode at a time; see the module docstring for the state machine.

    `clock` returns seconds (time.monotonic by default; pass the simulator's clock to
    budget sim time). `memory` defaults to a KeyframeLog.
    """

    def __init__(
        self,
        config: HarnessControllerConfig,
        policy: ChunkProposer,
        env: HarnessEnv,
        verifier: FailurePredictor | None = None,
        planner: SubgoalPlanner | None = None,
        memory: KeyframeStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(config, HarnessControllerConfig):
            raise TypeError(f"config must be a HarnessControllerConfig, got {type(config).__name__}")
        if config.mode == "verified":
            if verifier is None:
                raise ValueError("mode 'verified' needs a verifier (use mode 'pass_through' to run without one)")
            if "replan" in config.ladder and planner is None:
                raise ValueError("ladder includes 'replan' but no planner was given; remove the rung or pass a planner")
        self.config = config
        self.policy = policy
        self.env = env
        self.verifier = verifier
        self.planner = planner
        self.memory: KeyframeStore = memory if memory is not None else KeyframeLog()
        self.clock = clock
        self._handlers: dict[HarnessState, Callable[[_Episode], HarnessState]] = {
            HarnessState.START: self._start,
            HarnessState.PLAN: self._plan,
            HarnessState.PROPOSE: self._propose,
            HarnessState.VERIFY: self._verify,
            HarnessState.EXECUTE: self._execute,
            HarnessState.CHECK: self._check,
            HarnessState.RESAMPLE: self._resample,
            HarnessState.ROLLBACK: self._rollback,
            HarnessState.REPLAN: self._replan,
        }

    @property
    def verifying(self) -> bool:
        return self.config.mode == "verified"

    # -- entry point -----------------------------------------------------------------------
    def run(self, instruction: str, subgoals: Sequence[Subgoal] | None = None) -> HarnessResult:
        """Run one episode: the given `subgoals` in order, or the planner's plan for
        `instruction`. Returns DONE, FAILED or HOLD; raises only on bad arguments."""
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        if subgoals is None and self.planner is None:
            raise ValueError("run() needs subgoals when the controller has no planner")
        if subgoals is not None:
            _check_subgoals(subgoals, "subgoals")
        start_s = self.clock()
        ep = _Episode(instruction, start_s, _SubgoalCounters(start_s), subgoals=list(subgoals or []))
        state = HarnessState.START
        try:
            while state not in TERMINAL_STATES:
                elapsed = self.clock() - ep.start_s
                if elapsed > self.config.time_budget_s:
                    state = self._fail(ep, state, f"time budget of {self.config.time_budget_s:g} s exceeded "
                                                  f"({elapsed:.3g} s elapsed)")
                    break
                state = self._handlers[state](ep)
        except HarnessFault as exc:
            state = self._hold(ep, state, str(exc))
        except Exception as exc:  # a bug here must still leave the robot held, not moving
            logger.exception("harness controller error in state %s", state.value)
            state = self._hold(ep, state, f"internal error in state {state.value}: {type(exc).__name__}: {exc}")
        except BaseException:
            self._safe_hold()  # interrupted (Ctrl-C, shutdown): stop the robot, then let it propagate
            raise
        return HarnessResult(
            success=state is HarnessState.DONE, final_state=state, reason=ep.reason, subgoals=ep.outcomes,
            resamples=ep.resamples, rollbacks=ep.rollbacks, replans=ep.replans, rejections=ep.rejections,
            verifier_calls=ep.verifier_calls, chunks_executed=ep.chunks_executed,
            elapsed_s=self.clock() - ep.start_s, transitions=ep.transitions,
        )

    # -- states ------------------------------------------------------------------------------
    def _start(self, ep: _Episode) -> HarnessState:
        if not ep.subgoals:
            return self._to(ep, HarnessState.START, HarnessState.PLAN, "no subgoals given: planning from the instruction")
        self._mark_subgoal_start(ep, "episode_start")
        return self._to(ep, HarnessState.START, HarnessState.PROPOSE, f"{len(ep.subgoals)} subgoals given")

    def _plan(self, ep: _Episode) -> HarnessState:
        subgoals = _guard("planner.plan", self.planner.plan, ep.instruction)
        _check_subgoals(subgoals, "planner.plan result", fault=True)
        ep.subgoals = list(subgoals)
        ep.current = _SubgoalCounters(self.clock())
        self._mark_subgoal_start(ep, "episode_start")
        names = [s.name for s in ep.subgoals]
        return self._to(ep, HarnessState.PLAN, HarnessState.PROPOSE, f"planner gave {len(names)} subgoals: {names}")

    def _propose(self, ep: _Episode) -> HarnessState:
        ep.observation = _guard("env.observe", self.env.observe)
        sample = ep.current.attempt if ep.new_sample else 0
        ep.new_sample = False
        chunk = _guard("policy.propose", self.policy.propose, ep.observation, ep.subgoal, sample)
        _check_chunk(chunk)
        ep.chunk = chunk
        if not self.verifying:
            return self._to(ep, HarnessState.PROPOSE, HarnessState.EXECUTE, "pass-through: forwarded without verification")
        return self._to(ep, HarnessState.PROPOSE, HarnessState.VERIFY,
                        f"chunk of {chunk.positions.shape[0]} steps proposed (sample {sample})")

    def _verify(self, ep: _Episode) -> HarnessState:
        ep.verifier_calls += 1
        raw = _guard("verifier.p_fail", self.verifier.p_fail, ep.observation, ep.chunk, ep.subgoal, self.memory)
        p_fail = _check_probability(raw)
        ep.candidates.append((p_fail, ep.chunk))
        tau = self.config.tau
        if p_fail <= tau:
            return self._to(ep, HarnessState.VERIFY, HarnessState.EXECUTE, f"accepted: p_fail {p_fail:.3f} <= tau {tau:g}",
                            p_fail=p_fail)
        ep.rejections += 1
        self._write(ep, "alarm", handle=None, verified=False)
        return self._recover(ep, HarnessState.VERIFY, f"rejected: p_fail {p_fail:.3f} > tau {tau:g}", p_fail=p_fail)

    def _execute(self, ep: _Episode) -> HarnessState:
        report = _guard("env.execute", self.env.execute, ep.chunk)
        if not isinstance(report, ExecutionReport):
            raise HarnessFault(f"env.execute returned {type(report).__name__}, expected an ExecutionReport")
        ep.report = report
        ep.candidates.clear()
        ep.current.proposals_resampled = 0
        ep.chunks_executed += 1
        ep.current.chunks += 1
        ep.current.chunks_in_attempt += 1
        reason = "chunk executed" if report.completed else f"chunk cut short: {report.detail or 'no detail given'}"
        return self._to(ep, HarnessState.EXECUTE, HarnessState.CHECK, reason)

    def _check(self, ep: _Episode) -> HarnessState:
        subgoal = ep.subgoal
        done = _guard("env.subgoal_done", self.env.subgoal_done, subgoal)
        if not isinstance(done, (bool, np.bool_)):
            raise HarnessFault(f"env.subgoal_done returned {done!r}, expected a bool")
        if done:
            self._close_subgoal(ep, "reached")
            ep.index += 1
            ep.current = _SubgoalCounters(self.clock())
            if ep.index == len(ep.subgoals):
                ep.reason = f"all {len(ep.subgoals)} subgoals reached"
                return self._to(ep, HarnessState.CHECK, HarnessState.DONE, ep.reason)
            self._mark_subgoal_start(ep, "subgoal_start")
            return self._to(ep, HarnessState.CHECK, HarnessState.PROPOSE,
                            f"subgoal {subgoal.name!r} reached; next {ep.subgoal.name!r}", notable=True)
        budget = self.config.max_chunks_per_attempt
        used = ep.current.chunks_in_attempt
        if used >= budget:
            trigger = f"subgoal {subgoal.name!r} not reached within {budget} chunks"
        elif self.verifying and not ep.report.completed:
            # The baseline never looks at execution reports; only the verified mode reacts.
            trigger = (f"subgoal {subgoal.name!r} not reached and the chunk was cut short: "
                       f"{ep.report.detail or 'no detail given'}")
        else:
            return self._to(ep, HarnessState.CHECK, HarnessState.PROPOSE,
                            f"subgoal {subgoal.name!r} not reached yet ({used}/{budget} chunks)")
        if not self.verifying:
            return self._fail(ep, HarnessState.CHECK, trigger)
        self._write(ep, "failure", handle=None, verified=False)
        return self._recover(ep, HarnessState.CHECK, trigger)

    def _resample(self, ep: _Episode) -> HarnessState:
        cur = ep.current
        if ep.resample_after_rejection:
            # Another proposal for the same decision: the chunk budget keeps counting.
            cur.proposals_resampled += 1
            cur.attempt += 1
            what = "another proposal for this decision"
        else:
            self._count_retry(ep)
            cur.attempts_resampled += 1
            what = "a new attempt"
        cur.resample_streak += 1
        ep.resamples += 1
        ep.new_sample = True
        return self._to(ep, HarnessState.RESAMPLE, HarnessState.PROPOSE,
                        f"asking the policy for {what} (sample {cur.attempt})")

    def _rollback(self, ep: _Episode) -> HarnessState:
        keyframe, ep.rollback_to = ep.rollback_to, None
        target = keyframe.subgoal_index
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target <= ep.index:
            raise HarnessFault(f"memory.last_verified gave subgoal_index {target!r}; expected an int in [0, {ep.index}]")
        target = int(target)
        _guard("env.restore", self.env.restore, keyframe.handle)
        self._count_retry(ep)
        ep.current.resample_streak = ep.current.proposals_resampled = ep.current.attempts_resampled = 0
        ep.candidates.clear()
        ep.new_sample = True
        ep.current.rollbacks += 1
        ep.rollbacks += 1
        if target < ep.index:
            # The keyframe lies before subgoals already reached: they are undone and will be
            # run again; the counters carry over so the episode caps still bound the loop.
            ep.index = target
        return self._to(ep, HarnessState.ROLLBACK, HarnessState.PROPOSE,
                        f"restored the last verified keyframe; resuming at subgoal {ep.subgoal.name!r}")

    def _replan(self, ep: _Episode) -> HarnessState:
        ep.observation = _guard("env.observe", self.env.observe)
        done = list(ep.subgoals[:ep.index])
        remaining = _guard("planner.replan", self.planner.replan, ep.instruction, done, ep.observation)
        _check_subgoals(remaining, "planner.replan result", fault=True, allow_empty=True)
        replaced = ep.subgoal.name
        ep.retries += 1
        ep.replans += 1
        ep.current.retries += 1
        self._close_subgoal(ep, "replanned")
        ep.candidates.clear()
        ep.subgoals = done + list(remaining)
        if not remaining:
            # The planner found every remaining effect already satisfied in the observed state.
            return self._to(ep, HarnessState.REPLAN, HarnessState.DONE,
                            f"replanning {replaced!r}: the planner finds nothing left to do")
        ep.current = _SubgoalCounters(self.clock())
        names = [s.name for s in remaining]
        return self._to(ep, HarnessState.REPLAN, HarnessState.PROPOSE,
                        f"replaced {replaced!r} and the rest by {len(names)} subgoals: {names}")

    # -- recovery ladder ---------------------------------------------------------------------
    def _recover(self, ep: _Episode, source: HarnessState, trigger: str, p_fail: float | None = None) -> HarnessState:
        """Pick the first usable rung for a rejected chunk or a failed check, or give up.
        A retry cap stops the rungs that start a new attempt; another proposal for a rejected
        decision is not one."""
        cfg = self.config
        cur = ep.current
        capped = ""
        if ep.retries >= cfg.max_retries_episode:
            capped = f"episode retry cap reached ({ep.retries}/{cfg.max_retries_episode} max_retries_episode)"
        elif cur.retries >= cfg.max_retries_subgoal:
            capped = f"subgoal retry cap reached ({cur.retries}/{cfg.max_retries_subgoal} max_retries_subgoal)"
        rejected = source is HarnessState.VERIFY
        resampled = cur.proposals_resampled if rejected else cur.attempts_resampled
        for rung in cfg.ladder:
            if rung == "resample" and resampled < cfg.n_resample and (rejected or not capped):
                ep.resample_after_rejection = rejected
                return self._to(ep, source, HarnessState.RESAMPLE,
                                f"{trigger}; resample {resampled + 1}/{cfg.n_resample}", p_fail)
            if capped:
                continue
            if rung == "rollback" and cur.rollbacks < cfg.max_rollbacks:
                keyframe = _guard("memory.last_verified", self.memory.last_verified)
                if keyframe is not None and keyframe.handle is not None:
                    ep.rollback_to = keyframe
                    return self._to(ep, source, HarnessState.ROLLBACK,
                                    f"{trigger}; rollback {cur.rollbacks + 1}/{cfg.max_rollbacks}", p_fail)
            if rung == "replan" and ep.replans < cfg.max_replans:
                return self._to(ep, source, HarnessState.REPLAN,
                                f"{trigger}; replan {ep.replans + 1}/{cfg.max_replans}", p_fail)
        if capped:
            return self._give_up(ep, source, f"{trigger}; {capped}", p_fail)
        usage = ", ".join(self._rung_usage(ep, rung, resampled) for rung in cfg.ladder) or "no rungs enabled"
        return self._give_up(ep, source, f"{trigger}; recovery ladder exhausted ({usage})", p_fail)

    def _give_up(self, ep: _Episode, source: HarnessState, reason: str, p_fail: float | None) -> HarnessState:
        """No recovery left. A failed check fails the episode; a rejection only predicts a
        failure, so under `least_risky` the decision's lowest-p_fail proposal runs instead."""
        if source is not HarnessState.VERIFY or self.config.after_rejections == "fail":
            return self._fail(ep, source, reason, p_fail)
        best_p, ep.chunk = min(ep.candidates, key=lambda candidate: candidate[0])
        return self._to(ep, source, HarnessState.EXECUTE,
                        f"{reason}; executing the least risky of {len(ep.candidates)} proposals "
                        f"(p_fail {best_p:.3f})", p_fail)

    def _rung_usage(self, ep: _Episode, rung: str, resampled: int) -> str:
        cfg = self.config
        if rung == "resample":
            return f"resample {resampled}/{cfg.n_resample}"
        if rung == "rollback":
            return f"rollback {ep.current.rollbacks}/{cfg.max_rollbacks}"
        return f"replan {ep.replans}/{cfg.max_replans}"

    @staticmethod
    def _count_retry(ep: _Episode) -> None:
        """A rollback, a replan or a resample after a failed check is a new attempt: a fresh
        chunk budget and a new sample index."""
        ep.retries += 1
        ep.current.retries += 1
        ep.current.attempt += 1
        ep.current.chunks_in_attempt = 0

    # -- keyframes ---------------------------------------------------------------------------
    def _mark_subgoal_start(self, ep: _Episode, kind: str) -> None:
        """A subgoal start is a verified point (the previous predicate held, or the episode
        just began): snapshot it as the rollback target. Pass-through keeps no keyframes."""
        if not self.verifying:
            return
        ep.observation = _guard("env.observe", self.env.observe)
        handle = _guard("env.snapshot", self.env.snapshot)
        self._write(ep, kind, handle=handle, verified=True)

    def _write(self, ep: _Episode, kind: str, handle: Any, verified: bool) -> None:
        _guard("memory.write", self.memory.write, kind, ep.index, ep.subgoal, ep.observation, handle, verified)

    # -- endings and records -----------------------------------------------------------------
    def _close_subgoal(self, ep: _Episode, outcome: SubgoalOutcomeKind) -> None:
        subgoal = ep.subgoal
        if subgoal is None:
            return
        cur = ep.current
        ep.outcomes.append(SubgoalOutcome(ep.index, subgoal.name, outcome, cur.chunks, cur.retries,
                                          self.clock() - cur.started_s))

    def _fail(self, ep: _Episode, source: HarnessState, reason: str, p_fail: float | None = None) -> HarnessState:
        ep.reason = reason
        self._close_subgoal(ep, "failed")
        return self._to(ep, source, HarnessState.FAILED, reason, p_fail)

    def _hold(self, ep: _Episode, source: HarnessState, reason: str) -> HarnessState:
        hold_error = self._safe_hold()
        ep.reason = f"{reason}; env.hold also failed: {hold_error}" if hold_error else reason
        self._close_subgoal(ep, "held")
        return self._to(ep, source, HarnessState.HOLD, ep.reason)

    def _safe_hold(self) -> str:
        """Ask the environment to hold; returns the error text when even that fails."""
        try:
            self.env.hold()
        except Exception as exc:
            logger.exception("env.hold failed")
            return f"{type(exc).__name__}: {exc}"
        return ""

    def _to(self, ep: _Episode, source: HarnessState, target: HarnessState, reason: str,
            p_fail: float | None = None, notable: bool = False) -> HarnessState:
        subgoal = ep.subgoal
        cur = ep.current
        record = Transition(
            seq=len(ep.transitions), time_s=self.clock() - ep.start_s, from_state=source.value, to_state=target.value,
            subgoal_index=ep.index, subgoal=subgoal.name if subgoal is not None else "", reason=reason,
            p_fail=p_fail, attempt=cur.attempt, resamples=cur.resample_streak, rollbacks=cur.rollbacks,
            replans=ep.replans, retries_subgoal=cur.retries, retries_episode=ep.retries,
        )
        ep.transitions.append(record)
        if target in (HarnessState.HOLD, HarnessState.FAILED):
            level = logging.WARNING
        elif target in _NOTABLE_TARGETS or notable:
            level = logging.INFO
        else:
            level = logging.DEBUG  # the per-chunk propose/verify/execute/check loop
        logger.log(level, "harness %s -> %s [subgoal %d %r] %s", source.value, target.value, record.subgoal_index,
                   record.subgoal, reason)
        return target


# -- validation of what collaborators return ----------------------------------------------
def _guard(label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a collaborator; any exception becomes a HarnessFault naming the call."""
    try:
        return fn(*args)
    except Exception as exc:
        raise HarnessFault(f"{label} raised {type(exc).__name__}: {exc}") from exc


def _check_probability(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise HarnessFault(f"verifier.p_fail returned {value!r}, expected a number in [0, 1]")
    p = float(value)
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise HarnessFault(f"verifier.p_fail returned {p!r}, expected a finite number in [0, 1]")
    return p


def _check_chunk(chunk: Any) -> None:
    if not isinstance(chunk, ActionChunk):
        raise HarnessFault(f"policy.propose returned {type(chunk).__name__}, expected an ActionChunk")
    if chunk.positions.shape[0] == 0:
        raise HarnessFault("policy.propose returned an empty chunk")
    if not (np.all(np.isfinite(chunk.positions)) and np.all(np.isfinite(chunk.times_s))):
        raise HarnessFault("policy.propose returned a chunk with non-finite positions or times")


def _check_subgoals(subgoals: Any, what: str, fault: bool = False, allow_empty: bool = False) -> None:
    """Subgoals must be a sequence (non-empty unless allow_empty) of objects with a non-empty
    str `name`. Caller errors raise ValueError; a planner's bad answer is a HarnessFault (HOLD)."""
    error = HarnessFault if fault else ValueError
    if isinstance(subgoals, (str, bytes)) or not isinstance(subgoals, Sequence):
        raise error(f"{what} must be a sequence of subgoals, got {type(subgoals).__name__}")
    if not subgoals and not allow_empty:
        raise error(f"{what} is empty")
    for i, subgoal in enumerate(subgoals):
        name = getattr(subgoal, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise error(f"{what}[{i}] has no non-empty str name: {subgoal!r}")
