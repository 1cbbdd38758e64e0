"""What the three `helmstack bench lm` suites share: worker processes, resumable run results,
matched-budget training runs and publishing the outputs.

Each suite (``bench.py``, ``bench_cerl.py``, ``vlm/bench.py``) builds a list of jobs (plain
dicts, so they cross to ``spawn`` workers), skips those whose run directory already holds a
``result.json`` (``finished``), runs the rest with ``run_jobs`` and writes each job's record with
``save_result`` — the file appears whole or not at all, so a killed benchmark resumes cleanly.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

RESULT_FILE = "result.json"


def bench_command() -> str:
    """The command line as a user types it, for the results file."""
    return shlex.join(["helmstack", *sys.argv[1:]])


def write_json_atomically(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2))
    os.replace(staging, path)


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The record of a run that completed earlier, or None."""
    path = run_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def save_result(run_dir: Path, result: dict[str, Any]) -> None:
    write_json_atomically(run_dir / RESULT_FILE, result)


def run_jobs(
    fn: Callable[[dict[str, Any]], Any],
    jobs: list[dict[str, Any]],
    workers: int,
    desc: str,
    label: Callable[[Any], str] | None = None,
) -> list[Any]:
    """fn over jobs in `workers` processes, with a progress bar; results in job order.

    One worker runs in this process (no interpreter start-up per job). `label` turns a finished
    job's result into the bar's postfix.
    """
    if not jobs:
        return []
    bar = tqdm(total=len(jobs), desc=desc, dynamic_ncols=True)
    results = []

    def record(result: Any) -> None:
        results.append(result)
        if label is not None:
            bar.set_postfix(last=label(result))
        bar.update(1)

    if workers == 1:
        for job in jobs:
            record(fn(job))
    else:
        # spawn: a forked torch process with threads already started can deadlock.
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            for result in pool.map(fn, jobs):
                record(result)
    bar.close()
    return results


def budget_train_config(config: Any, job: dict[str, Any], task: str) -> Any:
    """The TrainConfig of one run that samples `config.token_budget` tokens from `job["start"]`.

    Matched compute: every method stops at the same number of sampled tokens, whatever its group
    construction costs; `max_steps` is only a bound well above what the budget allows. Held-out
    accuracy is measured `config.evals_per_run` times along the way.
    """
    from training.lm_rl.trainer import TrainConfig

    steps_at_budget = math.ceil(config.token_budget / config.tokens_per_step)
    return TrainConfig(
        method=job["method"], method_options=config.method_options.get(job["method"], {}),
        task=task, difficulty=config.difficulty, model=job["start"], out_dir=job["run_dir"],
        max_steps=4 * steps_at_budget + 8, max_generated_tokens=config.token_budget,
        prompts_per_step=config.prompts_per_step, group_size=config.group_size,
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, lr=config.lr,
        save_every=max(1, math.ceil(steps_at_budget / config.evals_per_run)), eval_problems=config.eval_problems,
        seed=job["seed"], device="cpu", progress=False,
    )


def clip_to_unit(ci95: list[float]) -> list[float]:
    """A Student-t interval of a fraction, cut to [0, 1] (with 3 seeds it can reach past both)."""
    return [max(0.0, ci95[0]), min(1.0, ci95[1])]


def step_means(records: Iterable[dict[str, Any]], keys: Callable[[str], bool]) -> dict[str, float]:
    """Mean over a run's training-step records of each finite metric whose name `keys` accepts;
    the name loses its "group/" prefix ("method/flip_rate" -> "flip_rate")."""
    steps = [r for r in records if "charts/reward" in r]
    means = {}
    for key in sorted({k for r in steps for k in r if keys(k)}):
        values = [r[key] for r in steps if key in r and math.isfinite(r[key])]
        if values:
            means[key.split("/", 1)[1]] = sum(values) / len(values)
    return means


def publish(out: Path, names: Iterable[str], results_dir: str | os.PathLike | None) -> None:
    """Copy a suite's outputs (not its run directories) to results_dir, e.g. benchmarks/results."""
    if results_dir is None:
        return
    target = Path(results_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(out / name, target / name)
