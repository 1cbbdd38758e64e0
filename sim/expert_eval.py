"""Evaluate the scripted expert on the task suite: success rate per task with Wilson CIs.

    python -m sim.expert_eval --seeds 50 --split heldout --out runs/expert_eval.json [--tasks id,...] [--workers 2]

Runs every (task, seed) episode in-process through `sim.rollout.run_episode` (optionally
in a pool of worker processes, each with its own scene and kinematics), shows a progress
bar, writes a JSON report and prints a markdown table. The JSON holds the configuration,
the command line, the seeds and, per task: success_rate, ci95 [lo, hi] (Wilson score
interval), n, mean_steps (control steps, all episodes), mean_sim_s, mean_wall_s and the
failures with their seed and reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from runtime.stats import wilson_interval
from sim.expert import ExpertConfig, ScriptedExpert
from sim.panda import PandaKinematics
from sim.rollout import run_episode
from sim.scene import TabletopScene
from sim.tasks.suite import SPLITS, get_task, initial_state_seeds, load_suite

logger = logging.getLogger(__name__)

MAX_WORKERS = 2  # the evaluation shares its machine; more processes only contend for cores

_worker: dict[str, Any] = {}


def _init_worker(physics_hz: int, control_hz: int) -> None:
    kinematics = PandaKinematics()
    _worker["scene"] = TabletopScene(physics_hz=physics_hz, control_hz=control_hz)
    _worker["expert"] = ScriptedExpert(kinematics, control_hz=control_hz, config=ExpertConfig())
    _worker["kinematics"] = kinematics


def _run_one(job: tuple[str, int]) -> dict[str, Any]:
    task_id, seed = job
    start = time.perf_counter()
    result = run_episode(_worker["scene"], get_task(task_id), _worker["expert"], seed)
    out = result.to_dict()
    out["wall_s"] = time.perf_counter() - start
    return out


def summarize(task_ids: list[str], episodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    per_task: dict[str, dict[str, Any]] = {}
    for task_id in task_ids:
        eps = sorted((e for e in episodes if e["task_id"] == task_id), key=lambda e: e["seed"])
        n = len(eps)
        k = sum(e["success"] for e in eps)
        lo, hi = wilson_interval(k, n)
        per_task[task_id] = {
            "success_rate": k / n if n else 0.0,
            "ci95": [lo, hi],
            "n": n,
            "mean_steps": sum(e["total_steps"] for e in eps) / n if n else 0.0,
            "mean_sim_s": sum(e["duration_s"] for e in eps) / n if n else 0.0,
            "mean_wall_s": sum(e["wall_s"] for e in eps) / n if n else 0.0,
            "failures": [{"seed": e["seed"], "reason": e["reason"]} for e in eps if not e["success"]],
        }
    return per_task


def markdown_table(per_task: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| task | success | 95% CI | n | mean steps | mean sim s | mean wall s | failed seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task_id, r in per_task.items():
        failed = ", ".join(str(f["seed"]) for f in r["failures"][:5]) + (" ..." if len(r["failures"]) > 5 else "")
        lines.append(
            f"| {task_id} | {r['success_rate']:.0%} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['n']} | "
            f"{r['mean_steps']:.0f} | {r['mean_sim_s']:.1f} | {r['mean_wall_s']:.2f} | {failed or '-'} |"
        )
    total_n = sum(r["n"] for r in per_task.values())
    total_k = sum(round(r["success_rate"] * r["n"]) for r in per_task.values())
    if total_n:
        lo, hi = wilson_interval(total_k, total_n)
        lines.append(f"| **all** | {total_k / total_n:.1%} | [{lo:.3f}, {hi:.3f}] | {total_n} | | | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sim.expert_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50, help="episodes per task (the split's first N seeds)")
    parser.add_argument("--split", choices=SPLITS, default="heldout")
    parser.add_argument("--out", type=Path, required=True, help="JSON report path")
    parser.add_argument("--tasks", type=str, default=None, help="comma-separated task ids (default: the whole suite)")
    parser.add_argument("--workers", type=int, default=MAX_WORKERS, help=f"worker processes, 1..{MAX_WORKERS} (1 = in-process)")
    parser.add_argument("--physics-hz", type=int, default=240)
    parser.add_argument("--control-hz", type=int, default=20)
    args = parser.parse_args(argv)
    if args.seeds <= 0:
        parser.error(f"--seeds must be > 0, got {args.seeds}")
    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be in [1, {MAX_WORKERS}], got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    task_ids = sorted(load_suite()) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task_id in task_ids:
        get_task(task_id)  # UnknownTaskError lists the valid ids
    seeds = initial_state_seeds(args.split, args.seeds)
    jobs = [(t, s) for t in task_ids for s in seeds]
    episodes: list[dict[str, Any]] = []
    start = time.perf_counter()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("episodes", total=len(jobs))

        def record(ep: dict[str, Any]) -> None:
            episodes.append(ep)
            ok = sum(e["success"] for e in episodes)
            progress.update(bar, advance=1, description=f"episodes (success {ok}/{len(episodes)})")

        if args.workers == 1:
            _init_worker(args.physics_hz, args.control_hz)
            for job in jobs:
                record(_run_one(job))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.physics_hz, args.control_hz)) as pool:
                for ep in pool.imap_unordered(_run_one, jobs, chunksize=1):
                    record(ep)
    wall_s = time.perf_counter() - start
    per_task = summarize(task_ids, episodes)
    report = {
        "config": {
            "split": args.split,
            "n_seeds": args.seeds,
            "tasks": task_ids,
            "workers": args.workers,
            "physics_hz": args.physics_hz,
            "control_hz": args.control_hz,
            "expert": asdict(ExpertConfig()),
            "wall_s": wall_s,
        },
        "command": "python -m sim.expert_eval " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "seeds": seeds,
        "per_task": per_task,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown_table(per_task))
    console.print(f"wrote {args.out} ({len(jobs)} episodes in {wall_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
