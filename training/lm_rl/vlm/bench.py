"""`helmstack bench lm --suite vlm`: GRPO vs Difference Feedback on the visual tasks.

What one run of the suite does (every stage resumable: re-running with the same ``--out``
skips finished work and resumes unfinished training runs from their checkpoints):
1. Warm start, once per task: TinyVLM trained from scratch by supervised fine-tuning on the
   task's TRAIN traces (``vlm_sft_warm_start``, a share of them with the hint line), saved to
   ``<out>/starts/<task>``. Both methods and every seed start from these weights.
2. Runs: for each task x method x seed, ``GRPOTrainer`` from the start until
   ``token_budget`` tokens were sampled — matched compute: Difference Feedback's repair
   tokens count against the same budget as GRPO's samples. Worker processes, one torch
   thread each. Held-out greedy accuracy on the seed's TEST problems (the same problems for
   both methods of a seed), plus the start's accuracy on them.
3. Aggregate: per task and method the mean over seeds with a Student-t 95% CI (cut to [0, 1])
   (``runtime.stats.mean_ci``), the per-seed difference to GRPO, and the mean over tasks.

Outputs under ``--out``: ``vlm.json`` (``tasks.<task>.<method>.{acc, ci95, seeds, ...}``,
``mean.<method>``, ``mean_ci95``, ``start``, ``config``, ``command``), ``vlm.md`` (the table)
and ``vlm_accuracy.png`` (bars with 95% CIs per task).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.config import require_positive_ints
from runtime.stats import mean_ci
from training.lm_rl.bench_runs import (
    bench_command,
    budget_train_config,
    clip_to_unit,
    finished,
    publish,
    run_jobs,
    save_result,
    step_means,
)

logger = logging.getLogger(__name__)

START_METRICS = "start_metrics.json"
TASKS = ("shape_count", "bar_compare", "table_read")
METHODS = ("grpo", "difference_feedback")
OUTPUTS = ("vlm.json", "vlm.md", "vlm_accuracy.png")


@dataclass
class VLMBenchConfig:
    """Sizes of the comparison. Measured CPU cost per process (one thread): 0.25 s per SFT step
    of 16 examples, ~0.8 s per GRPO step and ~0.9 s per Difference Feedback step (~1,100-1,250
    sampled tokens). The defaults then need ~1,600 CPU-seconds for 3 tasks x 2 methods x 3
    seeds: about 15 minutes on two idle cores with two workers (docs/difference_feedback.md)."""

    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    difficulty: int = 1
    sft_steps: int = 600
    sft_batch_size: int = 16
    sft_lr: float = 3e-3
    hint_fraction: float = 0.3
    token_budget: int = 60_000
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 48
    lr: float = 5e-5
    temperature: float = 1.0
    eval_problems: int = 100
    evals_per_run: int = 2
    workers: int = 2
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from training.lm_rl.methods import method_names
        from training.lm_rl.vlm.tasks import VISUAL_TASKS

        self.tasks, self.methods, self.seeds = tuple(self.tasks), tuple(self.methods), tuple(self.seeds)
        unknown = sorted(set(self.tasks) - set(VISUAL_TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"VLMBenchConfig.tasks has unknown {unknown or 'nothing'}; valid: {sorted(VISUAL_TASKS)}")
        unknown = sorted(set(self.methods) - set(method_names()))
        if unknown:
            raise ValueError(f"VLMBenchConfig.methods has unknown {unknown}; valid: {', '.join(method_names())}")
        if "grpo" not in self.methods:
            raise ValueError("VLMBenchConfig.methods must include 'grpo', the baseline")
        if not self.seeds:
            raise ValueError("VLMBenchConfig.seeds must not be empty")
        require_positive_ints(self, ("difficulty", "sft_steps", "sft_batch_size", "token_budget", "prompts_per_step",
                                     "max_new_tokens", "eval_problems", "evals_per_run", "workers"))
        if self.group_size < 2:
            raise ValueError(f"VLMBenchConfig.group_size must be >= 2, got {self.group_size}")
        if not 0.0 <= self.hint_fraction <= 1.0:
            raise ValueError(f"VLMBenchConfig.hint_fraction must be in [0, 1], got {self.hint_fraction}")
        for name in ("sft_lr", "lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"VLMBenchConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def tokens_per_step(self) -> int:
        """Upper bound of plain GRPO's sampled tokens per step."""
        return self.prompts_per_step * self.group_size * self.max_new_tokens


def _start_dir(out: Path, task: str) -> Path:
    return out / "starts" / task


def _run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "runs" / task / f"{method}-seed{seed}"


def _warm_start_one(job: dict[str, Any]) -> dict[str, Any]:
    """SFT one task's start in a worker process (one torch thread); returns its metrics."""
    import torch

    torch.set_num_threads(1)
    from training.lm_rl.vlm.models import TINY_VLM, load_vlm
    from training.lm_rl.vlm.sampling import VisionPrompts
    from training.lm_rl.vlm.sft import vlm_sft_warm_start

    config = VLMBenchConfig(**job["config"])
    started = time.perf_counter()
    parts = load_vlm(TINY_VLM, seed=0)
    metrics = vlm_sft_warm_start(
        parts.model, VisionPrompts.from_parts(parts), [job["task"]], config.difficulty, steps=config.sft_steps,
        batch_size=config.sft_batch_size, lr=config.sft_lr, seed=0, hint_fraction=config.hint_fraction,
        out_dir=job["start"], progress=False, eval_problems=config.eval_problems,
        max_new_tokens=config.max_new_tokens,
    )
    metrics["wall_s"] = time.perf_counter() - started
    Path(job["metrics"]).write_text(json.dumps(metrics, indent=2))
    return {"task": job["task"], **metrics}


def _train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One task x method x seed run in a worker process; returns (and stores) its record."""
    import torch

    torch.set_num_threads(1)  # parallelism comes from the worker processes
    from training.lm_rl.trainer import GRPOTrainer, list_checkpoints, read_metrics
    from training.lm_rl.vlm.policy import load_any_policy, vlm_greedy_accuracy

    config = VLMBenchConfig(**job["config"])
    run_dir = Path(job["run_dir"])
    started = time.perf_counter()
    trainer = GRPOTrainer(budget_train_config(config, job, job["task"]), resume=bool(list_checkpoints(run_dir)))
    summary = trainer.train()
    start_acc = None
    if job["method"] == "grpo":
        # The start on the same TEST problems (they depend on the seed, not the method).
        start_model, _, vision = load_any_policy(job["start"])
        start_acc = vlm_greedy_accuracy(start_model, vision, trainer.test_problems, config.max_new_tokens)[
            "eval/accuracy"]
    means = step_means(read_metrics(run_dir), lambda key: key.startswith("method/") or key == "charts/accuracy")
    result = {
        "task": job["task"],
        "method": job["method"],
        "seed": job["seed"],
        "test_acc": summary["eval/accuracy"],
        "start_test_acc": start_acc,
        "steps": summary["step"],
        "generated_tokens": summary["generated_tokens"],
        "wall_s": time.perf_counter() - started,
        "eval": {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/")},
        "train_means": means,
    }
    save_result(run_dir, result)
    return result


def _warm_starts(config: VLMBenchConfig, out: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    jobs = []
    for task in config.tasks:
        start, metrics = _start_dir(out, task), out / "starts" / f"{task}.{START_METRICS}"
        if (start / "config.json").exists() and metrics.exists():
            done[task] = json.loads(metrics.read_text())
            continue
        jobs.append({"config": asdict(config), "task": task, "start": str(start), "metrics": str(metrics)})
    (out / "starts").mkdir(parents=True, exist_ok=True)
    for record in run_jobs(_warm_start_one, jobs, config.workers, "vlm warm starts"):
        done[record.pop("task")] = record
    return done


def _runs(config: VLMBenchConfig, out: Path) -> list[dict[str, Any]]:
    jobs, results = [], []
    for seed in config.seeds:
        for task in config.tasks:
            for method in config.methods:
                run_dir = _run_dir(out, task, method, seed)
                done = finished(run_dir)
                if done is not None:
                    results.append(done)
                    continue
                jobs.append({"config": asdict(config), "task": task, "method": method, "seed": seed,
                             "run_dir": str(run_dir), "start": str(_start_dir(out, task))})
    return results + run_jobs(_train_one, jobs, config.workers, "vlm runs",
                              label=lambda r: f"{r['task']}/{r['method']}/s{r['seed']} acc={r['test_acc']:.3f}")


def aggregate(config: VLMBenchConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """tasks.<task>.<method> = {acc, ci95, seeds, ...}; mean.<method> over tasks; start accuracy."""
    tasks: dict[str, Any] = {}
    per_seed_means: dict[str, dict[int, list[float]]] = {m: {} for m in config.methods}
    for task in config.tasks:
        entry: dict[str, Any] = {}
        grpo = {r["seed"]: r["test_acc"] for r in results if r["task"] == task and r["method"] == "grpo"}
        for method in config.methods:
            runs = sorted((r for r in results if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
            if not runs:
                continue
            stats = mean_ci([r["test_acc"] for r in runs])
            deltas = mean_ci([r["test_acc"] - grpo[r["seed"]] for r in runs if r["seed"] in grpo] or [0.0])
            entry[method] = {
                "acc": stats["mean"], "ci95": clip_to_unit(stats["ci95"]), "seeds": stats["values"],
                "delta_vs_grpo": {"mean": deltas["mean"], "ci95": deltas["ci95"]},
                "generated_tokens": sum(r["generated_tokens"] for r in runs) / len(runs),
                "steps": sum(r["steps"] for r in runs) / len(runs),
                "wall_s": sum(r["wall_s"] for r in runs),
                "train_means": {k: sum(r["train_means"].get(k, 0.0) for r in runs) / len(runs)
                                for k in sorted({k for r in runs for k in r["train_means"]})},
            }
            for r in runs:
                per_seed_means[method].setdefault(r["seed"], []).append(r["test_acc"])
        starts = [r["start_test_acc"] for r in results
                  if r["task"] == task and r["method"] == "grpo" and r.get("start_test_acc") is not None]
        if starts:
            stats = mean_ci(starts)
            entry["start"] = {"acc": stats["mean"], "ci95": clip_to_unit(stats["ci95"]), "seeds": stats["values"]}
        tasks[task] = entry
    mean: dict[str, float] = {}
    mean_ci95: dict[str, list[float]] = {}
    for method, by_seed in per_seed_means.items():
        complete = [sum(v) / len(v) for v in by_seed.values() if len(v) == len(config.tasks)]
        if complete:
            stats = mean_ci(complete)
            mean[method], mean_ci95[method] = stats["mean"], clip_to_unit(stats["ci95"])
    return {"tasks": tasks, "mean": mean, "mean_ci95": mean_ci95}


def table(summary: dict[str, Any]) -> str:
    methods = summary["config"]["methods"]
    head = "| task | " + " | ".join(f"{m} (95% CI)" for m in methods) + " | DF minus GRPO (paired) | SFT start |"
    rows = [head, "|" + "---|" * (len(methods) + 3)]

    def cell(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "-"
        return f"{entry['acc']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"

    for task, entry in summary["tasks"].items():
        delta = entry.get("difference_feedback", {}).get("delta_vs_grpo")
        delta_text = f"{delta['mean']:+.3f} [{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]" if delta else "-"
        rows.append(f"| {task} | " + " | ".join(cell(entry.get(m)) for m in methods)
                    + f" | {delta_text} | {cell(entry.get('start'))} |")
    means = summary["mean"]
    rows.append("| mean over tasks | " + " | ".join(
        f"{means[m]:.3f} [{summary['mean_ci95'][m][0]:.3f}, {summary['mean_ci95'][m][1]:.3f}]" if m in means else "-"
        for m in methods) + " | | |")
    return "\n".join(rows) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # benchmark machines have no display
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    methods = summary["config"]["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, method in enumerate(methods):
        xs, means, errors = [], [], [[], []]
        for i, task in enumerate(tasks):
            entry = summary["tasks"][task].get(method)
            if entry is None:
                continue
            xs.append(i + (k - (len(methods) - 1) / 2) * width)
            means.append(entry["acc"])
            errors[0].append(entry["acc"] - entry["ci95"][0])
            errors[1].append(entry["ci95"][1] - entry["acc"])
        ax.bar(xs, means, width=width, yerr=errors, capsize=3, label=method, alpha=0.85)
    for i, task in enumerate(tasks):
        start = summary["tasks"][task].get("start")
        if start:
            ax.hlines(start["acc"], i - 0.45, i + 0.45, colors="grey", linestyles="--",
                      label="SFT start" if i == 0 else None)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.set_title(f"TinyVLM, {summary['config']['token_budget']} sampled tokens per run, 95% CI over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_vlm_bench(
    config: VLMBenchConfig,
    out_dir: str | os.PathLike,
    command: str | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run (or finish) the suite into out_dir; returns the vlm.json content.

    results_dir: also copy vlm.json, vlm.md and vlm_accuracy.png there (e.g. benchmarks/results).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    starts = _warm_starts(config, out)
    results = _runs(config, out)
    summary: dict[str, Any] = {
        **aggregate(config, results),
        "sft": starts,
        "config": asdict(config),
        "command": command or bench_command(),
        "runs": sorted(results, key=lambda r: (r["task"], r["method"], r["seed"])),
    }
    summary["wall_s_this_invocation"] = time.perf_counter() - started
    (out / "vlm.json").write_text(json.dumps(summary, indent=2))
    (out / "vlm.md").write_text(table(summary))
    plot(summary, out / "vlm_accuracy.png")
    publish(out, OUTPUTS, results_dir)
    return summary
