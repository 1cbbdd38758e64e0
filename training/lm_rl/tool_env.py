"""A multi-turn tool environment for LM rollouts: safe calculator, key-value lookup, sampler.

Why: the tool-use task (and any method that samples through a ``RolloutContext``) needs the
model to *act*: emit a call, see the environment's answer, continue. The environment text is
not the model's, so it is fed as forced tokens (``forced_mask`` True) and never receives loss.

Call format (documented in docs/cerl.md)::

    <call>calc: 3*(4+5)</call><result>27</result>
    <call>lookup: s7 pen</call><result>7</result>

The model writes ``<call>NAME: ARGUMENT</call>``; sampling stops at ``</call>``, the
environment runs the tool and appends ``<result>TEXT</result>`` as forced tokens, and sampling
continues, up to ``max_turns`` calls per completion (after that ``</call>`` no longer stops
sampling and calls get no result). Whatever the model writes, the environment answers with a
result string and never raises: malformed calls, unknown tools and tool failures (division by
zero, huge numbers, unknown keys) come back as ``error: ...`` results the model can read.

The calculator does not evaluate Python: it parses with ``ast`` and walks only number literals,
``+ - * / // % **`` and unary signs, with bounded expression length, node count, exponent
and magnitude. ``/`` is exact: an integer when it divides, otherwise a decimal rounded to 6
places.
"""
from __future__ import annotations

import ast
import logging
import math
import operator
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from training.lm_rl.committed import CALL_CLOSE, CALL_OPEN, RESULT_CLOSE, RESULT_OPEN

logger = logging.getLogger(__name__)

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 64
MAX_MAGNITUDE = 10**12
MAX_EXPONENT = 12
MAX_RESULT_CHARS = 64
ERROR_PREFIX = "error:"


class ToolError(Exception):
    """A tool refused its input; the message becomes the model-visible result."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _format_number(value: int | float) -> str:
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


class Calculator:
    """Arithmetic on number literals only: ``+ - * / // % **``, unary signs, parentheses."""

    name = "calc"

    def __call__(self, argument: str) -> str:
        expression = argument.strip()
        if not expression:
            raise ToolError("empty expression")
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        try:
            tree = ast.parse(expression, mode="eval")
        except (SyntaxError, ValueError):
            raise ToolError(f"cannot parse {expression!r}") from None
        nodes = sum(1 for _ in ast.walk(tree))
        if nodes > MAX_NODES:
            raise ToolError(f"expression has {nodes} parts, more than {MAX_NODES}")
        return _format_number(self._evaluate(tree.body))

    def _evaluate(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ToolError(f"only numbers are allowed, got {value!r}")
            return self._check(value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self._check(_UNARY[type(node.op)](self._evaluate(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._evaluate(node.left), self._evaluate(node.right)
            if isinstance(node.op, ast.Pow):
                if not float(right).is_integer() or not 0 <= right <= MAX_EXPONENT:
                    raise ToolError(f"exponent must be an integer in [0, {MAX_EXPONENT}], got {_format_number(right)}")
                right = int(right)
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
                raise ToolError("division by zero")
            if isinstance(node.op, ast.Div) and isinstance(left, int) and isinstance(right, int) and left % right == 0:
                return self._check(left // right)
            try:
                return self._check(_BINARY[type(node.op)](left, right))
            except (OverflowError, ZeroDivisionError) as error:
                raise ToolError(str(error)) from None
        raise ToolError(f"{type(node).__name__} is not allowed; only numbers and + - * / // % ** ( )")

    @staticmethod
    def _check(value: int | float) -> int | float:
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("result is not a finite number")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError(f"number too large (limit {MAX_MAGNITUDE:.0e})")
        return value


class KeyValueLookup:
    """Exact lookup in a fixed table; keys are compared after collapsing whitespace."""

    name = "lookup"

    def __init__(self, table: Mapping[str, Any]) -> None:
        self.table = {self.normalise(key): str(value) for key, value in table.items()}

    @staticmethod
    def normalise(key: str) -> str:
        return " ".join(key.split()).lower()

    def __call__(self, argument: str) -> str:
        key = self.normalise(argument)
        if not key:
            raise ToolError("empty key")
        if key not in self.table:
            raise ToolError(f"unknown key {key[:32]!r}")
        return self.table[key]


@dataclass
class ToolEnv:
    """Named tools behind the documented call format; ``execute`` never raises."""

    tools: dict[str, Callable[[str], str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.tools:
            if not name.isidentifier():
                raise ValueError(f"tool name must be an identifier, got {name!r}")

    def execute(self, call: str) -> str:
        """Result text (no tags) for the inside of a call, ``NAME: ARGUMENT``."""
        name, sep, argument = call.partition(":")
        name = name.strip()
        if not sep or not name:
            return f"{ERROR_PREFIX} malformed call, expected 'NAME: ARGUMENT'"
        tool = self.tools.get(name)
        if tool is None:
            return f"{ERROR_PREFIX} unknown tool {name[:16]!r}; tools: {', '.join(sorted(self.tools))}"
        try:
            result = str(tool(argument))
        except ToolError as error:
            result = f"{ERROR_PREFIX} {error}"
        except Exception as error:  # a tool bug must not end a training run
            logger.warning("tool %s failed on %r: %s", name, argument[:64], error)
            result = f"{ERROR_PREFIX} tool failed ({type(error).__name__})"
        return result[:MAX_RESULT_CHARS]

    def respond(self, text: str) -> str:
        """The forced result for a segment of model text that ends with ``</call>``.

        The call is the text between the last ``<call>`` and the final ``</call>``, looking only
        past the previous result (earlier turns are not re-read); a segment with no opening tag
        is answered with a malformed-call error.
        """
        body = text[: len(text) - len(CALL_CLOSE)] if text.endswith(CALL_CLOSE) else text
        previous = body.rfind(RESULT_CLOSE)
        if previous >= 0:
            body = body[previous + len(RESULT_CLOSE) :]
        start = body.rfind(CALL_OPEN)
        if start < 0:
            result = f"{ERROR_PREFIX} malformed call, no {CALL_OPEN}"
        else:
            result = self.execute(body[start + len(CALL_OPEN) :])
        return f"{RESULT_OPEN}{result}{RESULT_CLOSE}"


@dataclass
class _Row:
    """The growing completion of one sample across turns."""

    tokens: list[int] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    logp_raw: list[float] = field(default_factory=list)
    text: str = ""
    sampled: int = 0
    calls: int = 0
    finish: str | None = None


def _append_segment(row: _Row, rollout: Any, index: int, budget: int, tokenizer: Any) -> None:
    """Add one generate() row to a multi-turn row, cutting sampled tokens past ``budget``."""
    valid = rollout.completion_mask[index]
    tokens = rollout.completion_ids[index][valid].tolist()
    forced = rollout.forced_mask[index][valid].tolist()
    logp = rollout.logp[index][valid].tolist()
    logp_raw = rollout.logp_raw[index][valid].tolist()
    text = rollout.texts[index]
    finish = rollout.finish_reason[index]
    sampled = 0
    keep = len(tokens)
    for position, is_forced in enumerate(forced):
        if not is_forced:
            sampled += 1
            if sampled > budget:
                keep = position
                sampled = budget
                finish = "length"
                text = tokenizer.decode(tokens[:keep], skip_special_tokens=True)
                break
    row.tokens += tokens[:keep]
    row.forced += forced[:keep]
    row.logp += logp[:keep]
    row.logp_raw += logp_raw[:keep]
    row.text += text
    row.sampled += sampled
    row.finish = finish


def generate_with_tools(
    model: Any,
    tokenizer: Any,
    prompts: list[str] | list[list[int]],
    config: Any,
    env: ToolEnv,
    *,
    num_samples_per_prompt: int = 1,
    prefixes: list[list[int]] | None = None,
    generator: Any = None,
    max_turns: int = 4,
) -> Any:
    """``rollout.generate`` with tool calls executed between turns; returns one ``Rollout``.

    Each turn samples until eos, a stop string, ``</call>`` or the budget; a row that stopped
    at ``</call>`` gets the environment's ``<result>...</result>`` as forced tokens and is
    continued with its whole context as the new prompt (one prefill per turn). ``max_new_tokens``
    bounds the sampled tokens of a completion over all turns; results come on top. The returned
    ``forced_mask`` is True on the caller's prefixes and on every result token.
    """
    import torch

    from training.lm_rl.rollout import Rollout, SamplingConfig, _tokenize_prompts, generate

    if max_turns < 0:
        raise ValueError(f"max_turns must be >= 0, got {max_turns}")
    started = time.perf_counter()
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    prompt_ids = _tokenize_prompts(tokenizer, prompts)
    batch = len(prompt_ids) * num_samples_per_prompt
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def with_budget(budget: int, calls_allowed: bool) -> Any:
        stops = tuple(config.stop_strings)
        if calls_allowed and CALL_CLOSE not in stops:
            stops = stops + (CALL_CLOSE,)
        return SamplingConfig(max_new_tokens=budget, temperature=config.temperature, top_p=config.top_p,
                              stop_strings=stops, seed=config.seed)

    def wants_tool(row: _Row) -> bool:
        return row.finish == "stop" and row.text.endswith(CALL_CLOSE)

    rows = [_Row() for _ in range(batch)]
    first = generate(
        model, tokenizer, [p.tolist() for p in prompt_ids], with_budget(config.max_new_tokens, max_turns > 0),
        num_samples_per_prompt=num_samples_per_prompt, prefixes=prefixes, generator=generator,
    )
    for index, row in enumerate(rows):
        _append_segment(row, first, index, config.max_new_tokens, tokenizer)
    context_of = [prompt_ids[i // num_samples_per_prompt].tolist() for i in range(batch)]

    while True:
        pending = [i for i, row in enumerate(rows) if wants_tool(row) and row.calls < max_turns]
        if not pending:
            break
        continue_rows: dict[bool, list[int]] = {True: [], False: []}
        prefix_of: dict[int, list[int]] = {}
        for i in pending:
            row = rows[i]
            result = env.respond(row.text)
            result_ids = list(tokenizer(result, add_special_tokens=False)["input_ids"])
            row.calls += 1
            remaining = config.max_new_tokens - row.sampled
            context_length = len(context_of[i]) + len(row.tokens) + len(result_ids) + 1
            if remaining < 1 or (max_positions is not None and context_length >= max_positions):
                row.finish = "length"
                continue
            prefix_of[i] = result_ids
            continue_rows[row.calls < max_turns].append(i)
        for calls_allowed, members in continue_rows.items():
            if not members:
                continue
            budget = max(config.max_new_tokens - rows[i].sampled for i in members)
            segment = generate(
                model, tokenizer, [context_of[i] + rows[i].tokens for i in members],
                with_budget(budget, calls_allowed), num_samples_per_prompt=1,
                prefixes=[prefix_of[i] for i in members], generator=generator,
            )
            for k, i in enumerate(members):
                _append_segment(rows[i], segment, k, config.max_new_tokens - rows[i].sampled, tokenizer)

    width = max(len(row.tokens) for row in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completion_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((batch, width), dtype=torch.bool, device=device)
    forced_mask = torch.zeros((batch, width), dtype=torch.bool, device=device)
    logp = torch.zeros((batch, width), dtype=torch.float32, device=device)
    logp_raw = torch.zeros((batch, width), dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        completion_ids[i, :n] = torch.tensor(row.tokens, dtype=torch.long)
        completion_mask[i, :n] = True
        forced_mask[i, :n] = torch.tensor(row.forced, dtype=torch.bool)
        logp[i, :n] = torch.tensor(row.logp, dtype=torch.float32)
        logp_raw[i, :n] = torch.tensor(row.logp_raw, dtype=torch.float32)
    return Rollout(
        prompt_ids=[prompt_ids[i // num_samples_per_prompt] for i in range(batch)],
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        forced_mask=forced_mask,
        logp=logp,
        logp_raw=logp_raw,
        texts=[row.text for row in rows],
        finish_reason=[str(row.finish) for row in rows],
        group_ids=torch.arange(len(prompt_ids), device=device).repeat_interleave(num_samples_per_prompt),
        num_generated_tokens=sum(row.sampled for row in rows),
        wall_time_s=time.perf_counter() - started,
    )


def max_forced_tokens(family: Any) -> int:
    """Upper bound of the result tokens the environment adds to one completion of a task family
    (0 for a family without tools): ``max_turns`` results of at most ``MAX_RESULT_CHARS``
    characters plus tags, counting one token per character (no tokenizer needs more for ASCII)."""
    if getattr(family, "tool_env", None) is None:
        return 0
    return int(family.max_turns) * (len(RESULT_OPEN) + MAX_RESULT_CHARS + len(RESULT_CLOSE))


def _tool_context_class() -> type:
    """``RolloutContext`` whose ``sample`` runs the tool environment (built lazily: torch)."""
    global _ToolRolloutContext
    if _ToolRolloutContext is None:
        from training.lm_rl.methods.base import RolloutContext
        from training.lm_rl.rollout import SamplingConfig

        @dataclass
        class ToolRolloutContext(RolloutContext):
            """A ``RolloutContext`` whose samples are multi-turn tool episodes."""

            env: ToolEnv | None = None
            max_turns: int = 4

            def sample(self, prompts, num_samples_per_prompt, prefixes=None, max_new_tokens=None):  # noqa: ANN001
                config = self.sampling
                if max_new_tokens is not None and max_new_tokens != config.max_new_tokens:
                    config = SamplingConfig(
                        max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                        stop_strings=config.stop_strings, seed=config.seed,
                    )
                return generate_with_tools(
                    self.model, self.tokenizer, prompts, config, self.env,
                    num_samples_per_prompt=num_samples_per_prompt, prefixes=prefixes,
                    generator=self.generator, max_turns=self.max_turns,
                )

        _ToolRolloutContext = ToolRolloutContext
    return _ToolRolloutContext


_ToolRolloutContext: type | None = None


def tool_rollout_context(env: ToolEnv, max_turns: int, **context: Any) -> Any:
    """A RolloutContext (``methods.base``) that samples through ``env``; ``context`` are its fields."""
    return _tool_context_class()(**context, env=env, max_turns=max_turns)


def greedy_tool_completions(
    model: Any, tokenizer: Any, prompts: list[list[int]], env: ToolEnv, max_new_tokens: int, max_turns: int
) -> Any:
    """Greedy multi-turn completions of token-id prompts (evaluation); returns the Rollout."""
    from training.lm_rl.rollout import SamplingConfig

    return generate_with_tools(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0), env,
        max_turns=max_turns,
    )
