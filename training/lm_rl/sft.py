"""Supervised warm start: teach a policy the task formats before any RL.

GRPO-family methods (docs/papers/lm-rl.md) learn only from groups whose rewards differ, so a
policy that never produces a parsable `Answer:` line gets no signal. The usual remedy
(DeepSeekMath, and every method built on it) is a short SFT phase on correct demonstrations;
here the demonstrations are the task families' own `trace`s of problems from the TRAIN split
(`make_split`), so the held-out TEST problems stay unseen.

Sequence format, shared with the RL rollouts through `encode_prompt`:
    [bos] prompt "\n" | trace [eos]
or, for a tokenizer with a chat template (an instruct model such as SmolLM2-Instruct), the
prompt as one user turn rendered by that template with the assistant turn opened.
The loss covers only the completion (trace and eos): prompt positions get label -100, the
ignore index of every Hugging Face causal LM.
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.lm_rl.tasks import Problem, get_task, make_split
from training.run_files import warmup_cosine

logger = logging.getLogger(__name__)

PROMPT_SEPARATOR = "\n"
IGNORE_INDEX = -100


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids the policy is conditioned on.

    With a chat template: the prompt as a user message, generation prompt added (what an
    instruct model was tuned on). Otherwise: bos (when the tokenizer has one), prompt, newline.
    """
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + PROMPT_SEPARATOR, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def encode_sft_example(
    tokenizer: PreTrainedTokenizerBase, problem: Problem
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one demonstration; labels are -100 on the prompt part."""
    prompt_ids = encode_prompt(tokenizer, problem.prompt)
    trace = get_task(problem.task).trace(problem)
    completion_ids = tokenizer(trace, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def collate_right_padded(
    examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (input_ids, labels) pairs into (B, T) tensors, padding on the right.

    Right padding needs no attention mask in training: under causal attention no real token
    can see the pads after it, and pad positions carry label -100.
    """
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
    return input_ids, labels


def pad_left(
    sequences: Sequence[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation -> (input_ids, attention_mask), each (B, T)."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = torch.tensor(seq)
        attention_mask[row, length - len(seq) :] = 1
    return input_ids, attention_mask


def _greedy_plain(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch: Sequence[Problem], max_new_tokens: int
) -> list[str]:
    """Greedy single-turn completions of the problems' prompts (``model.generate``)."""
    input_ids, attention_mask = pad_left(
        [encode_prompt(tokenizer, p.prompt) for p in batch], tokenizer.pad_token_id
    )
    generated = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (B, T_prompt + T_new)
    return tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    max_new_tokens: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Share of `problems` whose greedy completion the task verifier accepts, overall and per task.

    Keys: "eval/accuracy" and "eval/accuracy/<task>".
    """
    was_training = model.training
    model.eval()
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        completions = [""] * len(batch)
        for task in sorted({p.task for p in batch}):
            rows = [i for i, p in enumerate(batch) if p.task == task]
            family = get_task(task)
            if getattr(family, "tool_env", None) is not None:
                # Tool tasks are multi-turn: the environment answers each call (training.lm_rl.tool_env).
                from training.lm_rl.tool_env import greedy_tool_completions

                texts = greedy_tool_completions(
                    model, tokenizer, [encode_prompt(tokenizer, batch[i].prompt) for i in rows],
                    family.tool_env, max_new_tokens, family.max_turns,
                ).texts
            else:
                texts = _greedy_plain(model, tokenizer, [batch[i] for i in rows], max_new_tokens)
            for i, text in zip(rows, texts):
                completions[i] = text
        for problem, completion in zip(batch, completions):
            correct.setdefault(problem.task, []).append(
                get_task(problem.task).verify(problem, completion)
            )
    model.train(was_training)
    metrics = {f"eval/accuracy/{task}": sum(v) / len(v) for task, v in correct.items()}
    flat = [ok for values in correct.values() for ok in values]
    metrics["eval/accuracy"] = sum(flat) / max(len(flat), 1)
    return metrics


def save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike
) -> Path:
    """save_pretrained model + tokenizer into a temp dir beside `out_dir`, then swap it in.

    A crash mid-save leaves the previous checkpoint intact. rename(2) cannot replace a
    non-empty directory, so an existing checkpoint is first moved aside and deleted after.
    """
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)  # safetensors by default
    tokenizer.save_pretrained(staging)
    previous = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def sft_lr_lambda(steps: int) -> Callable[[int], float]:
    """The LambdaLR factor of every SFT here: linear warm-up over a tenth of the steps (AdamW's
    early moments are noisy), then cosine decay to 10% of the learning rate."""
    return lambda step: warmup_cosine(step, steps, max(1, steps // 10), 0.1)


def _train_pool(
    tasks: Sequence[str], difficulties: Sequence[int], n_total: int, seed: int
) -> list[Problem]:
    """n_total TRAIN problems, an equal share per (task, difficulty), shuffled together."""
    per_cell = math.ceil(n_total / (len(tasks) * len(difficulties)))
    pool = [
        problem
        for task in tasks
        for difficulty in difficulties
        for problem in make_split(task, "train", per_cell, difficulty, seed=seed)
    ]
    random.Random(seed).shuffle(pool)
    return pool[:n_total]


def sft_warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    difficulties: int | Sequence[int],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    eval_problems: int = 64,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Fine-tune `model` on task traces (completion-only loss, AdamW); evaluate greedy accuracy.

    `eval_problems` TEST problems are split evenly over (task, difficulty); `max_new_tokens`
    defaults to twice the longest training completion. With `out_dir`, model and tokenizer are
    saved there atomically. Returns namespaced metrics: "train/loss_first", "train/loss_final"
    (mean over the last 10% of steps), "train/tokens_per_s", "eval/accuracy" and per task.
    """
    difficulty_list = [difficulties] if isinstance(difficulties, int) else list(difficulties)
    if not tasks or not difficulty_list:
        raise ValueError(f"need at least one task and difficulty, got {tasks!r}, {difficulties!r}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}"
        )
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("tokenizer needs eos and pad tokens (load it through load_policy_model)")
    torch.manual_seed(seed)
    examples = [
        encode_sft_example(tokenizer, problem)
        for problem in _train_pool(tasks, difficulty_list, steps * batch_size, seed)
    ]
    longest_completion = max(sum(label != IGNORE_INDEX for label in lab) for _, lab in examples)
    max_new_tokens = max_new_tokens or 2 * longest_completion

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sft_lr_lambda(steps))
    model.train()
    losses: list[float] = []
    tokens_seen = 0
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="sft", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = examples[step * batch_size : (step + 1) * batch_size]
        input_ids, labels = collate_right_padded(batch, tokenizer.pad_token_id)  # (B, T)
        loss = model(input_ids=input_ids.to(model.device), labels=labels.to(model.device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        tokens_seen += sum(len(ids) for ids, _ in batch)
        tokens_per_s = tokens_seen / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
    tail = max(1, steps // 10)
    metrics = {
        "train/loss_first": losses[0],
        "train/loss_final": sum(losses[-tail:]) / tail,
        "train/tokens_per_s": tokens_per_s,
    }
    per_cell = max(1, eval_problems // (len(tasks) * len(difficulty_list)))
    test_problems = [
        problem
        for task in tasks
        for difficulty in difficulty_list
        for problem in make_split(task, "test", per_cell, difficulty, seed=seed)
    ]
    metrics.update(greedy_accuracy(model, tokenizer, test_problems, max_new_tokens))
    logger.info("sft warm start: %s", {k: round(v, 4) for k, v in metrics.items()})
    if out_dir is not None:
        save_atomically(model, tokenizer, out_dir)
        logger.info("saved warm-started policy to %s", out_dir)
    return metrics
