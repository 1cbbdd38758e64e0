"""Task planner: a natural-language instruction -> the ordered subgoals the harness runs.

HELM splits a long-horizon instruction into subgoals before any action is taken, and asks
again for the remaining ones when recovery climbs to the REPLAN rung (papers/helm.md). The
subgoals are the task suite's own type, `sim.tasks.spec.SubgoalSpec` (a name plus a
predicate call such as ``in(red_cube, bowl)``), so a plan can be checked with the same
predicates the task specs use.

Two planners share one interface (`Planner.plan`, `Planner.replan`):

* `RulePlanner` works offline. It splits the instruction into clauses at ``,``/``and``/
  ``then`` and reads each clause with a small template grammar:

      pick up | lift X            -> grasped(X), lifted(X)
      grasp | grab X              -> grasped(X)
      put | place | set X in Y    -> [grasped(X)], in(X, Y)       (grasp unless X is held)
      put | place | set X on Y    -> [grasped(X)], on(X, Y)
      stack X on Y                -> [grasped(X)], on(X, Y)
      push | slide X into Y       -> at(X, Y)                     (Y is a region, e.g. a zone)
      open X / close | shut X     -> open(X) / closed(X)
      release X                   -> released(X)

  A clause without a verb reuses the previous one ("put A in B, C in D"); a placement
  without a destination takes the next clause's ("put A and then C in the tray"); "it"
  is the most recent thing that fits the slot (the held object for the moved one). Noun
  phrases are "the <words> <kind>" and map to object names by joining with "_" ("the
  red cube" -> ``red_cube``, "the far zone" -> ``far_zone``). Every predicate is checked
  with `sim.tasks.predicates.check_predicate` against the scene when one is given, else
  against the kinds the phrases name. Anything else raises `PlanningError` naming the
  fragment that could not be read.

* `LLMPlanner` (optional) asks an OpenAI-compatible chat-completions endpoint for the
  subgoals as JSON in the same schema, validates the reply strictly (unknown predicate or
  object -> rejected) and, on any failure (unreachable, timeout, HTTP error, malformed
  JSON, invalid plan), logs a warning with the reason and returns the rule plan. Nothing
  else in the stack needs it.

Replanning (`Planner.replan`) keeps the plan's subgoals that are not yet satisfied, in
order; see its docstring for how done subgoals and the observed world state are used.
Core module: no ROS imports (DESIGN.md rule 1).
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from policies.base import Observation
from runtime.config import ConfigError
from sim.tasks.geometry import ALL_KINDS, RegionGeometry, SceneGeometry, object_geometry
from sim.tasks.predicates import PREDICATES, PredicateCall, PredicateError, check_predicate, evaluate, parse_predicate
from sim.tasks.spec import SubgoalSpec
from sim.world_state import WorldState

logger = logging.getLogger(__name__)

#: The kind recorded for a task region (a push target); objects use their geometry kind.
REGION = "region"
#: Hand-state predicates: steps towards the next placement, not lasting effects.
TRANSIENT_PREDICATES = frozenset({"grasped", "released", "not_grasped", "lifted"})
#: An LLM reply with more subgoals than this is rejected (the suite's tasks have 3-6).
MAX_LLM_SUBGOALS = 16
#: Replies larger than this are rejected unread: a plan is a few hundred bytes.
MAX_REPLY_BYTES = 1 << 20

Facts = WorldState | Mapping[str, bool] | Observation | None


class PlanningError(ValueError):
    """An instruction (or a planner's answer) cannot be turned into valid subgoals.

    `fragment` is the part of the instruction that could not be read, when there is one.
    """

    def __init__(self, message: str, fragment: str | None = None) -> None:
        super().__init__(message)
        self.fragment = fragment


# -- the template grammar ------------------------------------------------------------------
_PICK_VERBS = ("pick up", "lift", "grasp", "grab")
_PLACE_VERBS = ("put", "place", "set", "stack")
_PUSH_VERBS = ("push", "slide")
_FIXTURE_VERBS = ("open", "close", "shut")
_RELEASE_VERBS = ("release",)
_PLACE_PREPS = ("on top of", "inside", "into", "onto", "in", "on")  # longest first for the regex
_IN_PREPS = frozenset({"in", "into", "inside"})
_PUSH_PREPS = ("into", "onto", "to", "in")
_HEAD_ZONE = "zone"

# Words that end a noun phrase's modifiers, so "the red cube in the bowl" never reads
# "cube in the" as modifiers of "bowl".
_RESERVED = sorted(
    {w for phrase in _PICK_VERBS + _PLACE_VERBS + _PUSH_VERBS + _FIXTURE_VERBS + _RELEASE_VERBS
     + _PLACE_PREPS + _PUSH_PREPS for w in phrase.split()}
    | {"the", "it", "and", "then", "of"},
    key=len, reverse=True,
)
_MOD = rf"(?!(?:{'|'.join(_RESERVED)})\b)[a-z][a-z0-9]*"
_SPLIT_RE = re.compile(r"(?:\s*(?:[,;]|\band\b|\bthen\b|\bafter that\b|\bfinally\b)\s*)+")
_LEADING_RE = re.compile(r"^(?:please|first|next)\s+")


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return text.rstrip(".!").strip()


@dataclass(frozen=True)
class _Entity:
    name: str

    @property
    def phrase(self) -> str:
        return "the " + self.name.replace("_", " ")


class _Vocabulary:
    """Maps noun phrases to scene names and builds the geometry predicates are checked on."""

    def __init__(self, scene: SceneGeometry | None) -> None:
        self.scene = scene
        self.kinds: dict[str, str] = {}
        if scene is not None:
            self.kinds = {name: g.kind for name, g in scene.objects.items()}
            self.kinds.update({name: REGION for name in scene.regions})
        heads = set(ALL_KINDS) | {_HEAD_ZONE} | {name.rsplit("_", 1)[-1] for name in self.kinds}
        self.np_pattern = rf"(?:it|(?:the )?(?:{_MOD} ){{0,3}}(?:{_alternation(sorted(heads))}))"
        self._np_re = re.compile(rf"^(?:the )?((?:{_MOD} ){{0,3}})({_alternation(sorted(heads))})$")
        self.mentioned: dict[str, str] = {}  # name -> kind, for scene-less checking

    def resolve(self, phrase: str) -> _Entity:
        m = self._np_re.match(phrase)
        if m is None:
            raise PlanningError(f"cannot read {phrase!r} as an object", phrase)
        modifiers, head = m.group(1).split(), m.group(2)
        name = "_".join([*modifiers, head])
        if self.scene is None:
            kind = REGION if head == _HEAD_ZONE else head
        elif name in self.kinds:
            kind = self.kinds[name]
        else:
            # "the bowl" may name the scene's only bowl even when it is called "grey_bowl".
            matches = [n for n, k in self.kinds.items()
                       if not modifiers and (k == head or n.rsplit("_", 1)[-1] == head)]
            if len(matches) != 1:
                raise PlanningError(f"{phrase!r} names no single object or region of the scene "
                                    f"(scene: {sorted(self.kinds)})", phrase)
            name, kind = matches[0], self.kinds[matches[0]]
        self.mentioned[name] = kind
        return _Entity(name)

    def geometry(self) -> SceneGeometry:
        if self.scene is not None:
            return self.scene
        return _geometry_from_kinds(self.mentioned)


def _geometry_from_kinds(kinds: Mapping[str, str]) -> SceneGeometry:
    """A scene made only of names and kinds, for checking argument roles without a scene.

    Regions get an empty extent: the text does not say where they are, and
    `check_predicate` reads only their names.
    """
    return SceneGeometry(
        objects={n: object_geometry(n, k) for n, k in kinds.items() if k != REGION},
        regions={n: RegionGeometry(n, (0.0, 0.0), (0.0, 0.0)) for n, k in kinds.items() if k == REGION},
    )


def mentioned_kinds(instruction: str) -> dict[str, str]:
    """Objects and regions an instruction names as "the <words> <kind>", with their kinds."""
    vocabulary = _Vocabulary(None)
    for m in re.finditer(rf"\b{vocabulary.np_pattern}\b", _normalize(instruction)):
        if m.group(0) != "it" and m.group(0).startswith("the "):
            vocabulary.resolve(m.group(0))
    return dict(vocabulary.mentioned)


@dataclass
class _Pending:
    """A placement whose destination comes in a later clause ("put A and then B in the tray")."""

    action: str
    verb: str
    obj: _Entity
    clause: str


class _PlanBuilder:
    """Reads clauses in order and emits subgoals, tracking the held object and mentions."""

    def __init__(self, vocabulary: _Vocabulary) -> None:
        self.vocab = vocabulary
        self.subgoals: list[SubgoalSpec] = []
        self.held: str | None = None
        self.mentions: list[str] = []
        self.last_action: tuple[str, str] | None = None  # (action, verb) for verbless clauses
        self.pending: list[_Pending] = []
        np_ = vocabulary.np_pattern
        place = _alternation(_PLACE_PREPS)
        push = _alternation(_PUSH_PREPS)
        self.patterns: list[tuple[str, re.Pattern[str]]] = [
            ("pick", re.compile(rf"(?P<verb>{_alternation(_PICK_VERBS)}) (?P<obj>{np_})")),
            ("pick", re.compile(rf"(?P<verb>pick) (?P<obj>{np_}) up")),
            ("place", re.compile(rf"(?P<verb>{_alternation(_PLACE_VERBS)}) (?P<obj>{np_})(?: (?P<prep>{place}) (?P<dest>{np_}))?")),
            ("push", re.compile(rf"(?P<verb>{_alternation(_PUSH_VERBS)}) (?P<obj>{np_})(?: (?P<prep>{push}) (?P<dest>{np_}))?")),
            ("fixture", re.compile(rf"(?P<verb>{_alternation(_FIXTURE_VERBS)}) (?P<obj>{np_})")),
            ("release", re.compile(rf"(?P<verb>{_alternation(_RELEASE_VERBS)}) (?P<obj>{np_})")),
        ]
        either = _alternation(sorted(set(_PLACE_PREPS) | set(_PUSH_PREPS)))
        self.elliptic = re.compile(rf"(?P<obj>{np_})(?: (?P<prep>{either}) (?P<dest>{np_}))?")

    # -- clauses --------------------------------------------------------------------------
    def clause(self, clause: str) -> None:
        clause = _LEADING_RE.sub("", clause)
        for action, pattern in self.patterns:
            m = pattern.fullmatch(clause)
            if m is not None:
                self._dispatch(action, m.group("verb"), m.groupdict(), clause)
                return
        m = self.elliptic.fullmatch(clause)
        if m is not None:
            if self.last_action is None:
                raise PlanningError(f"cannot parse {clause!r}: no verb says what to do with it", clause)
            action, verb = self.last_action
            prep = m.group("prep")
            allowed = {"place": _PLACE_PREPS, "push": _PUSH_PREPS}.get(action, ())
            if prep is not None and prep not in allowed:
                raise PlanningError(f"cannot parse {clause!r}: {verb!r} takes no destination with {prep!r}", clause)
            self._dispatch(action, verb, m.groupdict(), clause)
            return
        raise PlanningError(
            f"cannot parse {clause!r}; known verbs: "
            f"{', '.join(_PICK_VERBS + _PLACE_VERBS + _PUSH_VERBS + _FIXTURE_VERBS + _RELEASE_VERBS)}",
            clause,
        )

    def _dispatch(self, action: str, verb: str, groups: dict[str, str | None], clause: str) -> None:
        self.last_action = (action, verb)
        obj_phrase = groups["obj"]
        assert obj_phrase is not None  # every pattern requires an object
        dest_phrase = groups.get("dest")
        if self.pending and not (action == self.pending[0].action and verb == self.pending[0].verb):
            raise PlanningError(f"{self.pending[0].clause!r} says nowhere to {self.pending[0].verb} it",
                                self.pending[0].clause)
        if action == "pick":
            self._pick(verb, self._resolve(obj_phrase, clause, lambda n: PredicateCall("grasped", (n,)), self.held), clause)
        elif action == "fixture":
            predicate = "open" if verb == "open" else "closed"
            entity = self._resolve(obj_phrase, clause, lambda n: PredicateCall(predicate, (n,)))
            self._emit(predicate, (entity,), f"{verb} {entity.phrase}", clause)
        elif action == "release":
            entity = self._resolve(obj_phrase, clause, lambda n: PredicateCall("released", (n,)), self.held)
            self._emit("released", (entity,), f"release {entity.phrase}", clause)
            self.held = None
        else:
            obj = self._resolve(obj_phrase, clause, lambda n: PredicateCall("grasped", (n,)), self.held)
            if dest_phrase is None:
                self.pending.append(_Pending(action, verb, obj, clause))
                return
            prep = groups["prep"]
            assert prep is not None  # the patterns capture prep and dest together
            predicate = "at" if action == "push" else ("in" if prep in _IN_PREPS else "on")
            dest = self._resolve(dest_phrase, clause, lambda n: PredicateCall(predicate, (obj.name, n)))
            for pending in self.pending:
                self._move(action, pending.verb, pending.obj, predicate, prep, dest, pending.clause)
            self.pending.clear()
            self._move(action, verb, obj, predicate, prep, dest, clause)

    def finish(self) -> list[SubgoalSpec]:
        if self.pending:
            raise PlanningError(f"{self.pending[0].clause!r} says nowhere to {self.pending[0].verb} it",
                                self.pending[0].clause)
        if not self.subgoals:
            raise PlanningError("instruction yields no subgoals")
        return self.subgoals

    # -- actions --------------------------------------------------------------------------
    def _pick(self, verb: str, obj: _Entity, clause: str) -> None:
        if self.held != obj.name:
            name = f"{verb} {obj.phrase}" if verb in ("grasp", "grab") else f"pick up {obj.phrase}"
            self._emit("grasped", (obj,), name, clause)
        if verb in ("pick up", "pick", "lift"):
            self._emit("lifted", (obj,), f"lift {obj.phrase}", clause)
        self.held = obj.name

    def _move(self, action: str, verb: str, obj: _Entity, predicate: str, prep: str, dest: _Entity, clause: str) -> None:
        if action == "place" and self.held != obj.name:
            self._emit("grasped", (obj,), f"pick up {obj.phrase}", clause)
        self._emit(predicate, (obj, dest), f"{verb} {obj.phrase} {prep} {dest.phrase}", clause)
        if self.held == obj.name:
            self.held = None

    def _emit(self, predicate: str, args: tuple[_Entity, ...], name: str, clause: str) -> None:
        call = PredicateCall(predicate, tuple(a.name for a in args))
        try:
            check_predicate(call, self.vocab.geometry())
        except PredicateError as exc:
            raise PlanningError(f"{clause!r}: {exc}", clause) from exc
        self.subgoals.append(SubgoalSpec(name, str(call)))

    # -- noun phrases ---------------------------------------------------------------------
    def _resolve(self, phrase: str, clause: str, call_for: Callable[[str], PredicateCall],
                 prefer: str | None = None) -> _Entity:
        """An explicit phrase names its object; "it" is the held object (`prefer`) or the
        most recent mention for which the predicate it would appear in is valid."""
        if phrase != "it":
            entity = self.vocab.resolve(phrase)
            self._mention(entity.name)
            return entity
        geometry = self.vocab.geometry()
        candidates = ([prefer] if prefer else []) + list(reversed(self.mentions))
        for name in candidates:
            try:
                check_predicate(call_for(name), geometry)
            except PredicateError:
                continue
            self._mention(name)
            return _Entity(name)
        raise PlanningError(f"'it' in {clause!r} refers to nothing mentioned before that fits", clause)

    def _mention(self, name: str) -> None:
        if name in self.mentions:
            self.mentions.remove(name)
        self.mentions.append(name)


# -- planners ------------------------------------------------------------------------------
class Planner(ABC):
    """instruction -> ordered subgoals; `replan` gives the ones still to do."""

    @abstractmethod
    def plan(self, instruction: str, scene: SceneGeometry | None = None) -> tuple[SubgoalSpec, ...]:
        """The ordered subgoals for `instruction`; with `scene`, names are checked against it."""

    def replan(self, instruction: str, done: Sequence[SubgoalSpec], observation: Facts = None,
               scene: SceneGeometry | None = None) -> tuple[SubgoalSpec, ...]:
        """The subgoals of `plan(instruction)` that are not yet satisfied, in order.

        `done` are subgoals already reached (each must be in the plan). `observation` says
        what holds now: an `Observation` (its task gives the scene, its privileged `world`
        the state; on a real robot `world` is None), a `WorldState` (needs `scene`), or a
        mapping from predicate strings such as ``"in(red_cube, bowl)"`` to truth values
        (a predicate it does not mention counts as not holding).

        Without a state, the remaining subgoals are the plan minus `done`. With one, the
        plan is read as segments, each ending at a lasting effect (in/on/at/open/closed)
        and led by hand steps (grasped/lifted/released):
          * a segment is skipped when its effect holds now, or when a later subgoal with
            the same subject is done (open(drawer) after closed(drawer) was reached) --
            unless an earlier kept subgoal touches one of its objects, since that work may
            undo it (closed(drawer) at the start of "open the drawer, ..., close it");
          * a done effect that no longer holds is kept (e.g. a cube knocked off its target);
          * inside a kept segment, hand steps that already hold are skipped.
        """
        if isinstance(observation, Observation):
            scene = scene if scene is not None else observation.task.geometry
            observation = observation.world
        plan = self.plan(instruction, scene)
        done_flags = _mark_done(plan, done)
        if observation is None:
            return tuple(sg for sg, is_done in zip(plan, done_flags) if not is_done)
        holds = _holds_function(observation, scene)
        calls = [parse_predicate(sg.predicate) for sg in plan]
        kept: list[SubgoalSpec] = []
        touched: set[str] = set()
        for segment in _segments(calls):
            goal = segment[-1] if calls[segment[-1]].name not in TRANSIENT_PREDICATES else None
            if goal is not None and not touched & set(calls[goal].args):
                superseded = any(done_flags[j] and calls[j].name not in TRANSIENT_PREDICATES
                                 and calls[j].args[0] == calls[goal].args[0] for j in range(goal + 1, len(plan)))
                if superseded or holds(calls[goal]):
                    continue
            for i in segment:
                if i != goal and not touched & set(calls[i].args) and holds(calls[i]):
                    continue
                kept.append(plan[i])
                touched.update(calls[i].args)
        return tuple(kept)


class RulePlanner(Planner):
    """The offline template planner (see the module docstring for the grammar)."""

    def plan(self, instruction: str, scene: SceneGeometry | None = None) -> tuple[SubgoalSpec, ...]:
        if not isinstance(instruction, str):
            raise PlanningError(f"instruction must be a str, got {type(instruction).__name__}")
        text = _normalize(instruction)
        if not text:
            raise PlanningError("instruction is empty")
        builder = _PlanBuilder(_Vocabulary(scene))
        for clause in _SPLIT_RE.split(text):
            if clause:
                builder.clause(clause)
        return tuple(builder.finish())


def _mark_done(plan: Sequence[SubgoalSpec], done: Sequence[SubgoalSpec]) -> list[bool]:
    """Which plan entries are done: each done subgoal marks the first unmarked entry with
    the same predicate (names may be worded differently)."""
    flags = [False] * len(plan)
    keys = [str(parse_predicate(sg.predicate)) for sg in plan]
    for sg in done:
        predicate = getattr(sg, "predicate", None)
        if not isinstance(predicate, str):
            raise PlanningError(f"done subgoal {sg!r} has no predicate string")
        try:
            key = str(parse_predicate(predicate))
        except PredicateError as exc:
            raise PlanningError(f"done subgoal {sg!r}: {exc}") from exc
        for i, k in enumerate(keys):
            if k == key and not flags[i]:
                flags[i] = True
                break
        else:
            raise PlanningError(f"done subgoal {key!r} is not in the plan {keys}")
    return flags


def _segments(calls: Sequence[PredicateCall]) -> list[list[int]]:
    segments: list[list[int]] = [[]]
    for i, call in enumerate(calls):
        segments[-1].append(i)
        if call.name not in TRANSIENT_PREDICATES:
            segments.append([])
    return [s for s in segments if s]


def _holds_function(observation: WorldState | Mapping[str, bool], scene: SceneGeometry | None
                    ) -> Callable[[PredicateCall], bool]:
    if isinstance(observation, WorldState):
        if scene is None:
            raise PlanningError("replanning on a WorldState needs the scene geometry (pass scene=)")
        return lambda call: evaluate(call, observation, scene)
    if isinstance(observation, Mapping):
        facts: dict[str, bool] = {}
        for key, value in observation.items():
            if not isinstance(value, bool):
                raise PlanningError(f"fact {key!r} must be a bool, got {value!r}")
            try:
                facts[str(parse_predicate(key))] = value
            except PredicateError as exc:
                raise PlanningError(f"fact {key!r}: {exc}") from exc
        return lambda call: facts.get(str(call), False)
    raise PlanningError(f"observation must be an Observation, a WorldState or a mapping of facts, "
                        f"got {type(observation).__name__}")


# -- the optional LLM planner ----------------------------------------------------------------
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LLMPlannerConfig:
    """An OpenAI-compatible chat-completions endpoint; an empty `base_url` means none.

    `base_url` is the API root (``http://127.0.0.1:8000/v1``); requests go to
    ``{base_url}/chat/completions``. `timeout_s` bounds connecting and each read.
    `api_key_env` names the environment variable holding the key (sent as a Bearer
    token); the key itself never appears in a config file.
    """

    base_url: str = ""
    model: str = ""
    timeout_s: float = 10.0
    api_key_env: str | None = None
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.enabled:
            parts = urllib.parse.urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"base_url must be empty (no LLM) or an http(s) URL with a host, got {self.base_url!r}")
            if not self.model.strip():
                raise ValueError(f"model must be set when base_url is, got {self.model!r}")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s!r}")
        if self.api_key_env is not None and not _ENV_NAME_RE.match(self.api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, got {self.api_key_env!r}")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must lie within [0, 2], got {self.temperature!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


@dataclass(frozen=True)
class PlannerConfig:
    """Which planner the harness uses: the rule planner, plus an LLM endpoint if `llm.base_url` is set."""

    llm: LLMPlannerConfig = field(default_factory=LLMPlannerConfig)


def make_planner(config: PlannerConfig) -> Planner:
    return LLMPlanner(config.llm) if config.llm.enabled else RulePlanner()


class LLMPlanner(Planner):
    """Plans through a chat-completions endpoint; falls back to `fallback` on any failure."""

    def __init__(self, config: LLMPlannerConfig, fallback: Planner | None = None) -> None:
        if not config.enabled:
            raise ConfigError("LLMPlannerConfig.base_url: an LLM planner needs an endpoint URL")
        self.config = config
        self.fallback = fallback if fallback is not None else RulePlanner()
        self._api_key: str | None = None
        if config.api_key_env is not None:
            self._api_key = os.environ.get(config.api_key_env) or None
            if self._api_key is None:
                raise ConfigError(f"LLMPlannerConfig.api_key_env: environment variable {config.api_key_env} is not set")
        self.endpoint = config.base_url.rstrip("/") + "/chat/completions"

    def plan(self, instruction: str, scene: SceneGeometry | None = None) -> tuple[SubgoalSpec, ...]:
        kinds = _scene_kinds(scene) if scene is not None else mentioned_kinds(instruction)
        try:
            content = self._complete(_messages(instruction, kinds))
            return parse_llm_plan(content, scene if scene is not None else _geometry_from_kinds(kinds))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = _describe_failure(exc)
        logger.warning("LLM planner at %s failed (%s); falling back to the rule planner", self.endpoint, reason)
        try:
            return self.fallback.plan(instruction, scene)
        except PlanningError as exc:
            raise PlanningError(f"{exc} (the LLM planner failed too: {reason})", exc.fragment) from exc

    def _complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.config.model, "messages": messages,
                           "temperature": self.config.temperature}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            raw = response.read(MAX_REPLY_BYTES + 1)
        if len(raw) > MAX_REPLY_BYTES:
            raise PlanningError(f"reply is larger than {MAX_REPLY_BYTES} bytes")
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise PlanningError(f"reply lacks choices[0].message.content ({type(exc).__name__}: {exc})") from exc
        if not isinstance(content, str):
            raise PlanningError(f"choices[0].message.content must be a string, got {type(content).__name__}")
        return content


def _scene_kinds(scene: SceneGeometry) -> dict[str, str]:
    kinds = {name: g.kind for name, g in scene.objects.items()}
    kinds.update({name: REGION for name in scene.regions})
    return kinds


def _messages(instruction: str, kinds: Mapping[str, str]) -> list[dict[str, str]]:
    signatures = ", ".join(f"{name}({', '.join(roles)})" for name, (roles, _) in PREDICATES.items())
    objects = ", ".join(f"{name} ({kind})" for name, kind in sorted(kinds.items())) or "(none named)"
    system = (
        "You turn a tabletop robot instruction into an ordered list of subgoals. Reply with one JSON "
        'object and nothing else: {"subgoals": [{"name": "<short imperative>", "predicate": '
        '"<predicate>(<arg>, ...)"}]}. '
        f"Predicates (argument roles): {signatures}. Roles: movable = cube or block; container = "
        "bowl, tray or drawer; support = plate, cube or block; region = a zone on the table. "
        f"Use only these names as arguments: {objects}. Grasp an object before putting it somewhere; "
        "pushing needs no grasp. Example: 'put the red cube in the bowl' -> "
        '{"subgoals": [{"name": "pick up the red cube", "predicate": "grasped(red_cube)"}, '
        '{"name": "put the red cube in the bowl", "predicate": "in(red_cube, bowl)"}]}'
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": instruction}]


_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_llm_plan(content: str, scene: SceneGeometry) -> tuple[SubgoalSpec, ...]:
    """Validate a plan reply: ``{"subgoals": [{"name": str, "predicate": str}, ...]}`` with
    known predicates whose arguments are objects/regions of `scene` in the right roles.
    A single fenced code block around the JSON is accepted; nothing else is."""
    text = content.strip()
    fenced = _FENCE_RE.match(text)
    if fenced is not None:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PlanningError(f"reply content is not JSON: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"subgoals"}:
        raise PlanningError(f"reply must be an object with exactly the key 'subgoals', got {text[:200]!r}")
    items = data["subgoals"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_LLM_SUBGOALS:
        raise PlanningError(f"'subgoals' must be a list of 1 to {MAX_LLM_SUBGOALS} entries, got {items!r}"[:300])
    subgoals = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"name", "predicate"}:
            raise PlanningError(f"subgoals[{i}] must be an object with exactly 'name' and 'predicate', got {item!r}")
        name, predicate = item["name"], item["predicate"]
        if not isinstance(name, str) or not name.strip() or not isinstance(predicate, str):
            raise PlanningError(f"subgoals[{i}] needs a non-empty string name and a string predicate, got {item!r}")
        try:
            call = parse_predicate(predicate)
            check_predicate(call, scene)
        except PredicateError as exc:
            raise PlanningError(f"subgoals[{i}]: {exc}") from exc
        subgoals.append(SubgoalSpec(name.strip(), str(call)))
    return tuple(subgoals)


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        exc.close()
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, PlanningError):
        return f"invalid plan: {exc}"
    return f"{type(exc).__name__}: {exc}"
