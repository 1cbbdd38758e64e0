"""Demonstrations for the behaviour-cloning base policy: the scripted expert with injected noise.

    python -m training.bc.demos --out data/bc_demos --episodes-per-task 200 [--tasks id,...] [--workers 2]

What: every (task, TRAIN seed) episode runs in-process through `sim.rollout.run_episode`
(the same episode semantics evaluations use: a subgoal ends the moment its predicate holds)
with `NoisyExpertRecorder` as the policy. At each control decision the recorder asks the
scripted expert for its chunk, records the observation and that clean chunk as the label,
and returns a perturbed chunk for execution.

Why the noise (DART, Laskey et al. 2017): a policy trained only on the expert's own states
never sees the states its own small errors lead to, and its errors compound. Perturbing what
is *executed* while labelling with what the expert does *from the perturbed state* puts those
off-distribution states and the expert's recoveries into the data. The expert is closed loop
(it re-plans from every observation, re-approaches after a missed grasp or a drop), so its
label from a perturbed state is a recovery. Noise model, per episode: with probability
`clean_episode_fraction` no noise at all (the nominal path stays well covered); otherwise a
noise scale drawn uniformly in [0, arm_sigma_rad], and per chunk:
  perturb (prob. perturb_prob)  a Gaussian offset on the seven arm-joint targets, ramped in
                                over the chunk (a drift the position controller follows, not
                                a jerk it filters out); optional Gaussian finger noise
  pause (prob. pause_prob)      the current targets are held for a few steps instead of the
                                chunk: the robot falls behind the expert's plan, as it does
                                under latency or a blocked motion
Seeds come only from the TRAIN split (`sim.tasks.suite`); held-out seeds are refused.

Storage: `shards/shard-XXXXX-<task>.npz`, one task per shard (its objects fix the array
shapes), written to a temporary name and renamed, so a shard that exists is complete; a rerun
with the same settings skips finished shards (resume after a kill). `manifest.json` lists the
shards, episodes, success and the exact settings. Per decision a shard holds the robot state
(joint positions, grasp-frame pose, gripper opening), every object pose in task order, the
drawer slides, the subgoal index, the clean label chunk (K, 9), the executed chunk and how
many of its steps ran, and optionally camera images (N, H, W, 3) uint8 so embeddings can be
computed later by whichever image encoder is current. Each shard's metadata carries its
task's instruction and subgoals (name and predicate); features are computed at load time
(`training.bc.dataset`), so the feature design can change without regenerating data.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shlex
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from tqdm.auto import tqdm

from sim.expert import ExpertConfig, ScriptedExpert
from sim.panda import N_ARM_JOINTS, N_JOINTS, PandaKinematics
from sim.rollout import run_episode
from sim.scene import FRONT_CAMERA_POSE, TabletopScene
from sim.sensors.camera import Camera, CameraConfig, look_at
from sim.tasks.geometry import rotation_matrix
from sim.tasks.spec import TaskSpec
from sim.tasks.suite import HELDOUT_SEED_BASE, get_task, load_suite
from sim.world_state import WorldState

logger = logging.getLogger(__name__)

DEMO_FORMAT = "helmstack-bc-demos"
DEMO_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
CAMERA_NAMES = ("front", "wrist")
# Wrist camera mount, as sim.backend mounts it: 5 cm off the hand centre along the hand's
# +x, looking along the hand's z (the approach direction).
WRIST_CAMERA_OFFSET_M = (0.05, 0.0, 0.0)


@dataclass(frozen=True)
class NoiseConfig:
    """Injected execution noise (see the module docstring)."""

    arm_sigma_rad: float = 0.02  # upper end of the per-episode noise scale (per arm joint)
    perturb_prob: float = 0.5  # chance that a chunk is perturbed
    finger_sigma_m: float = 0.0  # Gaussian noise on the finger targets of a perturbed chunk
    pause_prob: float = 0.05  # chance that a chunk is replaced by holding still
    pause_steps: tuple[int, int] = (2, 8)  # control steps held, inclusive range
    clean_episode_fraction: float = 0.2  # episodes run without any noise

    def __post_init__(self) -> None:
        for name in ("arm_sigma_rad", "finger_sigma_m"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("perturb_prob", "pause_prob", "clean_episode_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.perturb_prob + self.pause_prob > 1.0:
            raise ValueError(f"perturb_prob + pause_prob must be <= 1, got {self.perturb_prob} + {self.pause_prob}")
        lo, hi = self.pause_steps
        if not 1 <= lo <= hi:
            raise ValueError(f"pause_steps must be [lo, hi] with 1 <= lo <= hi, got {list(self.pause_steps)}")


# Settings that choose which episodes run, where and how fast, not what an episode records.
_NOT_IN_FINGERPRINT = ("out_dir", "tasks", "episodes_per_task", "first_seed", "workers", "progress", "episodes_per_shard")


@dataclass(frozen=True)
class DemoConfig:
    """What to generate and where."""

    out_dir: str
    tasks: tuple[str, ...] = ()  # empty = the whole suite
    episodes_per_task: int = 100
    first_seed: int = 0  # TRAIN seeds first_seed .. first_seed + episodes_per_task - 1
    episodes_per_shard: int = 10
    workers: int = 2
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    noise_seed: int = 0
    cameras: tuple[str, ...] = ()  # images to store: "front", "wrist"
    image_width: int = 128
    image_height: int = 128
    physics_hz: int = 240
    control_hz: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir must be a directory path, got ''")
        if self.episodes_per_task <= 0:
            raise ValueError(f"episodes_per_task must be > 0, got {self.episodes_per_task}")
        if self.first_seed < 0 or self.first_seed + self.episodes_per_task > HELDOUT_SEED_BASE:
            raise ValueError(
                f"first_seed must keep every seed in the TRAIN split [0, {HELDOUT_SEED_BASE}): got first_seed={self.first_seed} "
                f"with episodes_per_task={self.episodes_per_task}; held-out seeds are for evaluation only"
            )
        if self.episodes_per_shard <= 0:
            raise ValueError(f"episodes_per_shard must be > 0, got {self.episodes_per_shard}")
        if not 1 <= self.workers <= (os.cpu_count() or 1):
            raise ValueError(f"workers must be in [1, {os.cpu_count() or 1}] (this machine's cores), got {self.workers}")
        unknown = sorted(set(self.cameras) - set(CAMERA_NAMES))
        if unknown or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must be distinct names from {list(CAMERA_NAMES)}, got {list(self.cameras)}")
        if self.image_width <= 0 or self.image_height <= 0:
            raise ValueError(f"image_width and image_height must be > 0, got {self.image_width}x{self.image_height}")

    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.episodes_per_task))

    def fingerprint(self) -> str:
        """Hash of every setting that changes a shard's contents (not where or how fast)."""
        keys = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}
        keys["expert"] = asdict(ExpertConfig())
        keys["version"] = DEMO_VERSION
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# -- cameras ------------------------------------------------------------------------------
def make_cameras(scene: TabletopScene, names: tuple[str, ...], width: int, height: int) -> dict[str, Camera]:
    return {name: Camera(CameraConfig(width=width, height=height), scene.client_id) for name in names}


def camera_pose(scene: TabletopScene, name: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Optical-frame pose of a named camera, mounted as the sim backend mounts it."""
    if name == "front":
        eye, target = FRONT_CAMERA_POSE
        return np.asarray(eye, dtype=np.float64), np.asarray(look_at(eye, target), dtype=np.float64)
    if name == "wrist":
        pos, quat = scene.link_pose("panda_hand")
        return np.asarray(pos) + rotation_matrix(np.asarray(quat)) @ np.array(WRIST_CAMERA_OFFSET_M), np.asarray(quat)
    raise ValueError(f"unknown camera {name!r}; known: {list(CAMERA_NAMES)}")


def render_cameras(scene: TabletopScene, cameras: dict[str, Camera]) -> dict[str, NDArray[np.uint8]]:
    """camera name -> (H, W, 3) uint8 RGB, rendered now."""
    return {name: cam.render(*camera_pose(scene, name)).rgb for name, cam in cameras.items()}


# -- the noisy expert ---------------------------------------------------------------------
@dataclass
class Decision:
    """One control decision: what was observed, the expert's label, what was executed."""

    world: WorldState
    subgoal_index: int
    label: NDArray[np.float64]  # (K, 9) the expert's clean chunk from this state
    executed: NDArray[np.float64]  # (T, 9) what was sent to the robot (T = K, or the pause length)
    perturbed: bool
    paused: bool
    images: dict[str, NDArray[np.uint8]]


class NoisyExpertRecorder:
    """The scripted expert behind `sim.rollout.Policy`, executing noisy chunks and recording
    (observation, clean label) pairs. One instance per episode stream; `reset` clears."""

    def __init__(
        self,
        expert: ScriptedExpert,
        scene: TabletopScene,
        noise: NoiseConfig,
        rng: np.random.Generator,
        cameras: dict[str, Camera] | None = None,
    ) -> None:
        self.expert = expert
        self.scene = scene
        self.noise = noise
        self.rng = rng
        self.cameras = cameras or {}
        self.clean = True
        self.sigma_rad = 0.0
        self.decisions: list[Decision] = []

    def reset(self) -> None:
        self.expert.reset()
        self.decisions = []
        self.clean = bool(self.rng.random() < self.noise.clean_episode_fraction)
        self.sigma_rad = 0.0 if self.clean else float(self.rng.uniform(0.0, self.noise.arm_sigma_rad))

    def act(self, world_state: WorldState, joint_positions: ArrayLike, task: TaskSpec, subgoal_index: int) -> NDArray[np.float64]:
        images = render_cameras(self.scene, self.cameras) if self.cameras else {}
        label = np.asarray(self.expert.act(world_state, joint_positions, task, subgoal_index), dtype=np.float64)  # (K, 9)
        executed, perturbed, paused = label.copy(), False, False
        u = 1.0 if self.clean else self.rng.random()
        if u < self.noise.pause_prob:
            lo, hi = self.noise.pause_steps
            executed = np.repeat(self.scene.joint_targets[None, :], int(self.rng.integers(lo, hi + 1)), axis=0)  # (T, 9)
            paused = True
        elif u < self.noise.pause_prob + self.noise.perturb_prob and (self.sigma_rad > 0 or self.noise.finger_sigma_m > 0):
            k = label.shape[0]
            ramp = (np.arange(1, k + 1) / k)[:, None]  # (K, 1): the offset grows over the chunk
            executed[:, :N_ARM_JOINTS] += ramp * self.rng.normal(0.0, self.sigma_rad, N_ARM_JOINTS)
            if self.noise.finger_sigma_m > 0:
                executed[:, N_ARM_JOINTS:] += self.rng.normal(0.0, self.noise.finger_sigma_m)
            perturbed = True
        self.decisions.append(Decision(world_state, subgoal_index, label, executed, perturbed, paused, images))
        return executed


def episode_rng(noise_seed: int, task_id: str, seed: int) -> np.random.Generator:
    """The noise stream of one episode: fixed by (noise_seed, task, seed), whichever worker runs it."""
    return np.random.default_rng([noise_seed, zlib.crc32(task_id.encode()), seed])


# -- shards -------------------------------------------------------------------------------
def _episode_arrays(task: TaskSpec, decisions: list[Decision], end_time_s: float, control_hz: int) -> dict[str, NDArray[Any]]:
    """Stack one episode's decisions into arrays (N = decisions, M = task objects)."""
    names = [o.name for o in task.objects]
    n = len(decisions)
    times = np.array([d.world.sim_time_s for d in decisions] + [end_time_s])
    out: dict[str, NDArray[Any]] = {
        "subgoal_index": np.array([d.subgoal_index for d in decisions], dtype=np.int16),
        "sim_time_s": times[:-1].astype(np.float32),
        "joint_positions": np.stack([d.world.joint_positions for d in decisions]).astype(np.float32),
        "ee_position": np.stack([d.world.ee_position for d in decisions]).astype(np.float32),
        "ee_quaternion": np.stack([d.world.ee_quaternion for d in decisions]).astype(np.float32),
        "gripper_width": np.array([d.world.gripper_width for d in decisions], dtype=np.float32),
        "object_poses": np.array(
            [[np.concatenate(d.world.object_poses[name]) for name in names] for d in decisions], dtype=np.float32
        ).reshape(n, len(names), 7),
        # NaN where an object has no joint (only drawers slide).
        "fixture_joints": np.array(
            [[d.world.fixture_joints.get(name, np.nan) for name in names] for d in decisions], dtype=np.float32
        ).reshape(n, len(names)),
        "label": np.stack([d.label for d in decisions]).astype(np.float32),
        # Executed chunks, padded with NaN to a common length (a pause may be longer or
        # shorter than a chunk); float64 so the episode replays exactly from the shard.
        "executed": _pad_chunks([d.executed for d in decisions], decisions[0].label.shape[0] if decisions else 0),
        # Control steps actually run from this decision until the next (or the episode's end).
        "executed_steps": np.round(np.diff(times) * control_hz).astype(np.int16),
        "perturbed": np.array([d.perturbed for d in decisions], dtype=bool),
        "paused": np.array([d.paused for d in decisions], dtype=bool),
    }
    for camera in decisions[0].images if decisions else ():
        out[f"images_{camera}"] = np.stack([d.images[camera] for d in decisions])
    return out


def _pad_chunks(chunks: list[NDArray[np.float64]], length: int) -> NDArray[np.float64]:
    width = max([length] + [c.shape[0] for c in chunks])
    out = np.full((len(chunks), width, N_JOINTS), np.nan, dtype=np.float64)
    for i, c in enumerate(chunks):
        out[i, : c.shape[0]] = c
    return out


def _concat(episodes: list[dict[str, NDArray[Any]]]) -> dict[str, NDArray[Any]]:
    keys = episodes[0].keys()
    out: dict[str, NDArray[Any]] = {}
    for key in keys:
        arrays = [e[key] for e in episodes]
        if key == "executed":
            width = max(a.shape[1] for a in arrays)
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=np.nan) for a in arrays]
        out[key] = np.concatenate(arrays)
    out["episode"] = np.concatenate([np.full(len(e["subgoal_index"]), i, dtype=np.int32) for i, e in enumerate(episodes)])
    return out


def write_shard(path: Path, arrays: dict[str, NDArray[Any]], meta: dict[str, Any]) -> None:
    """Write a shard atomically (temporary file in the same directory, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta_json=np.array(json.dumps(meta)), **arrays)
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardError(ValueError):
    """A demonstration shard or manifest is unreadable or inconsistent; names the file."""


def read_shard(path: Path) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
    """(arrays, meta) of a shard; raises ShardError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zlib.error, EOFError) as exc:
        raise ShardError(f"{path}: unreadable shard ({exc})") from exc
    if "meta_json" not in arrays:
        raise ShardError(f"{path}: no meta_json entry; not a {DEMO_FORMAT} shard")
    meta = json.loads(str(arrays.pop("meta_json")))
    if meta.get("format") != DEMO_FORMAT or meta.get("version") != DEMO_VERSION:
        raise ShardError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {DEMO_FORMAT!r} {DEMO_VERSION}")
    n = len(arrays.get("subgoal_index", ()))
    for key, value in arrays.items():
        if value.shape[:1] != (n,):
            raise ShardError(f"{path}: array {key!r} has {value.shape[:1]} rows, expected {n}")
    return arrays, meta


def world_state_at(arrays: dict[str, NDArray[Any]], object_names: list[str], i: int) -> WorldState:
    """The recorded WorldState of decision `i` of a shard."""
    poses = arrays["object_poses"][i].astype(np.float64)
    joints = arrays["fixture_joints"][i]
    return WorldState(
        object_poses={name: (poses[j, :3], poses[j, 3:]) for j, name in enumerate(object_names)},
        fixture_joints={name: float(joints[j]) for j, name in enumerate(object_names) if np.isfinite(joints[j])},
        ee_position=arrays["ee_position"][i].astype(np.float64),
        ee_quaternion=arrays["ee_quaternion"][i].astype(np.float64),
        gripper_width=float(arrays["gripper_width"][i]),
        sim_time_s=float(arrays["sim_time_s"][i]),
        joint_positions=arrays["joint_positions"][i].astype(np.float64),
    )


# -- workers ------------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(config: DemoConfig) -> None:
    scene = TabletopScene(physics_hz=config.physics_hz, control_hz=config.control_hz)
    _worker["config"] = config
    _worker["scene"] = scene
    _worker["expert"] = ScriptedExpert(PandaKinematics(), control_hz=config.control_hz, config=ExpertConfig())
    _worker["cameras"] = make_cameras(scene, config.cameras, config.image_width, config.image_height)


def record_episode(
    scene: TabletopScene,
    expert: ScriptedExpert,
    task: TaskSpec,
    seed: int,
    noise: NoiseConfig,
    rng: np.random.Generator,
    cameras: dict[str, Camera] | None = None,
) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
    """Run one noisy-expert episode; returns (arrays, episode metadata)."""
    if seed >= HELDOUT_SEED_BASE:
        raise ValueError(f"seed {seed} is a held-out seed (>= {HELDOUT_SEED_BASE}); demonstrations use TRAIN seeds only")
    recorder = NoisyExpertRecorder(expert, scene, noise, rng, cameras)
    start = time.perf_counter()
    result = run_episode(scene, task, recorder, seed)
    arrays = _episode_arrays(task, recorder.decisions, scene.sim_time_s, scene.control_hz)
    meta = {
        "seed": int(seed),
        "n_decisions": len(recorder.decisions),
        "success": bool(result.success),
        "subgoals_reached": sum(bool(s["success"]) for s in result.subgoals),
        "total_steps": int(result.total_steps),
        "reason": result.reason,
        "noise_sigma_rad": recorder.sigma_rad,
        "wall_s": time.perf_counter() - start,
    }
    return arrays, meta


def _shard_path(out_dir: Path, index: int, task_id: str) -> Path:
    return out_dir / SHARD_DIR / f"shard-{index:05d}-{task_id}.npz"


def _run_shard(job: tuple[int, str, list[int]]) -> dict[str, Any]:
    """Generate (or find finished) one shard; returns its manifest entry."""
    index, task_id, seeds = job
    config: DemoConfig = _worker["config"]
    path = _shard_path(Path(config.out_dir), index, task_id)
    if path.exists():
        try:
            _, meta = read_shard(path)
            if meta.get("fingerprint") == config.fingerprint() and [e["seed"] for e in meta["episodes"]] == seeds:
                return _manifest_entry(path, config, meta, attempted=len(seeds), reused=True)
        except ShardError as exc:
            logger.warning("regenerating %s: %s", path, exc)
    task = get_task(task_id)
    episodes, metas = [], []
    for seed in seeds:
        rng = episode_rng(config.noise_seed, task_id, seed)
        arrays, meta = record_episode(_worker["scene"], _worker["expert"], task, seed, config.noise, rng, _worker["cameras"])
        if meta["n_decisions"]:  # an episode whose subgoals all hold at reset teaches nothing
            episodes.append(arrays)
            metas.append(meta)
    if not episodes:
        raise RuntimeError(f"shard {index} ({task_id}, seeds {seeds}): no episode needed a single decision")
    arrays = _concat(episodes)
    meta = {
        "format": DEMO_FORMAT,
        "version": DEMO_VERSION,
        "fingerprint": config.fingerprint(),
        "task_id": task_id,
        "instruction": task.instruction,
        "subgoals": [{"name": sg.name, "predicate": sg.predicate} for sg in task.subgoals],
        "object_names": [o.name for o in task.objects],
        "episodes": metas,
        "n_decisions": int(len(arrays["subgoal_index"])),
    }
    write_shard(path, arrays, meta)
    return _manifest_entry(path, config, meta, attempted=len(seeds), reused=False)


def _manifest_entry(path: Path, config: DemoConfig, meta: dict[str, Any], attempted: int, reused: bool) -> dict[str, Any]:
    entry = {k: meta[k] for k in ("task_id", "object_names", "episodes", "n_decisions")}
    return {"file": str(path.relative_to(config.out_dir)), **entry, "attempted": attempted, "reused": reused}


def shard_jobs(config: DemoConfig, task_ids: list[str]) -> list[tuple[int, str, list[int]]]:
    """(shard index, task, seeds): each task's seeds in blocks of episodes_per_shard."""
    jobs, index = [], 0
    seeds = config.seeds()
    for task_id in task_ids:
        for start in range(0, len(seeds), config.episodes_per_shard):
            jobs.append((index, task_id, seeds[start : start + config.episodes_per_shard]))
            index += 1
    return jobs


def generate_demos(config: DemoConfig, command: str = "") -> dict[str, Any]:
    """Generate every shard (in a worker pool when workers > 1) and write the manifest."""
    task_ids = sorted(load_suite()) if not config.tasks else list(config.tasks)
    for task_id in task_ids:
        get_task(task_id)  # UnknownTaskError lists the valid ids
    out_dir = Path(config.out_dir)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    jobs = shard_jobs(config, task_ids)
    entries: list[dict[str, Any]] = []
    start = time.perf_counter()
    n_episodes = sum(len(seeds) for _, _, seeds in jobs)
    bar = tqdm(total=n_episodes, desc="demo episodes", unit="ep", disable=not config.progress, dynamic_ncols=True)
    try:

        def record(entry: dict[str, Any]) -> None:
            entries.append(entry)
            done = [e for x in entries for e in x["episodes"]]
            bar.update(entry["attempted"])
            bar.set_postfix(success=f"{sum(e['success'] for e in done)}/{len(done)}", decisions=sum(x["n_decisions"] for x in entries))

        if config.workers == 1:
            _init_worker(config)
            for job in jobs:
                record(_run_shard(job))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
                for entry in pool.imap_unordered(_run_shard, jobs, chunksize=1):
                    record(entry)
    finally:
        bar.close()
    entries.sort(key=lambda e: e["file"])
    manifest = build_manifest(config, entries, time.perf_counter() - start, command)
    tmp = out_dir / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / MANIFEST_FILE)
    totals = manifest["totals"]
    logger.info(
        "wrote %s: %d episodes, %d decisions, expert success %.3f",
        out_dir / MANIFEST_FILE, totals["episodes"], totals["decisions"], totals["success_rate"],
    )
    return manifest


def build_manifest(config: DemoConfig, entries: list[dict[str, Any]], wall_s: float, command: str) -> dict[str, Any]:
    episodes = [e for entry in entries for e in entry["episodes"]]
    per_task: dict[str, dict[str, Any]] = {}
    for entry in entries:
        t = per_task.setdefault(entry["task_id"], {"object_names": entry["object_names"], "episodes": 0, "successes": 0, "decisions": 0})
        t["episodes"] += len(entry["episodes"])
        t["successes"] += sum(e["success"] for e in entry["episodes"])
        t["decisions"] += entry["n_decisions"]
    return {
        "format": DEMO_FORMAT,
        "version": DEMO_VERSION,
        "fingerprint": config.fingerprint(),
        "config": asdict(config),
        "expert": asdict(ExpertConfig()),
        "action": {"chunk_steps": ExpertConfig().chunk_steps, "control_hz": config.control_hz},
        "command": command,
        "tasks": per_task,
        "shards": [{k: v for k, v in e.items() if k not in ("reused", "attempted")} for e in entries],
        "totals": {
            "episodes": len(episodes),
            "decisions": sum(e["n_decisions"] for e in entries),
            "success_rate": sum(e["success"] for e in episodes) / len(episodes) if episodes else 0.0,
            "mean_wall_s_per_episode": sum(e["wall_s"] for e in episodes) / len(episodes) if episodes else 0.0,
            "wall_s": wall_s,
        },
    }


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a demonstration directory; raises ShardError when missing or foreign."""
    path = Path(data_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: cannot read the demonstration manifest ({exc}); generate demos first (python -m training.bc.demos)") from exc
    if manifest.get("format") != DEMO_FORMAT or manifest.get("version") != DEMO_VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected {DEMO_FORMAT!r} {DEMO_VERSION}")
    return manifest


# -- command line -------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None, prog: str = "python -m training.bc.demos") -> DemoConfig:
    parser = argparse.ArgumentParser(prog=prog, description="Scripted-expert demonstrations with injected noise, for behaviour cloning.")
    parser.add_argument("--out", required=True, help="output directory (shards/ and manifest.json)")
    parser.add_argument("--tasks", help="comma-separated task ids (default: the whole suite)")
    parser.add_argument("--episodes-per-task", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0, help="first TRAIN seed")
    parser.add_argument("--episodes-per-shard", type=int, default=10)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--arm-sigma-rad", type=float, default=NoiseConfig.arm_sigma_rad)
    parser.add_argument("--perturb-prob", type=float, default=NoiseConfig.perturb_prob)
    parser.add_argument("--pause-prob", type=float, default=NoiseConfig.pause_prob)
    parser.add_argument("--clean-episode-fraction", type=float, default=NoiseConfig.clean_episode_fraction)
    parser.add_argument("--cameras", default="", help="comma-separated cameras whose images to store: front,wrist (default none)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("W", "H"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        noise = NoiseConfig(
            arm_sigma_rad=args.arm_sigma_rad,
            perturb_prob=args.perturb_prob,
            pause_prob=args.pause_prob,
            clean_episode_fraction=args.clean_episode_fraction,
        )
        return DemoConfig(
            out_dir=args.out,
            tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else (),
            episodes_per_task=args.episodes_per_task,
            first_seed=args.first_seed,
            episodes_per_shard=args.episodes_per_shard,
            workers=args.workers,
            noise=noise,
            noise_seed=args.noise_seed,
            cameras=tuple(c.strip() for c in args.cameras.split(",") if c.strip()),
            image_width=args.image_size[0],
            image_height=args.image_size[1],
            progress=not args.no_progress,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None, prog: str = "python -m training.bc.demos") -> int:
    """Command line; `prog` is how the caller names the command (e.g. "helmstack demos")."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv, prog)
    command = f"{prog} " + " ".join(shlex.quote(a) for a in argv)
    manifest = generate_demos(config, command)
    print(json.dumps(manifest["totals"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
