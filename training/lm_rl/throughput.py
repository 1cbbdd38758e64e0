"""Training throughput of our GRPO trainer against TRL's stock ``GRPOTrainer``, side by side.

What: ``measure_throughput`` builds both trainers on the same model (same name, same seed,
so the same initial weights), the same prompts per step (the TRAIN split stream both
trainers draw), group size, generation budget, temperature and top-p, and plain GRPO with no
KL; it runs one untimed warm-up step of each, then alternates timed steps
(ours, TRL, ours, TRL, ...) for ``repeats`` rounds in one process. Tokens/s of a step is the
number of generated completion tokens (eos included, as both trainers count them) divided by
the wall time of the full step: generation, scoring, loss, backward and optimizer step.

Why alternate in one process: load on a shared machine drifts over minutes; interleaving
exposes both trainers to the same drift, and the paired runs give a CI for the ratio.
Torch threads are set explicitly (``num_threads``) because the default (all cores) makes
CPU timings depend on whatever else runs, and are restored afterwards.

The TRL side is driven one optimizer step at a time with TRL's own ``training_step``
(its generate-and-score and ``_compute_loss``) followed by the gradient clipping, optimizer
and scheduler steps of the Trainer loop, so no Trainer bookkeeping between steps is timed.
CIs: the 95% interval of a mean is a Student-t interval over the runs
(``runtime.stats.mean_ci``), the median's a bootstrap (``percentile_ci``), the ratio's a
paired bootstrap. With few repeats the intervals are wide: they say so.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trl
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import GRPOConfig
from trl import GRPOTrainer as TRLGRPOTrainer

from runtime.stats import mean_ci, percentile_ci
from training.lm_rl.models import load_policy_model
from training.lm_rl.rewards import correctness_reward, safe_reward
from training.lm_rl.sft import PROMPT_SEPARATOR, encode_prompt
from training.lm_rl.tasks import make_split
from training.lm_rl.trainer import GRPOTrainer, TrainConfig
from training.lm_rl.trl_adapter import problem_columns, trl_reward

_N_BOOT = 2000


def _rate_summary(samples: list[float], seed: int) -> dict[str, Any]:
    """Mean with its Student-t 95% CI, median with its bootstrap CI, and the runs."""
    mean = mean_ci(samples)
    median = percentile_ci(samples, 50, seed=seed, n_boot=_N_BOOT)
    return {"mean": mean["mean"], "ci95": mean["ci95"], "median": median["value"],
            "median_ci95": median["ci95"], "runs": [float(v) for v in samples]}


def ratio_ci(numerator: list[float], denominator: list[float], seed: int = 0, n_boot: int = _N_BOOT) -> list[float]:
    """95% paired-bootstrap CI of mean(numerator) / mean(denominator); runs are paired by index."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"ratio_ci needs paired, non-empty runs, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, a.size, size=(n_boot, a.size))
    boots = a[index].mean(axis=1) / b[index].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return [float(lo), float(hi)]


def _trl_prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """Prompt text that TRL's tokenizer call turns into exactly our ``encode_prompt`` ids."""
    target = encode_prompt(tokenizer, prompt)
    candidates = [prompt + PROMPT_SEPARATOR]
    if tokenizer.bos_token is not None:
        candidates.append(tokenizer.bos_token + prompt + PROMPT_SEPARATOR)
    for text in candidates:
        if tokenizer(text=[text])["input_ids"][0] == target:
            return text
    raise ValueError(f"cannot write prompt {prompt!r} as text that tokenizes to the trainer's prompt ids")


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: read the clock only once the step has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours_step(trainer: GRPOTrainer) -> tuple[float, float]:
    """(generated tokens, seconds) of one full step of our trainer."""
    _sync(trainer.device)
    start = time.perf_counter()
    metrics = trainer.train_step()
    _sync(trainer.device)
    return metrics["charts/generated_tokens"], time.perf_counter() - start


def _trl_step(trainer: TRLGRPOTrainer, batches: Any) -> tuple[float, float]:
    """(generated tokens, seconds) of one optimizer step of TRL's trainer (no gradient accumulation)."""
    inputs = next(batches)
    device = trainer.accelerator.device
    _sync(device)
    start = time.perf_counter()
    trainer.training_step(trainer.model, inputs, None)
    trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad()
    trainer.state.global_step += 1
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens = sum(float(chunk["completion_mask"].sum()) for chunk in trainer._buffered_inputs)
    return tokens, elapsed


def measure_throughput(
    *,
    repeats: int = 3,
    prompts_per_step: int = 4,
    group_size: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    task: str = "arithmetic",
    difficulty: int = 1,
    model: str = "tiny",
    lr: float = 1e-5,
    seed: int = 0,
    num_threads: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Tokens/s of our ``GRPOTrainer`` and TRL's ``GRPOTrainer``, alternating, after one warm-up step each.

    model: "tiny" or a local causal-LM directory (``load_policy_model``); device: "cpu" or
    "cuda". Returns {"ours_tokens_per_s": mean, "trl_tokens_per_s": mean, "ours" and "trl":
    {"mean", "ci95", "median", "median_ci95", "runs"}, "ratio": ours mean / TRL mean,
    "ratio_ci95": paired bootstrap,
    "config": the settings, torch threads and library versions}.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    steps = repeats + 1  # one warm-up step each
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="lm_rl_throughput_") as tmp:
            ours = GRPOTrainer(
                TrainConfig(
                    method="grpo", task=task, difficulty=difficulty, model=model, out_dir=str(Path(tmp) / "ours"),
                    max_steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, lr=lr,
                    eval_problems=0, progress=False, seed=seed, device=device,
                )
            )
            stock, batches = _build_trl(
                tmp, steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, task=task,
                difficulty=difficulty, model=model, lr=lr, seed=seed, device=device,
            )
            _ours_step(ours)
            _trl_step(stock, batches)
            ours_rates: list[float] = []
            trl_rates: list[float] = []
            for _ in range(repeats):
                tokens, seconds = _ours_step(ours)
                ours_rates.append(tokens / seconds)
                tokens, seconds = _trl_step(stock, batches)
                trl_rates.append(tokens / seconds)
    finally:
        torch.set_num_threads(previous_threads)
    ours_summary = _rate_summary(ours_rates, seed)
    trl_summary = _rate_summary(trl_rates, seed)
    return {
        "ours_tokens_per_s": ours_summary["mean"],
        "trl_tokens_per_s": trl_summary["mean"],
        "ours": ours_summary,
        "trl": trl_summary,
        "ratio": ours_summary["mean"] / trl_summary["mean"],
        "ratio_ci95": ratio_ci(ours_rates, trl_rates, seed=seed),
        "config": {
            "repeats": repeats, "prompts_per_step": prompts_per_step, "group_size": group_size,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "task": task,
            "difficulty": difficulty, "model": model, "lr": lr, "seed": seed, "torch_threads": num_threads,
            "device": device, "trl_version": trl.__version__, "torch_version": torch.__version__,
            "tokens_per_s": "generated completion tokens / wall time of one full optimizer step",
        },
    }


def _build_trl(
    tmp: str, *, steps: int, prompts_per_step: int, group_size: int, max_new_tokens: int, temperature: float,
    top_p: float, task: str, difficulty: int, model: str, lr: float, seed: int, device: str,
) -> tuple[TRLGRPOTrainer, Any]:
    """TRL's stock trainer matched to our TrainConfig defaults, and an iterator over its generation batches."""
    policy, tokenizer = load_policy_model(model, seed=seed)
    # The same prompt stream our trainer draws (make_split is prefix-stable), in order.
    problems = make_split(task, "train", steps * prompts_per_step, difficulty, seed=seed)
    columns = problem_columns(problems)
    columns["prompt"] = [_trl_prompt_text(tokenizer, p.prompt) for p in problems]
    args = GRPOConfig(
        output_dir=str(Path(tmp) / "trl"), max_steps=steps, per_device_train_batch_size=prompts_per_step * group_size,
        num_generations=group_size, max_completion_length=max_new_tokens, temperature=temperature, top_p=top_p,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.0,
        loss_type="grpo", shuffle_dataset=False, disable_dropout=True, bf16=False, activation_checkpointing=False,
        use_cpu=device == "cpu", report_to="none", save_strategy="no", logging_strategy="no", seed=seed,
    )
    trainer = TRLGRPOTrainer(
        model=policy, reward_funcs=trl_reward(safe_reward(correctness_reward)), args=args,
        train_dataset=Dataset.from_dict(columns), processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    # Set by the Trainer's loop, which is bypassed here; one micro-batch per optimizer step.
    trainer.current_gradient_accumulation_steps = 1
    return trainer, iter(trainer.get_train_dataloader())
