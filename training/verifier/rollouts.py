"""Labelled rollouts for the State Verifier: what happens if this chunk is executed now?

The base policy runs the tasks (held-out-free TRAIN seeds for training data, a separate
block of held-out seeds for the test set), half the episodes with a mid-episode
perturbation (sim.perturbations). At a random subset of decisions the episode branches:
for the policy's own chunk and for resampled ones (the proposals HELM's RESAMPLE rung
would make, policies.proposer), the simulator state is saved, the candidate executed, the
base policy continues from there with the subgoal's remaining step budget, and the
outcome is the label (1 = the subgoal was not reached: the chunk leads to failure), then
the state is restored. The episode itself goes on with the policy's chunk (sometimes a
resampled one, so that the visited states include off-policy ones).

Labels follow papers/helm.md ("the subgoal predicate is not satisfied within T steps after
the chunk") with T = what is left of the subgoal's budget (`task.max_steps_per_subgoal`),
the budget the base policy and an attempt of the harness have.

Recorded per sample: the world state, the candidate chunk, the label, the episode's
keyframes so far (episode start, subgoal starts, gripper events; their world states and
64x64 front-camera images, so memory keys can be computed by any image encoder later) and
the sample's own image (the retrieval query), plus the previous decision's robot state
(the ensemble baseline's members need their motion history). One JSON + one npz per
episode under `<out>/episodes/`; finished episodes are skipped on a rerun (resumable).

    helmstack verifier-data --out runs/sv-data --split train --episodes-per-task 24
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from policies.base import ActionChunk, Observation
from policies.bc import BCPolicy
from policies.proposer import PolicyProposer, ResampleConfig
from sim.harness_env import SceneHarnessEnv
from sim.perturbations import Perturber, draw_perturbation
from sim.scene import TabletopScene
from sim.tasks.suite import HELDOUT_SEED_BASE, get_task, load_suite
from sim.world_state import WorldState
from training.bc.demos import make_cameras, render_cameras

logger = logging.getLogger(__name__)

FORMAT = "helmstack-verifier-rollouts/1"
# Seed blocks: demonstrations use train seeds 0.., the HELM evaluation held-out seeds
# 1_000_000..; verifier data stays clear of both.
TRAIN_SEED_BASE = 5_000
TEST_SEED_BASE = HELDOUT_SEED_BASE + 50_000


@dataclass(frozen=True)
class VerifierDataConfig:
    out_dir: str
    policy: str = "runs/bc"
    split: str = "train"  # "train" or "test"
    tasks: tuple[str, ...] = ()  # default: the whole suite
    episodes_per_task: int = 24
    branch_prob: float = 0.3  # fraction of decisions that are labelled
    resample_noise: tuple[float, ...] = (0.01, 0.03)  # one resampled candidate per level
    perturb_prob: float = 0.5
    offpolicy_prob: float = 0.15  # decisions that execute a resampled chunk
    image_size: int = 64
    workers: int = 2
    physics_hz: int = 240
    control_hz: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")
        if self.episodes_per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {self.episodes_per_task}")
        for name in ("branch_prob", "perturb_prob", "offpolicy_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not self.resample_noise or any(not (n > 0) for n in self.resample_noise):
            raise ValueError(f"resample_noise must be positive levels, got {list(self.resample_noise)}")
        if not 1 <= self.workers <= (os.cpu_count() or 1):
            raise ValueError(f"workers must be in [1, {os.cpu_count() or 1}], got {self.workers}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")

    def seeds(self) -> list[int]:
        base = TRAIN_SEED_BASE if self.split == "train" else TEST_SEED_BASE
        return list(range(base, base + self.episodes_per_task))


def world_record(ws: WorldState) -> dict[str, Any]:
    """A WorldState as JSON (floats round-trip exactly)."""
    return {
        "object_poses": {k: [v[0].tolist(), v[1].tolist()] for k, v in ws.object_poses.items()},
        "fixture_joints": dict(ws.fixture_joints),
        "ee_position": ws.ee_position.tolist(),
        "ee_quaternion": ws.ee_quaternion.tolist(),
        "gripper_width": float(ws.gripper_width),
        "sim_time_s": float(ws.sim_time_s),
        "joint_positions": ws.joint_positions.tolist(),
    }


def world_from_record(record: dict[str, Any]) -> WorldState:
    return WorldState(
        object_poses={k: (np.asarray(v[0]), np.asarray(v[1])) for k, v in record["object_poses"].items()},
        fixture_joints=record["fixture_joints"],
        ee_position=np.asarray(record["ee_position"]),
        ee_quaternion=np.asarray(record["ee_quaternion"]),
        gripper_width=record["gripper_width"],
        sim_time_s=record["sim_time_s"],
        joint_positions=np.asarray(record["joint_positions"]),
    )


@dataclass
class _Episode:
    keyframes: list[dict[str, Any]] = field(default_factory=list)
    keyframe_images: list[np.ndarray] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    sample_images: list[np.ndarray] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)


class _Recorder:
    """One worker: a scene, the policy (proposals) and a second copy (continuations)."""

    def __init__(self, config: VerifierDataConfig) -> None:
        torch.set_num_threads(1)
        self.config = config
        self.scene = TabletopScene(physics_hz=config.physics_hz, control_hz=config.control_hz)
        self.policy = BCPolicy(config.policy, control_hz=config.control_hz)
        self.continuation = BCPolicy(config.policy, control_hz=config.control_hz)
        self.cameras = make_cameras(self.scene, ("front",), config.image_size, config.image_size)

    def image(self) -> np.ndarray:
        return render_cameras(self.scene, self.cameras)["front"]

    def episode(self, task_id: str, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        cfg = self.config
        task = get_task(task_id)
        rng = np.random.default_rng([seed, 31337])
        self.scene.reset(task, seed)
        perturbed = bool(rng.random() < cfg.perturb_prob)
        spec = draw_perturbation(task, seed) if perturbed else None
        perturber = Perturber(self.scene, task, spec, seed) if spec is not None else None
        ep = _Episode()
        state: dict[str, Any] = {"k": 0}

        def keyframe(kind: str, verified: bool) -> None:
            ws = self.scene.world_state()
            ep.keyframes.append({"kind": kind, "verified": verified, "sim_time_s": ws.sim_time_s,
                                 "subgoal_index": state["k"], "world": world_record(ws)})
            ep.keyframe_images.append(self.image())

        env = SceneHarnessEnv(self.scene, task, perturber=perturber,
                              on_gripper_event=lambda obs, what: keyframe(f"gripper_{what}", False))
        proposer = PolicyProposer(self.policy, ResampleConfig(noise_rad=cfg.resample_noise[0], seed=seed))
        proposer.reset(seed)
        budget = task.max_steps_per_subgoal
        previous: tuple[list[float], float] | None = None  # the last decision's robot state (ensemble history)
        success, reached = True, 0
        start = time.perf_counter()
        for k, subgoal in enumerate(task.subgoals):
            state["k"] = k
            env.set_subgoal(subgoal, k)
            keyframe("episode_start" if k == 0 else "subgoal_start", True)
            used = 0
            done = env.subgoal_done(subgoal)
            while not done and used < budget:
                obs = env.observe()
                chunk = proposer.propose(obs, subgoal, 0)
                candidates = [("policy", chunk)]
                for level, noise in enumerate(cfg.resample_noise, start=1):
                    proposer.config = ResampleConfig(noise_rad=noise, seed=seed)
                    candidates.append((f"resample_{noise:g}", proposer.propose(obs, subgoal, level)))
                if rng.random() < cfg.branch_prob:
                    image = self.image()
                    for source, candidate in candidates:
                        label, steps = self._branch(env, perturber, obs, subgoal, candidate, budget - used)
                        ep.samples.append({
                            "subgoal_index": k, "label": int(label), "source": source, "steps_to_outcome": steps,
                            "steps_into_subgoal": used, "n_keyframes": len(ep.keyframes),
                            "image_index": len(ep.sample_images), "chunk_index": len(ep.chunks),
                            "world": world_record(obs.world), "previous": previous,
                        })
                        ep.chunks.append(candidate.positions.astype(np.float64))
                    ep.sample_images.append(image)
                previous = (obs.world.joint_positions.tolist(), float(obs.sim_time_s))
                executed = candidates[1][1] if rng.random() < cfg.offpolicy_prob else chunk
                before = env.steps_executed
                env.execute(executed)
                used += env.steps_executed - before
                done = env.subgoal_done(subgoal)
            if not done:
                success = False
                break
            reached += 1
        env.close()
        meta = {
            "task_id": task_id, "seed": int(seed), "success": success, "subgoals_reached": reached,
            "perturbation": perturber.description if perturber is not None else None,
            "n_samples": len(ep.samples), "n_keyframes": len(ep.keyframes),
            "object_names": [o.name for o in task.objects], "wall_s": time.perf_counter() - start,
            "keyframes": ep.keyframes, "samples": ep.samples,
        }
        size = cfg.image_size
        arrays = {
            "keyframe_images": np.stack(ep.keyframe_images) if ep.keyframe_images else np.zeros((0, size, size, 3), np.uint8),
            "sample_images": np.stack(ep.sample_images) if ep.sample_images else np.zeros((0, size, size, 3), np.uint8),
            "chunks": np.stack(ep.chunks) if ep.chunks else np.zeros((0, 1, 9)),
        }
        return meta, arrays

    def _branch(self, env: SceneHarnessEnv, perturber: Perturber | None, obs: Observation, subgoal: Any,
                candidate: ActionChunk, remaining: int) -> tuple[bool, int]:
        """Execute `candidate`, let the policy continue within `remaining` steps, then put
        everything back. Returns (failed, steps until the outcome)."""
        handle = self.scene.save_state()
        saved_steps, saved_callback = env.steps_executed, env.on_gripper_event
        saved_perturber = ({k: v if k in ("scene", "task") else copy.deepcopy(v) for k, v in perturber.__dict__.items()}
                           if perturber is not None else None)
        env.on_gripper_event = None  # branches are hypothetical: no keyframes
        try:
            cont = self.continuation
            cont.reset()
            cont.observe(obs)
            start = env.steps_executed
            env.execute(candidate)
            done = env.subgoal_done(subgoal)
            while not done and env.steps_executed - start < remaining:
                rows = cont.select_action(env.observe()).positions[: remaining - (env.steps_executed - start)]
                env.execute(ActionChunk(rows, np.arange(1, len(rows) + 1) / self.config.control_hz))
                done = env.subgoal_done(subgoal)
            return (not done), env.steps_executed - start
        finally:
            self.scene.restore_state(handle)
            self.scene.discard_state(handle)
            env.steps_executed, env.on_gripper_event = saved_steps, saved_callback
            env._fingers_closed = None
            if perturber is not None:
                perturber.__dict__.update(saved_perturber)


_worker: dict[str, Any] = {}


def _init(config: VerifierDataConfig) -> None:
    _worker["recorder"] = _Recorder(config)


def _episode_path(out_dir: Path, task_id: str, seed: int) -> Path:
    return out_dir / "episodes" / f"{task_id}-{seed}"


def _run(job: tuple[str, int]) -> dict[str, Any]:
    task_id, seed = job
    recorder: _Recorder = _worker["recorder"]
    base = _episode_path(Path(recorder.config.out_dir), task_id, seed)
    if base.with_suffix(".json").exists() and base.with_suffix(".npz").exists():
        meta = json.loads(base.with_suffix(".json").read_text())
        return {k: meta[k] for k in ("task_id", "seed", "success", "n_samples")} | {"reused": True}
    meta, arrays = recorder.episode(task_id, seed)
    tmp = base.with_name(base.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, base.with_suffix(".npz"))
    # The JSON is written last: its presence marks a finished episode.
    tmp_json = base.with_name(base.name + ".tmp.json")
    tmp_json.write_text(json.dumps(meta))
    os.replace(tmp_json, base.with_suffix(".json"))
    return {k: meta[k] for k in ("task_id", "seed", "success", "n_samples")} | {"reused": False}


def generate(config: VerifierDataConfig, command: str = "") -> dict[str, Any]:
    task_ids = list(config.tasks) or sorted(load_suite())
    for task_id in task_ids:
        get_task(task_id)
    out = Path(config.out_dir)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    jobs = [(t, s) for s in config.seeds() for t in task_ids]
    start = time.perf_counter()
    # Written first (and rewritten at the end with the episode list), so a run stopped
    # early still leaves a readable data set of the episodes it finished.
    _write_manifest(out, {"format": FORMAT, "config": asdict(config), "command": command, "complete": False})
    results = []
    bar = tqdm(total=len(jobs), desc=f"verifier rollouts ({config.split})", unit="ep", disable=not config.progress, dynamic_ncols=True)
    if config.workers == 1:
        _init(config)
        for job in jobs:
            results.append(_run(job))
            bar.update()
    else:
        with mp.get_context("spawn").Pool(config.workers, initializer=_init, initargs=(config,)) as pool:
            for result in pool.imap_unordered(_run, jobs):
                results.append(result)
                bar.update()
                bar.set_postfix(samples=sum(r["n_samples"] for r in results))
    bar.close()
    manifest = {"format": FORMAT, "config": asdict(config), "command": command, "complete": True,
                "wall_s": time.perf_counter() - start, "episodes": sorted(results, key=lambda r: (r["task_id"], r["seed"]))}
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")


def parse_args(argv: list[str] | None, prog: str) -> VerifierDataConfig:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--policy", default="runs/bc", help="base-policy checkpoint (helmstack train bc)")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--tasks", default="", help="comma-separated task ids (default: all)")
    parser.add_argument("--episodes-per-task", type=int, default=24)
    parser.add_argument("--branch-prob", type=float, default=0.3)
    parser.add_argument("--perturb-prob", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    return VerifierDataConfig(
        out_dir=a.out, policy=a.policy, split=a.split, tasks=tuple(t for t in a.tasks.split(",") if t),
        episodes_per_task=a.episodes_per_task, branch_prob=a.branch_prob, perturb_prob=a.perturb_prob,
        workers=a.workers, progress=not a.no_progress,
    )


def main(argv: list[str] | None = None, prog: str = "python -m training.verifier.rollouts") -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(argv, prog)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    manifest = generate(config, command=" ".join([prog, *(argv if argv is not None else sys.argv[1:])]))
    n = sum(e["n_samples"] for e in manifest["episodes"])
    print(f"{len(manifest['episodes'])} episodes, {n} labelled samples in {manifest['wall_s']:.0f} s -> {config.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
