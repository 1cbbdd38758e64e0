"""Supervised warm start of a VLM on the visual tasks' traces, so RL starts from a policy
that is sometimes right.

As ``training.lm_rl.sft.sft_warm_start`` for text: demonstrations are the task families' own
traces of TRAIN problems, the loss covers the completion only (trace and eos), AdamW with
linear warmup and cosine decay. What differs: every example carries its image
(``VisionPrompts``: placeholder tokens in the prompt, pixel values beside it), and a share
``hint_fraction`` of the examples show the prompt with Difference Feedback's hint line
("Hint: the answer is X.", ``hinted_prompt``) and the same trace. Without it a policy trained
from scratch has never seen a hint and the repairs of Difference Feedback would rarely
succeed; GRPO and Difference Feedback start from the same warm-started weights, so the
comparison stays fair. Held-out numbers: greedy accuracy on TEST problems, plain and hinted.
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.lm_rl.methods.difference_feedback import hinted_prompt
from training.lm_rl.sft import IGNORE_INDEX, _train_pool, collate_right_padded, sft_lr_lambda
from training.lm_rl.tasks import Problem, get_task, make_split
from training.lm_rl.vlm.sampling import VisionPrompts, vlm_greedy_accuracy
from training.run_files import replace_dir, staging_path

logger = logging.getLogger(__name__)


def encode_vlm_example(vision: VisionPrompts, problem: Problem, hinted: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one demonstration; labels are -100 on the prompt (image included)."""
    tokenizer = vision.tokenizer
    prompt_ids = vision.encode_prompt(hinted_prompt(problem) if hinted else problem.prompt)
    completion = tokenizer(get_task(problem.task).trace(problem), add_special_tokens=False)["input_ids"]
    completion = completion + [tokenizer.eos_token_id]
    return prompt_ids + completion, [IGNORE_INDEX] * len(prompt_ids) + completion


def save_vlm_atomically(model: torch.nn.Module, vision: VisionPrompts, out_dir: str | os.PathLike) -> Path:
    """Model, tokenizer and image processor into a staging directory, then renamed into place."""
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    model.save_pretrained(staging)
    vision.tokenizer.save_pretrained(staging)
    vision.save_pretrained(staging)
    replace_dir(staging, target)
    return target


def vlm_sft_warm_start(
    model: torch.nn.Module,
    vision: VisionPrompts,
    tasks: Sequence[str],
    difficulties: int | Sequence[int],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    hint_fraction: float = 0.3,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    eval_problems: int = 64,
    max_new_tokens: int = 48,
) -> dict[str, float]:
    """Fine-tune ``model`` in place on image + prompt -> trace; evaluate; optionally save.

    Returns "train/loss_first", "train/loss_final" (mean of the last 10% of steps),
    "train/examples_per_s", "eval/accuracy" (+ per task) and "eval/hinted_accuracy".
    """
    difficulty_list = [difficulties] if isinstance(difficulties, int) else list(difficulties)
    if not tasks or not difficulty_list:
        raise ValueError(f"need at least one task and difficulty, got {tasks!r}, {difficulties!r}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    if not 0.0 <= hint_fraction <= 1.0:
        raise ValueError(f"hint_fraction must be in [0, 1], got {hint_fraction}")
    tokenizer = vision.tokenizer
    pool = _train_pool(list(tasks), difficulty_list, steps * batch_size, seed)
    chooser = random.Random(f"hints/{seed}")
    examples = [(problem, chooser.random() < hint_fraction) for problem in pool]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sft_lr_lambda(steps))
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="vlm sft", disable=not progress, dynamic_ncols=True)
    for step in bar:
        chunk = examples[step * batch_size : (step + 1) * batch_size]
        encoded = [encode_vlm_example(vision, problem, hinted) for problem, hinted in chunk]
        input_ids, labels = collate_right_padded(encoded, tokenizer.pad_token_id)  # (B, T)
        pixel_values = vision.pixel_values_for_problems([problem for problem, _ in chunk])
        loss = model(
            input_ids=input_ids.to(device), pixel_values=pixel_values.to(device), labels=labels.to(device),
            use_cache=False,
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    elapsed = time.perf_counter() - started
    tail = max(1, steps // 10)
    metrics = {
        "train/loss_first": losses[0],
        "train/loss_final": sum(losses[-tail:]) / tail,
        "train/examples_per_s": steps * batch_size / elapsed,
    }
    per_cell = max(1, eval_problems // (len(tasks) * len(difficulty_list)))
    test = [p for task in tasks for d in difficulty_list for p in make_split(task, "test", per_cell, d, seed=seed)]
    metrics.update(vlm_greedy_accuracy(model, vision, test, max_new_tokens))
    hinted = [
        Problem(task=p.task, prompt=hinted_prompt(p), answer=p.answer, difficulty=p.difficulty, meta=p.meta)
        for p in test
    ]
    metrics["eval/hinted_accuracy"] = vlm_greedy_accuracy(model, vision, hinted, max_new_tokens)["eval/accuracy"]
    logger.info("vlm sft warm start: %s", {k: round(v, 4) for k, v in metrics.items()})
    if out_dir is not None:
        save_vlm_atomically(model, vision, out_dir)
        logger.info("saved warm-started VLM to %s", out_dir)
    return metrics
