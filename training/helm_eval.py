"""The HELM table: base policy vs. longer context vs. HELM without memory vs. HELM.

    helmstack eval helm --out runs/helm-eval [--episodes 100] [--seeds 0,1,2]

Every row runs the same `HarnessController` over the same simulated environment
(sim.harness_env.SceneHarnessEnv), so rows differ only in what the papers' rows differ in:

    base          the BC base policy, pass-through harness (no verification, no recovery)
    base_context  the BC policy trained with a history of H = 32 frames, pass-through
    helm_nomem    base policy + harness (verify, resample / roll back / replan) with the
                  state verifier trained without memory; rollback targets are still kept
    helm          base policy + harness with the memory-conditioned state verifier and the
                  episodic memory (open_clip-keyed keyframes) it retrieves from

Two protocols: `long_horizon` (held-out initial states of the tasks with >= 4 subgoals)
and `recovery` (the same, with one mid-episode perturbation: sim.perturbations). One
attempt of a subgoal has the base policy's step budget (task.max_steps_per_subgoal), so
pass-through equals `sim.rollout.run_episode`. A "seed" is a disjoint block of held-out
initial states (and perturbation draws); success rates come with Wilson 95% intervals
over all episodes of a row and per-seed rates. HELM's added latency per decision is the
time spent in the verifier including memory retrieval and the query's image embedding
(not the policy, not rendering), measured with the memory pre-filled to
`overhead_keyframes` keyframes (keyframes of earlier episodes, as a robot's memory grows).

Writes helm.json (the schema of the issue plus per-episode records), helm.md and
helm.png. Episodes run in a pool of worker processes; finished (row, protocol, seed,
task, initial state) results are kept in `<out>/episodes.jsonl` and skipped on a rerun.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from policies.base import ActionChunk, Observation
from policies.bc import BCPolicy
from policies.proposer import PolicyProposer, ResampleConfig
from runtime.harness_controller import HarnessController, HarnessControllerConfig, KeyframeLog
from runtime.helm_memory import HelmMemory
from runtime.planner import RulePlanner
from runtime.state_verifier import StateVerifier
from runtime.stats import mean_ci, wilson_interval
from sim.harness_env import SceneHarnessEnv
from sim.perturbations import Perturber, draw_perturbation
from sim.scene import TabletopScene
from sim.tasks.suite import HELDOUT_SEED_BASE, get_task, load_suite
from training.bc.demos import make_cameras, render_cameras

logger = logging.getLogger(__name__)

ROWS: tuple[str, ...] = ("base", "base_context", "helm_nomem", "helm")
PROTOCOLS: tuple[str, ...] = ("long_horizon", "recovery")
SEED_BLOCK = 10_000  # held-out initial states of evaluation seed s: HELDOUT_SEED_BASE + s * SEED_BLOCK + i


def long_horizon_tasks() -> tuple[str, ...]:
    return tuple(sorted(t for t, spec in load_suite().items() if len(spec.subgoals) >= 4))


@dataclass(frozen=True)
class HelmEvalConfig:
    out_dir: str
    policy: str = "runs/bc"
    context_policy: str = "runs/bc-h32"
    verifier: str = "runs/sv/best"
    verifier_nomem: str = "runs/sv-nomem/best"
    encoder: str = "runs/encoder"
    rows: tuple[str, ...] = ROWS
    protocols: tuple[str, ...] = PROTOCOLS
    tasks: tuple[str, ...] = ()  # default: the long-horizon tasks
    episodes: int = 100  # per row, protocol and seed (spread over the tasks)
    seeds: tuple[int, ...] = (0, 1, 2)
    resample_noise_rad: float = 0.01
    n_resample: int = 2
    max_rollbacks: int = 1
    max_replans: int = 1
    max_retries_subgoal: int = 6
    max_retries_episode: int = 12
    after_rejections: str = "least_risky"  # HarnessControllerConfig.after_rejections
    overhead_keyframes: int = 10_000
    # The verifier comparison (helmstack eval verifier) whose AUROC/F1/precision go into
    # helm.json's "verifier" section; "" or a missing file leaves the section out.
    verifier_results: str = "benchmarks/results/verifier.json"
    image_size: int = 64
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rows) - set(ROWS)) + sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"unknown rows/protocols {unknown}; rows: {list(ROWS)}, protocols: {list(PROTOCOLS)}")
        if self.episodes < 1 or not self.seeds:
            raise ValueError(f"episodes must be >= 1 and seeds non-empty, got {self.episodes}, {list(self.seeds)}")
        if not 1 <= self.workers <= (os.cpu_count() or 1):
            raise ValueError(f"workers must be in [1, {os.cpu_count() or 1}], got {self.workers}")

    def task_ids(self) -> tuple[str, ...]:
        return self.tasks or long_horizon_tasks()

    def jobs(self) -> list[tuple[str, str, int, str, int]]:
        """(row, protocol, seed, task, initial state): `episodes` per (row, protocol, seed),
        round-robin over the tasks; the same initial states for every row."""
        tasks = self.task_ids()
        out = []
        for seed in self.seeds:
            for i in range(self.episodes):
                task, init = tasks[i % len(tasks)], HELDOUT_SEED_BASE + seed * SEED_BLOCK + i // len(tasks)
                for protocol in self.protocols:
                    for row in self.rows:
                        out.append((row, protocol, seed, task, init))
        return out


class TimedVerifier:
    """Wraps a FailurePredictor, recording each call's wall time (ms)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.times_ms: list[float] = []

    def p_fail(self, observation: Observation, chunk: ActionChunk, subgoal: Any, memory: Any) -> float:
        start = time.perf_counter()
        try:
            return self.inner.p_fail(observation, chunk, subgoal, memory)
        finally:
            self.times_ms.append((time.perf_counter() - start) * 1e3)


class SubgoalProposer:
    """The controller's ChunkProposer: tells the environment which subgoal is being worked
    on and hands the policy an observation indexed by that subgoal's place in the task
    (a replanned subgoal is one of the task's own predicates)."""

    def __init__(self, proposer: PolicyProposer, env: SceneHarnessEnv) -> None:
        self.proposer = proposer
        self.env = env

    def propose(self, observation: Observation, subgoal: Any, attempt: int) -> ActionChunk:
        task = observation.task
        index = next((i for i, sg in enumerate(task.subgoals) if sg.predicate == subgoal.predicate), None)
        if index is None:
            raise ValueError(f"subgoal {subgoal.predicate!r} is not one of task {task.task_id!r}'s subgoals")
        self.env.set_subgoal(subgoal, index)
        return self.proposer.propose(replace(observation, subgoal_index=index), subgoal, attempt)


# -- worker -------------------------------------------------------------------------------------
@dataclass
class _Worker:
    config: HelmEvalConfig
    scene: TabletopScene
    policies: dict[str, BCPolicy] = field(default_factory=dict)
    verifiers: dict[str, StateVerifier] = field(default_factory=dict)
    memory: HelmMemory | None = None
    cameras: dict[str, Any] = field(default_factory=dict)


_worker: dict[str, _Worker] = {}


def _init(config: HelmEvalConfig) -> None:
    torch.set_num_threads(1)
    w = _Worker(config, TabletopScene())
    if {"base", "helm_nomem", "helm"} & set(config.rows):
        w.policies["base"] = BCPolicy(config.policy)
    if "base_context" in config.rows:
        w.policies["base_context"] = BCPolicy(config.context_policy)
    if "helm_nomem" in config.rows:
        w.verifiers["helm_nomem"] = StateVerifier.load(config.verifier_nomem)
    if "helm" in config.rows:
        from perception.encoder import load_encoder

        w.verifiers["helm"] = StateVerifier.load(config.verifier)
        w.memory = HelmMemory(load_encoder(config.encoder))
        w.cameras = make_cameras(w.scene, ("front",), config.image_size, config.image_size)
        _prefill(w.memory, config.overhead_keyframes)
    _worker["w"] = w


def _prefill(memory: HelmMemory, n: int) -> None:
    """Fill the memory with `n` keyframes of earlier (synthetic-name) episodes: copies of a
    few real keyframes recorded here, so retrieval runs at the store size being measured."""
    if n <= 0:
        return
    scene = TabletopScene()
    cameras = make_cameras(scene, ("front",), 64, 64)
    seeds_tasks = [(t, HELDOUT_SEED_BASE + 90_000 + i) for i, t in enumerate(long_horizon_tasks())]
    records = []
    for task_id, seed in seeds_tasks:
        task = get_task(task_id)
        ws = scene.reset(task, seed)
        obs = Observation(ws.joint_positions, ws.sim_time_s, task, 0, ws, render_cameras(scene, cameras))
        records.append((obs, task.subgoals[0], memory.image_embedding(obs)))
    scene.close()
    for i in range(n):
        obs, subgoal, embedding = records[i % len(records)]
        memory.start_episode(f"prefill-{i // 20}")
        memory.write("subgoal_start", 0, subgoal, obs, None, True, image_embedding=embedding)


def _run(job: tuple[str, str, int, str, int]) -> dict[str, Any]:
    row, protocol, seed, task_id, init = job
    w = _worker["w"]
    cfg = w.config
    task = get_task(task_id)
    scene = w.scene
    scene.reset(task, init)
    perturber = Perturber(scene, task, draw_perturbation(task, init), init) if protocol == "recovery" else None
    helm = row in ("helm", "helm_nomem")
    memory = w.memory if row == "helm" else None
    render = (lambda: render_cameras(scene, w.cameras)) if memory is not None else None
    cap = len(task.subgoals) * task.max_steps_per_subgoal * 4
    env = SceneHarnessEnv(scene, task, render=render, perturber=perturber, max_steps=cap)
    policy = w.policies["base_context" if row == "base_context" else "base"]
    proposer = PolicyProposer(policy, ResampleConfig(noise_rad=cfg.resample_noise_rad, seed=init))
    proposer.reset(init)
    chunk_steps = policy.execute_steps
    budget = math.ceil(task.max_steps_per_subgoal / chunk_steps)
    store: Any = KeyframeLog()
    if memory is not None:
        memory.start_episode(f"{row}-{protocol}-{task_id}-{init}")
        store = memory
        env.on_gripper_event = lambda obs, what: memory.gripper_event(obs, what, env.subgoal_index, env.subgoal)
    verifier = TimedVerifier(w.verifiers[row]) if helm else None
    harness = HarnessControllerConfig(
        mode="verified" if helm else "pass_through", tau=float(w.verifiers[row].threshold) if helm else 0.5,
        n_resample=cfg.n_resample, max_rollbacks=cfg.max_rollbacks, max_replans=cfg.max_replans,
        max_retries_subgoal=cfg.max_retries_subgoal, max_retries_episode=cfg.max_retries_episode,
        max_chunks_per_attempt=budget, time_budget_s=1e9, after_rejections=cfg.after_rejections)
    controller = HarnessController(harness, SubgoalProposer(proposer, env), env, verifier=verifier,
                                   planner=RulePlanner() if helm else None, memory=store,
                                   clock=lambda: env.steps_executed / scene.control_hz)
    start = time.perf_counter()
    result = controller.run(task.instruction, subgoals=task.subgoals)
    env.close()
    return {
        "row": row, "protocol": protocol, "seed": seed, "task_id": task_id, "initial_state": init,
        "success": bool(result.success), "final_state": result.final_state.value, "reason": result.reason,
        "subgoals_reached": sum(s.outcome == "reached" for s in result.subgoals),
        "resamples": result.resamples, "rollbacks": result.rollbacks, "replans": result.replans,
        "rejections": result.rejections, "verifier_calls": result.verifier_calls, "steps": env.steps_executed,
        "perturbation": perturber.description if perturber is not None else None,
        "verifier_ms": verifier.times_ms if verifier is not None else [],
        "keyframes_in_memory": len(memory.memory) if memory is not None else 0,
        "wall_s": time.perf_counter() - start,
    }


# -- aggregation --------------------------------------------------------------------------------
def summarize(config: HelmEvalConfig, episodes: list[dict[str, Any]], command: str, wall_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for protocol in config.protocols:
        table = {}
        for row in config.rows:
            eps = [e for e in episodes if e["row"] == row and e["protocol"] == protocol]
            n, k = len(eps), sum(e["success"] for e in eps)
            lo, hi = wilson_interval(k, n) if n else (float("nan"), float("nan"))
            per_seed = {str(s): float(np.mean([e["success"] for e in eps if e["seed"] == s])) for s in config.seeds
                        if any(e["seed"] == s for e in eps)}
            table[row] = {"mean": k / n if n else None, "ci95": [lo, hi], "episodes": n, "successes": k, "per_seed": per_seed,
                          "rollbacks": int(sum(e["rollbacks"] for e in eps)), "replans": int(sum(e["replans"] for e in eps)),
                          "rejections": int(sum(e["rejections"] for e in eps))}
        out[protocol] = table
    out["paired"] = paired_differences(config, episodes)
    times = [t for e in episodes if e["row"] == "helm" for t in e["verifier_ms"]]
    keyframes = [e["keyframes_in_memory"] for e in episodes if e["row"] == "helm"]
    out["overhead_ms"] = {
        "p50": float(np.percentile(times, 50)) if times else None, "p99": float(np.percentile(times, 99)) if times else None,
        "decisions": len(times), "keyframes": int(np.median(keyframes)) if keyframes else 0,
        "what": "state-verifier call incl. memory retrieval and query image embedding, 1 thread; excludes policy and rendering",
    }
    path = Path(config.verifier_results) if config.verifier_results else None
    if path is not None and path.is_file():
        comparison = json.loads(path.read_text())
        out["verifier"] = {name: {k: comparison[name][k] for k in ("auroc", "auroc_ci95", "f1", "precision", "recall", "threshold")}
                           for name in ("rule", "ensemble", "sv_nomem", "sv") if name in comparison}
        out["verifier"]["source"] = {"file": str(path), "command": comparison.get("command", ""), "data": comparison.get("data", {})}
    out.update(config=asdict(config), command=command, wall_s=wall_s)
    return out


def paired_differences(config: HelmEvalConfig, episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """HELM's success minus each other row's on the same initial states (the rows share
    them): mean of the per-episode differences with its 95% interval (runtime.stats.mean_ci)."""
    outcome = {(e["row"], e["protocol"], e["seed"], e["task_id"], e["initial_state"]): float(e["success"]) for e in episodes}
    out: dict[str, Any] = {}
    for protocol in config.protocols:
        for other in (r for r in config.rows if r != "helm"):
            diffs = [outcome[("helm", *key[1:])] - value for key, value in outcome.items()
                     if key[0] == other and key[1] == protocol and ("helm", *key[1:]) in outcome]
            if diffs:
                d = mean_ci(diffs)
                out.setdefault(protocol, {})[f"helm_minus_{other}"] = {"mean": d["mean"], "ci95": d["ci95"], "episodes": d["n"]}
    return out


def markdown(summary: dict[str, Any]) -> str:
    rows = summary["config"]["rows"]
    lines = ["| row | long-horizon success | recovery success |", "|---|---|---|"]
    for row in rows:
        cells = []
        for protocol in ("long_horizon", "recovery"):
            r = summary.get(protocol, {}).get(row)
            cells.append(f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['episodes']})" if r and r["episodes"] else "not run")
        lines.append(f"| {row} | {cells[0]} | {cells[1]} |")
    paired = summary.get("paired", {})
    others = sorted({name for table in paired.values() for name in table})
    if others:
        lines += ["", "| paired by initial state | long-horizon | recovery |", "|---|---|---|"]
        for name in others:
            cells = []
            for protocol in ("long_horizon", "recovery"):
                d = paired.get(protocol, {}).get(name)
                cells.append(f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (n={d['episodes']})" if d else "not run")
            lines.append(f"| {name.replace('_minus_', ' - ')} | {cells[0]} | {cells[1]} |")
    if summary.get("verifier"):
        lines += ["", "| verifier | AUROC [95% CI] | F1 | precision |", "|---|---|---|---|"]
        for name in ("rule", "ensemble", "sv_nomem", "sv"):
            v = summary["verifier"].get(name)
            if v:
                lines.append(f"| {name} | {v['auroc']:.3f} [{v['auroc_ci95'][0]:.3f}, {v['auroc_ci95'][1]:.3f}] | {v['f1']:.3f} | {v['precision']:.3f} |")
    o = summary["overhead_ms"]
    if o["p50"] is not None:
        lines.append("")
        lines.append(f"HELM overhead per decision: p50 {o['p50']:.2f} ms, p99 {o['p99']:.2f} ms at {o['keyframes']} keyframes ({o['decisions']} decisions).")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["config"]["rows"]
    protocols = [p for p in PROTOCOLS if p in summary]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(protocols))
    for j, protocol in enumerate(protocols):
        means = [summary[protocol][r]["mean"] or 0.0 for r in rows]
        lo = [m - (summary[protocol][r]["ci95"][0] if summary[protocol][r]["episodes"] else m) for m, r in zip(means, rows)]
        hi = [(summary[protocol][r]["ci95"][1] if summary[protocol][r]["episodes"] else m) - m for m, r in zip(means, rows)]
        ax.bar(np.arange(len(rows)) + j * width, means, width, yerr=[lo, hi], capsize=3, label=protocol)
    ax.set_xticks(np.arange(len(rows)) + width * (len(protocols) - 1) / 2, rows)
    ax.set(ylabel="success rate", ylim=(0, 1), title="HELM on the long-horizon tasks (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(config: HelmEvalConfig, command: str = "") -> dict[str, Any]:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "episodes.jsonl"
    done = {}
    if log.exists():
        for n, line in enumerate(log.read_text().splitlines(), start=1):
            try:
                e = json.loads(line)
            except json.JSONDecodeError:  # the half-written last line of a killed run: redo it
                logger.warning("%s:%d: unreadable record skipped", log, n)
                continue
            done[(e["row"], e["protocol"], e["seed"], e["task_id"], e["initial_state"])] = e
    jobs = [j for j in config.jobs() if j not in done]
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="helm eval", unit="ep", disable=not config.progress, dynamic_ncols=True)
    with open(log, "a") as f:
        def record(e: dict[str, Any]) -> None:
            done[(e["row"], e["protocol"], e["seed"], e["task_id"], e["initial_state"])] = e
            f.write(json.dumps(e) + "\n")
            f.flush()
            bar.update()

        if config.workers == 1:
            _init(config)
            for job in jobs:
                record(_run(job))
        else:
            with mp.get_context("spawn").Pool(config.workers, initializer=_init, initargs=(config,)) as pool:
                for e in pool.imap_unordered(_run, jobs):
                    record(e)
    bar.close()
    wanted = set(config.jobs())
    summary = summarize(config, [e for key, e in done.items() if key in wanted], command, time.perf_counter() - start)
    (out / "helm.json").write_text(json.dumps(summary, indent=2))
    (out / "helm.md").write_text(markdown(summary))
    plot(summary, out / "helm.png")
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m training.helm_eval") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--policy", default="runs/bc")
    parser.add_argument("--context-policy", default="runs/bc-h32")
    parser.add_argument("--verifier", default="runs/sv/best")
    parser.add_argument("--verifier-nomem", default="runs/sv-nomem/best")
    parser.add_argument("--encoder", default="runs/encoder")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--tasks", default="", help="comma-separated (default: tasks with >= 4 subgoals)")
    parser.add_argument("--episodes", type=int, default=100, help="per row, protocol and seed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--after-rejections", choices=("least_risky", "fail"), default="least_risky",
                        help="when a rejected proposal has no recovery left: run the decision's least risky "
                             "proposal, or fail the episode")
    parser.add_argument("--overhead-keyframes", type=int, default=10_000)
    parser.add_argument("--verifier-results", default="benchmarks/results/verifier.json",
                        help="helmstack eval verifier output to include (AUROC/F1 table)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = HelmEvalConfig(
            out_dir=a.out, policy=a.policy, context_policy=a.context_policy, verifier=a.verifier,
            verifier_nomem=a.verifier_nomem, encoder=a.encoder, rows=tuple(r for r in a.rows.split(",") if r),
            protocols=tuple(p for p in a.protocols.split(",") if p), tasks=tuple(t for t in a.tasks.split(",") if t),
            episodes=a.episodes, seeds=tuple(int(s) for s in a.seeds.split(",") if s),
            after_rejections=a.after_rejections, overhead_keyframes=a.overhead_keyframes,
            verifier_results=a.verifier_results, workers=a.workers,
            progress=not a.no_progress)
        for task_id in config.task_ids():
            get_task(task_id)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    summary = evaluate(config, command=" ".join([prog, *(argv if argv is not None else sys.argv[1:])]))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
