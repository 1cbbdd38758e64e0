"""The committed-state generation format of CERL: hidden thoughts, then a committed state.

Why a fixed format: CERL (docs/cerl.md) asks whether what a model *commits* is enough for
what comes later, and answers it by erasing the thoughts and asking a follow-up question.
That needs the thoughts and the committed part to be found exactly, as token spans, in any
sampled completion. A completion in this format reads

    <think>
    ...hidden reasoning, one step per line (tool calls and their results included)...
    </think>
    <state>key=value; key=value</state>
    Answer: <answer>

The thoughts span H is ``<think>`` through ``</think>`` and the newline after it; the committed
part A is everything after H (the ``<state>`` line and the ``Answer:`` line). A follow-up turn is
``"\\nFollow-up: <question>\\n"`` after A, answered with its own ``Answer:`` line. From one sample
two contexts are built, as token ids, so they differ by exactly the thoughts span:

    keep   = prompt + H + A + follow-up
    erase  = prompt +     A + follow-up

Tokenizers. With the character tokenizer (``training.lm_rl.tokenizer``) the tags are plain
strings of known characters and nothing is added. For a subword tokenizer ``ensure_format_tokens``
adds every tag that is not already one token as an added (unsplittable) token and resizes the
model's embeddings, so the tags are single ids and the spans are found at token level. They are
added as *non*-special tokens on purpose: the rollout decodes with ``skip_special_tokens=True``,
which would silently drop special tags from the texts the verifiers read.

Task families in this format subclass ``CommittedTask``: their ``trace`` commits only the final
answer (the thoughts carry the rest), ``long_trace`` commits everything a follow-up can ask for
(a self-sufficient state; the "long-answer SFT" baseline trains on it). ``committed_sft`` is the
SFT entry point for both: the completion plus the follow-up turn on the keep context, and on the
erase context only where the committed state is sufficient (otherwise the follow-up answer
cannot be inferred from what is left and the example would teach guessing).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.lm_rl.tasks.base import Problem

# Not imported from tasks.base: the task package imports this module while it initialises
# (the committed-format families subclass CommittedTask), so this module must not import it
# at load time. tests/training/lm_rl/test_cerl_format.py checks the two stay equal.
ANSWER_PREFIX = "Answer:"

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
STATE_OPEN = "<state>"
STATE_CLOSE = "</state>"
FOLLOWUP_PREFIX = "Follow-up:"
# The tool-call tags live here too so one call adds every tag a subword tokenizer needs.
CALL_OPEN = "<call>"
CALL_CLOSE = "</call>"
RESULT_OPEN = "<result>"
RESULT_CLOSE = "</result>"
FORMAT_TAGS = (THINK_OPEN, THINK_CLOSE, STATE_OPEN, STATE_CLOSE, CALL_OPEN, CALL_CLOSE, RESULT_OPEN, RESULT_CLOSE)

# Short on purpose: every prompt of every domain carries it (a char model pays per character).
FORMAT_INSTRUCTION = "Think in <think>, commit <state>, end with 'Answer: <answer>'."

TRACE_VARIANTS = ("short", "long")

# <think> ... </think>, then <state> ... </state>, then an Answer line. DOTALL: thoughts span lines.
_COMMITTED = re.compile(
    rf"^\s*{re.escape(THINK_OPEN)}(?P<thoughts>.*?){re.escape(THINK_CLOSE)}[ \t]*\n?"
    rf"(?P<committed>[ \t]*{re.escape(STATE_OPEN)}(?P<state>[^\n]*?){re.escape(STATE_CLOSE)}.*)$",
    re.DOTALL,
)
_STATE_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_ ]*?)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class CommittedParts:
    """A well-formed completion split into its parts (text level)."""

    thoughts: str  # between the think tags
    state: dict[str, str]  # the committed key=value pairs
    answer: str  # the final Answer line's text
    committed: str  # the committed text A (state line + answer line)


def render_state(items: Sequence[tuple[str, Any]]) -> str:
    """``<state>k=v; k=v</state>`` for the given (key, value) pairs, in order."""
    return STATE_OPEN + "; ".join(f"{key}={value}" for key, value in items) + STATE_CLOSE


def render_completion(thoughts: Sequence[str], state: Sequence[tuple[str, Any]], answer: Any) -> str:
    """A completion in the committed format (no trailing newline: eos follows the answer)."""
    body = "\n".join(thoughts)
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n{render_state(state)}\n{ANSWER_PREFIX} {answer}"


def parse_state(text: str) -> dict[str, str] | None:
    """``k=v; k=v`` -> {k: v}; None if any item is not ``key=value``. Empty text gives {}."""
    if not text.strip():
        return {}
    items: dict[str, str] = {}
    for part in text.split(";"):
        match = _STATE_ITEM.match(part)
        if match is None:
            return None
        items[match.group(1).strip()] = match.group(2)
    return items


def parse_committed(text: str) -> CommittedParts | None:
    """Split a completion into thoughts, state and answer; None when it is not well formed.

    Well formed: starts with ``<think>``, closes it, then a ``<state>...</state>`` line with
    ``key=value`` items, and a final ``Answer:`` line after the state. Never raises.
    """
    if not isinstance(text, str):
        return None
    match = _COMMITTED.match(text)
    if match is None:
        return None
    from training.lm_rl.tasks.base import extract_final_answer

    state = parse_state(match.group("state"))
    committed = match.group("committed")
    answer = extract_final_answer(committed)
    if state is None or answer is None:
        return None
    return CommittedParts(match.group("thoughts"), state, answer, committed)


def followup_text(question: str) -> str:
    """The follow-up turn appended after the committed answer."""
    return f"\n{FOLLOWUP_PREFIX} {question}\n"


# --- token level ---------------------------------------------------------------------------
def tag_ids(tokenizer: Any, tag: str) -> list[int]:
    """Token ids of a tag as it appears mid-text (no special tokens)."""
    return list(tokenizer(tag, add_special_tokens=False)["input_ids"])


def ensure_format_tokens(tokenizer: Any, model: Any = None) -> list[str]:
    """Make every format tag one token (or leave a char-level tokenizer alone).

    A tokenizer that spells every tag one token per character (the char tokenizer) already
    round-trips the tags exactly and needs nothing. Otherwise each tag that is not a single
    token is added as an added, non-special token, and ``model``'s input embeddings are resized
    when it is given. Returns the tags that were added ([] when none).
    """
    ids = {tag: tag_ids(tokenizer, tag) for tag in FORMAT_TAGS}
    char_level = all(
        len(token_ids) == len(tag) and tokenizer.decode(token_ids) == tag for tag, token_ids in ids.items()
    )
    if char_level:
        return []
    missing = [tag for tag, token_ids in ids.items() if len(token_ids) != 1]
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in missing])
        if model is not None:
            model.resize_token_embeddings(len(tokenizer))
        logger.info("added format tags %s as tokens (vocabulary now %d)", missing, len(tokenizer))
    return missing


def _find(haystack: Sequence[int], needle: Sequence[int], start: int = 0) -> int:
    """First index >= start where needle occurs in haystack; -1 if none."""
    n = len(needle)
    if n == 0:
        return -1
    first = needle[0]
    for index in range(start, len(haystack) - n + 1):
        if haystack[index] == first and list(haystack[index : index + n]) == list(needle):
            return index
    return -1


@dataclass(frozen=True)
class ThoughtSpan:
    """Token positions [start, end) of the thoughts span in a completion (close tag and the
    newline after it included)."""

    start: int
    end: int


def thought_span(completion_ids: Sequence[int], tokenizer: Any) -> ThoughtSpan | None:
    """Where the thoughts are in a completion's token ids; None when the tags are not there.

    Found at token level (``THINK_OPEN`` then the first ``THINK_CLOSE`` after it), so the erase
    context keeps the sampled tokens of A exactly, with no re-tokenization.
    """
    open_ids, close_ids = tag_ids(tokenizer, THINK_OPEN), tag_ids(tokenizer, THINK_CLOSE)
    start = _find(completion_ids, open_ids)
    if start < 0:
        return None
    close = _find(completion_ids, close_ids, start + len(open_ids))
    if close < 0:
        return None
    end = close + len(close_ids)
    if end < len(completion_ids) and tokenizer.decode([completion_ids[end]]) == "\n":
        end += 1
    return ThoughtSpan(start, end)


@dataclass(frozen=True)
class ProbeContexts:
    """The two follow-up contexts of one sample, as token id lists."""

    keep: list[int]
    erase: list[int]
    span: ThoughtSpan  # in the completion's coordinates
    offset: int  # where the completion starts in ``keep`` (= len(prompt))


def strip_eos(completion_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """Completion ids without a final eos (mid-context it would say the text ended)."""
    ids = list(completion_ids)
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def build_contexts(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], followup_ids: Sequence[int], tokenizer: Any
) -> ProbeContexts | None:
    """Keep context (prompt + H + A + follow-up) and erase context (prompt + A + follow-up).

    completion_ids: the sample's valid completion tokens (a final eos is dropped). Returns None
    when the completion has no thoughts span.
    """
    completion = strip_eos(completion_ids, tokenizer)
    span = thought_span(completion, tokenizer)
    if span is None:
        return None
    prompt, followup = list(prompt_ids), list(followup_ids)
    keep = prompt + completion + followup
    erase = prompt + completion[: span.start] + completion[span.end :] + followup
    return ProbeContexts(keep=keep, erase=erase, span=span, offset=len(prompt))


# --- task families -----------------------------------------------------------------------
class CommittedTask:
    """Mixin for a task in the committed format whose problems carry a follow-up question.

    Listed before the ``TaskFamily`` base (``class X(CommittedTask, IntegerAnswerTask)``).
    Subclasses implement ``generate`` (putting ``followup``, ``followup_answer``, ``thoughts``
    (list of lines), ``state_short`` and ``state_long`` (lists of (key, value)) into
    ``Problem.meta``), ``parse_answer`` and ``is_correct``. The follow-up answer is parsed with
    ``parse_followup`` (``parse_answer`` unless overridden) and compared with ``==``.
    """

    committed_format = True

    def trace(self, problem: Problem) -> str:
        """Correct completion that commits only the final answer: the thoughts carry the rest."""
        return self.trace_variant(problem, "short")

    def long_trace(self, problem: Problem) -> str:
        """Correct completion whose committed state is sufficient for the follow-up."""
        return self.trace_variant(problem, "long")

    def trace_variant(self, problem: Problem, variant: str) -> str:
        if variant not in TRACE_VARIANTS:
            raise ValueError(f"trace variant must be one of {TRACE_VARIANTS}, got {variant!r}")
        meta = problem.meta
        state = meta["state_long"] if variant == "long" else meta["state_short"]
        return render_completion(meta["thoughts"], state, problem.answer)

    def followup_trace(self, problem: Problem) -> str:
        """The correct follow-up answer text."""
        return f"{ANSWER_PREFIX} {problem.meta['followup_answer']}"

    def parse_followup(self, answer_text: str) -> Any | None:
        return self.parse_answer(answer_text)

    def verify_followup(self, problem: Problem, completion: str) -> bool:
        """Exact check of a follow-up answer; False (never an exception) for malformed text."""
        from training.lm_rl.tasks.base import extract_final_answer

        answer_text = extract_final_answer(completion)
        if answer_text is None:
            return False
        parsed = self.parse_followup(answer_text)
        if parsed is None:
            return False
        expected = self.parse_followup(str(problem.meta["followup_answer"]))
        return parsed == expected

    def verify(self, problem: Problem, completion: str) -> bool:
        """The final answer must be right AND the completion in the committed format."""
        return parse_committed(completion) is not None and super().verify(problem, completion)


def is_committed_task(task: str) -> bool:
    from training.lm_rl.tasks import get_task

    return bool(getattr(get_task(task), "committed_format", False))


def require_followup(problem: Problem) -> CommittedTask:
    """The problem's family, checked to be a committed-format task with a follow-up."""
    from training.lm_rl.tasks import TASKS, get_task

    family = get_task(problem.task)
    if not isinstance(family, CommittedTask) or "followup" not in problem.meta:
        committed = sorted(name for name, f in TASKS.items() if isinstance(f, CommittedTask))
        raise ValueError(
            f"task {problem.task!r} has no committed state and follow-up question; "
            f"use one of {committed}"
        )
    return family


# --- SFT --------------------------------------------------------------------------------
def _uses_long_state(problem: Problem, long_fraction: float, seed: int) -> bool:
    """A fixed per-(problem, seed) coin: whether this demonstration commits the long state."""
    if long_fraction >= 1.0:
        return True
    if long_fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}\x00{problem.task}\x00{problem.prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < long_fraction


def tool_result_mask(tokens: Sequence[int], tokenizer: Any) -> list[bool]:
    """True on tokens inside ``<result>...</result>`` (environment text, never a label)."""
    open_ids, close_ids = tag_ids(tokenizer, RESULT_OPEN), tag_ids(tokenizer, RESULT_CLOSE)
    mask = [False] * len(tokens)
    position = 0
    while True:
        start = _find(tokens, open_ids, position)
        if start < 0:
            return mask
        close = _find(tokens, close_ids, start + len(open_ids))
        end = len(tokens) if close < 0 else close + len(close_ids)
        for index in range(start, end):
            mask[index] = True
        position = end


def committed_sft_examples(
    tokenizer: Any, problem: Problem, long_state: bool
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs for one problem: the completion, then its follow-up turn.

    Labels are -100 on prompts, on tool results (environment text) and on the contexts of the
    follow-up examples. The follow-up is taught on the keep context always and on the erase
    context only when the committed state is the long, sufficient one.
    """
    from training.lm_rl.sft import IGNORE_INDEX, encode_prompt

    family = require_followup(problem)
    prompt = encode_prompt(tokenizer, problem.prompt)
    text = family.trace_variant(problem, "long" if long_state else "short")
    completion = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    environment = tool_result_mask(completion, tokenizer)
    eos = [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX if env else token for token, env in zip(completion, environment)]
    examples = [(prompt + completion + eos, [IGNORE_INDEX] * len(prompt) + labels + eos)]
    followup = list(tokenizer(followup_text(problem.meta["followup"]), add_special_tokens=False)["input_ids"])
    answer = list(tokenizer(family.followup_trace(problem), add_special_tokens=False)["input_ids"]) + eos
    contexts = build_contexts(prompt, completion, followup, tokenizer)
    if contexts is None:  # a trace always has thoughts; this would be a bug in a family
        raise RuntimeError(f"trace of {problem.task} has no thoughts span: {text!r}")
    chosen = [contexts.keep] + ([contexts.erase] if long_state else [])
    for context in chosen:
        examples.append((context + answer, [IGNORE_INDEX] * len(context) + answer))
    return examples


def committed_sft(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    difficulty: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    long_fraction: float = 0.3,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    eval_problems: int = 64,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """SFT on committed-format traces and their follow-up turns (completion-only loss, AdamW).

    long_fraction: share of demonstrations that commit the long (sufficient) state; 0.3 for the
    SFT start of the CERL experiments (so RL sees both kinds), 1.0 for the long-answer SFT
    baseline. The rest commit only the final answer. Works from scratch or as a continuation of
    an already trained model. Returns "train/loss_first", "train/loss_final",
    "train/tokens_per_s", "eval/accuracy" (greedy, main answer) and per task.
    """
    import torch
    from tqdm.auto import tqdm

    from training.lm_rl.sft import (
        _train_pool,
        collate_right_padded,
        greedy_accuracy,
        save_atomically,
        sft_lr_lambda,
    )
    from training.lm_rl.tasks import make_split

    if not tasks:
        raise ValueError("committed_sft needs at least one task")
    for task in tasks:
        if not is_committed_task(task):
            raise ValueError(f"task {task!r} is not in the committed format (no follow-up questions)")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("tokenizer needs eos and pad tokens (load it through load_policy_model)")
    ensure_format_tokens(tokenizer, model)
    torch.manual_seed(seed)
    # Each problem yields 2-3 examples; draw enough problems for steps * batch_size examples.
    pool = _train_pool(list(tasks), [difficulty], steps * batch_size, seed)
    examples = [
        example
        for problem in pool
        for example in committed_sft_examples(tokenizer, problem, _uses_long_state(problem, long_fraction, seed))
    ]
    random.Random(seed).shuffle(examples)
    examples = examples[: steps * batch_size]
    longest = max(sum(label != -100 for label in labels) for _, labels in examples)
    max_new_tokens = max_new_tokens or 2 * longest

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sft_lr_lambda(steps))
    model.train()
    losses: list[float] = []
    tokens_seen = 0
    started = time.perf_counter()
    tokens_per_s = 0.0
    bar = tqdm(range(steps), desc="committed sft", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = examples[(step * batch_size) % len(examples) :][:batch_size]
        input_ids, labels = collate_right_padded(batch, tokenizer.pad_token_id)  # (B, T)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        tokens_seen += sum(len(ids) for ids, _ in batch)
        tokens_per_s = tokens_seen / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
    model.eval()
    tail = max(1, steps // 10)
    metrics = {
        "train/loss_first": losses[0],
        "train/loss_final": sum(losses[-tail:]) / tail,
        "train/tokens_per_s": tokens_per_s,
    }
    if eval_problems > 0:
        per_task = max(1, math.ceil(eval_problems / len(tasks)))
        test = [p for task in tasks for p in make_split(task, "test", per_task, difficulty, seed=seed)]
        metrics.update(greedy_accuracy(model, tokenizer, test, max_new_tokens))
    logger.info("committed sft: %s", {k: round(v, 4) for k, v in metrics.items()})
    if out_dir is not None:
        save_atomically(model, tokenizer, out_dir)
    return metrics
