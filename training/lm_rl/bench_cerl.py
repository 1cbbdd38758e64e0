"""`helmstack bench lm --suite cerl`: the CERL table, per domain, with the Erasure Dependence Protocol.

What one run does (resumable: re-running with the same ``--out`` skips every finished piece):
1. SFT start per domain: the tiny model trained from scratch on committed-format traces and
   their follow-up turns (``committed_sft``), a share ``start_long_fraction`` of them committing
   the long (sufficient) state and the rest only the answer, so RL starts from a policy that
   does both. Saved to ``<out>/<domain>/start``.
2. Per domain x seed, from that start:
   - ``sft``: the start itself;
   - ``grpo``: correctness-only RL (plain GRPO on the final answer), ``rl_steps`` steps;
   - ``long_sft``: long-answer SFT, ``long_sft_steps`` more SFT steps on traces that all commit
     the sufficient state (``long_fraction=1``);
   - ``cerl``: CERL (``methods/cerl.py``, variant ``cerl_variant``), ``rl_steps`` steps with the
     same prompts, group size and learning rate as ``grpo``.
   Each final model goes through the Erasure Dependence Protocol (``training.lm_rl.erasure``) on
   ``eval_problems`` held-out TEST problems of the seed. Jobs run in ``workers`` processes with
   one torch thread each.
3. Aggregation per domain x method over seeds: mean ``acc_keep``, ``acc_erased``, ``flip_rate``
   (and ``acc_answer``, ``reverse_flip_rate``), ``ci95_acc_erased`` a Student-t interval over the
   seeds (``runtime.stats.mean_ci``, clipped to [0, 1]); per-seed values are kept.

Outputs under ``--out``: ``cerl.json`` ({"domains": {domain: {method: {...}}}, "config",
"command", ...}), ``cerl.md`` (the table) and ``cerl.png`` (kept vs erased accuracy per domain
and method).

The defaults are the README's table: about an hour on two CPU cores with two workers
(docs/cerl.md has the measured times), most of it the four 2,000-step starts. With 500 SFT
steps the logic and science_qa starts sat at the floor; math stays there even at 2,000.
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
    clip_to_unit,
    finished,
    publish,
    run_jobs,
    save_result,
    write_json_atomically,
)
from training.lm_rl.erasure import DEFAULT_DIFFICULTY, DOMAINS, FOLLOWUP_TOKENS, check_domains

logger = logging.getLogger(__name__)

METHODS = ("sft", "grpo", "long_sft", "cerl")
OUTPUTS = ("cerl.json", "cerl.md", "cerl.png")
REPORTED = ("acc_keep", "acc_erased", "flip_rate", "reverse_flip_rate", "acc_answer", "malformed_rate")


@dataclass
class CerlBenchConfig:
    """Sizes of the CERL suite; the defaults are the README's table (about an hour on 2 cores)."""

    domains: tuple[str, ...] = tuple(DOMAINS)
    difficulty: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_DIFFICULTY))
    seeds: tuple[int, ...] = (0, 1, 2)
    sft_steps: int = 2000
    sft_batch_size: int = 16
    sft_lr: float = 3e-3
    start_long_fraction: float = 0.3
    long_sft_steps: int = 60
    long_sft_lr: float = 1e-3
    rl_steps: int = 12
    prompts_per_step: int = 4
    group_size: int = 8
    lr: float = 1e-4
    temperature: float = 1.0
    cerl_variant: str = "erasure_only"
    followup_tokens: int = FOLLOWUP_TOKENS
    eval_problems: int = 96
    workers: int = 2

    def __post_init__(self) -> None:
        from training.lm_rl.methods.cerl import VARIANTS

        self.domains = tuple(check_domains(list(self.domains)))
        self.seeds = tuple(self.seeds)
        if not self.seeds:
            raise ValueError("CerlBenchConfig.seeds must not be empty")
        for domain in self.domains:
            level = self.difficulty.get(domain, DEFAULT_DIFFICULTY[domain])
            if isinstance(level, bool) or not isinstance(level, int) or level < 1:
                raise ValueError(f"CerlBenchConfig.difficulty[{domain!r}] must be an int >= 1, got {level!r}")
        require_positive_ints(self, ("sft_steps", "sft_batch_size", "long_sft_steps", "rl_steps", "prompts_per_step",
                                     "followup_tokens", "eval_problems", "workers"))
        if self.group_size < 2:
            raise ValueError(f"CerlBenchConfig.group_size must be >= 2, got {self.group_size}")
        for name in ("sft_lr", "long_sft_lr", "lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CerlBenchConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.start_long_fraction <= 1.0:
            raise ValueError(f"CerlBenchConfig.start_long_fraction must be in [0, 1], got {self.start_long_fraction}")
        if self.cerl_variant not in VARIANTS:
            raise ValueError(f"CerlBenchConfig.cerl_variant must be one of {VARIANTS}, got {self.cerl_variant!r}")

    def level(self, domain: str) -> int:
        return self.difficulty.get(domain, DEFAULT_DIFFICULTY[domain])


def _budget(config: CerlBenchConfig, domain: str) -> int:
    """Sampling budget of a domain: fits its longest long-state trace (training.lm_rl.erasure)."""
    from training.lm_rl.erasure import completion_budget
    from training.lm_rl.tasks import make_split
    from training.lm_rl.tokenizer import build_tokenizer

    return completion_budget(build_tokenizer(), make_split(DOMAINS[domain], "train", 64, config.level(domain)))


def _start_job(job: dict[str, Any]) -> str:
    """Train (or find) the SFT start of one domain; returns its directory."""
    import torch

    torch.set_num_threads(1)
    from training.lm_rl.committed import committed_sft
    from training.lm_rl.models import load_policy_model

    config = CerlBenchConfig(**job["config"])
    start = Path(job["start"])
    if (start / "config.json").exists():  # save_atomically only leaves complete directories
        return str(start)
    domain = job["domain"]
    model, tokenizer = load_policy_model("tiny", seed=0)
    metrics = committed_sft(
        model, tokenizer, [DOMAINS[domain]], config.level(domain), steps=config.sft_steps,
        batch_size=config.sft_batch_size, lr=config.sft_lr, seed=0, long_fraction=config.start_long_fraction,
        progress=False, eval_problems=0, out_dir=start,
    )
    (start.parent / "start_metrics.json").write_text(json.dumps(metrics, indent=2))
    return str(start)


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (domain, method, seed): train from the start when the method trains, then the protocol."""
    import torch

    torch.set_num_threads(1)
    from training.lm_rl.committed import committed_sft
    from training.lm_rl.erasure import evaluate_erasure
    from training.lm_rl.models import load_policy_model
    from training.lm_rl.tasks import make_split
    from training.lm_rl.trainer import GRPOTrainer, TrainConfig, list_checkpoints

    config = CerlBenchConfig(**job["config"])
    domain, method, seed = job["domain"], job["method"], job["seed"]
    task, level, budget = DOMAINS[domain], config.level(domain), job["budget"]
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    generated_tokens = 0
    if method == "sft":
        model, tokenizer = load_policy_model(job["start"])
    elif method == "long_sft":
        final = run_dir / "model"
        if (final / "config.json").exists():
            model, tokenizer = load_policy_model(str(final))
        else:
            model, tokenizer = load_policy_model(job["start"])
            committed_sft(
                model, tokenizer, [task], level, steps=config.long_sft_steps, batch_size=config.sft_batch_size,
                lr=config.long_sft_lr, seed=1000 + seed, long_fraction=1.0, progress=False, eval_problems=0,
                out_dir=final,
            )
    else:
        options = {"variant": config.cerl_variant, "followup_tokens": config.followup_tokens,
                   "eval_problems": 0} if method == "cerl" else {}
        train_config = TrainConfig(
            method=method, method_options=options, task=task, difficulty=level, model=job["start"],
            out_dir=str(run_dir), max_steps=config.rl_steps, prompts_per_step=config.prompts_per_step,
            group_size=config.group_size, max_new_tokens=budget, temperature=config.temperature, lr=config.lr,
            save_every=max(1, config.rl_steps // 2), eval_problems=0, seed=seed, device="cpu", progress=False,
        )
        trainer = GRPOTrainer(train_config, resume=bool(list_checkpoints(run_dir)))
        summary = trainer.train()
        generated_tokens = summary["generated_tokens"]
        model, tokenizer = trainer.model, trainer.tokenizer
    test = make_split(task, "test", config.eval_problems, level, seed=seed)
    stats = evaluate_erasure(model, tokenizer, test, budget, config.followup_tokens)
    result = {
        "domain": domain, "method": method, "seed": seed, "task": task, "difficulty": level,
        **{key: stats[key] for key in REPORTED}, "protocol": stats,
        "generated_tokens": generated_tokens, "wall_s": time.perf_counter() - started,
    }
    save_result(run_dir, result)
    return result


def _aggregate(config: CerlBenchConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    domains: dict[str, Any] = {}
    for domain in config.domains:
        entry: dict[str, Any] = {}
        for method in METHODS:
            runs = sorted((r for r in results if r["domain"] == domain and r["method"] == method),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            row: dict[str, Any] = {}
            for key in REPORTED:
                stats = mean_ci([r[key] for r in runs])
                row[key] = stats["mean"]
                row[f"seeds_{key}"] = stats["values"]
                if key == "acc_erased":
                    row["ci95_acc_erased"] = clip_to_unit(stats["ci95"])
            row["seeds"] = [r["seed"] for r in runs]
            row["eval_problems_per_seed"] = runs[0]["protocol"]["n"]
            row["generated_tokens"] = mean_ci([r["generated_tokens"] for r in runs])["mean"]
            row["wall_s"] = sum(r["wall_s"] for r in runs)
            entry[method] = row
        domains[domain] = entry
    return domains


def _table(summary: dict[str, Any]) -> str:
    lines = [
        "| domain | method | follow-up acc, thoughts kept | follow-up acc, thoughts erased (95% CI over seeds) "
        "| flip rate (kept right -> erased wrong) | answer acc |",
        "|---|---|---|---|---|---|",
    ]
    for domain, entry in summary["domains"].items():
        for method, row in entry.items():
            lo, hi = row["ci95_acc_erased"]
            lines.append(
                f"| {domain} | {method} | {row['acc_keep']:.3f} | {row['acc_erased']:.3f} [{lo:.3f}, {hi:.3f}] "
                f"| {row['flip_rate']:.3f} | {row['acc_answer']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # benchmark machines have no display
    import matplotlib.pyplot as plt
    import numpy as np

    domains = list(summary["domains"])
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.8), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        entry = summary["domains"][domain]
        methods = list(entry)
        x = np.arange(len(methods))
        keep = [entry[m]["acc_keep"] for m in methods]
        erased = np.array([entry[m]["acc_erased"] for m in methods])
        ci = np.array([entry[m]["ci95_acc_erased"] for m in methods]).reshape(-1, 2)
        ax.bar(x - 0.2, keep, width=0.4, label="thoughts kept")
        ax.bar(x + 0.2, erased, width=0.4, label="thoughts erased",
               yerr=[np.clip(erased - ci[:, 0], 0, None), np.clip(ci[:, 1] - erased, 0, None)], capsize=3)
        ax.set_xticks(x, methods)
        ax.set_ylim(0, 1.05)
        ax.set_title(domain)
        ax.set_ylabel("follow-up accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("CERL: follow-up accuracy with thoughts kept vs erased (95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_cerl_bench(
    config: CerlBenchConfig,
    out_dir: str | os.PathLike,
    command: str | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run (or finish) the CERL suite into out_dir; returns the cerl.json content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config_dict = asdict(config)
    starts = {domain: out / domain / "start" for domain in config.domains}
    run_jobs(_start_job, [{"config": config_dict, "domain": d, "start": str(s)} for d, s in starts.items()
                          if not (s / "config.json").exists()], config.workers, "cerl sft starts")
    budgets = {domain: _budget(config, domain) for domain in config.domains}
    jobs, results = [], []
    for domain in config.domains:
        for method in METHODS:
            for seed in config.seeds:
                run_dir = out / domain / f"{method}-seed{seed}"
                done = finished(run_dir)
                if done is not None:
                    results.append(done)
                    continue
                jobs.append({"config": config_dict, "domain": domain, "method": method, "seed": seed,
                             "start": str(starts[domain]), "run_dir": str(run_dir), "budget": budgets[domain]})
    # Longest first (RL runs), so the two workers finish close together.
    order = {"cerl": 0, "grpo": 1, "long_sft": 2, "sft": 3}
    jobs.sort(key=lambda j: order[j["method"]])
    results += run_jobs(_run_job, jobs, config.workers, "cerl runs",
                        label=lambda r: f"{r['domain']}/{r['method']}/s{r['seed']} erased={r['acc_erased']:.3f}")
    summary: dict[str, Any] = {
        "domains": _aggregate(config, results),
        "config": {**config_dict, "max_new_tokens": budgets},
        "command": command or bench_command(),
        "wall_s": time.perf_counter() - started,
    }
    starts_meta = {}
    for domain in config.domains:
        metrics_file = out / domain / "start_metrics.json"
        if metrics_file.exists():
            starts_meta[domain] = json.loads(metrics_file.read_text())
    summary["sft_start"] = starts_meta
    summary["plot"] = str(_plot(summary, out / "cerl.png"))
    write_json_atomically(out / "cerl.json", summary)
    (out / "cerl.md").write_text(_table(summary))
    publish(out, OUTPUTS, results_dir)
    logger.info("cerl suite done in %.0f s", summary["wall_s"])
    return summary
