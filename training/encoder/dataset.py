"""Frames for the image-text encoder: simulator renders paired with generated captions.

Training frames come from the behaviour-cloning demonstrations (`helmstack demos --cameras
front --image-size 96 96`): the same noisy scripted-expert episodes on TRAIN seeds only,
whose shards already hold the rendered images and the world state of every decision
(`frames_from_demos`). Nothing is rendered twice, and the seed split is the one
`training.bc.demos` enforces.

Evaluation frames come from HELD-OUT seeds, which the demonstration generator refuses by
design, so `record_frames` runs those episodes here with the same recorder
(`training.bc.demos.NoisyExpertRecorder`, the same noise model and per-episode noise
stream) and the same cameras, in a pool of worker processes.

Captions are computed when frames are loaded (`training.encoder.captions`), not stored, so
the caption design can change without re-rendering. Consecutive decisions of an episode are
nearly identical images; `frame_stride` keeps every k-th decision of each episode plus every
decision where the caption or the subgoal changes (the informative moments are kept).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from sim.expert import ExpertConfig, ScriptedExpert
from sim.panda import PandaKinematics
from sim.rollout import run_episode
from sim.scene import TabletopScene
from sim.tasks.suite import SPLITS, get_task, initial_state_seeds, load_suite
from training.bc.demos import (
    CAMERA_NAMES,
    NoiseConfig,
    NoisyExpertRecorder,
    ShardError,
    episode_rng,
    load_manifest,
    make_cameras,
    read_shard,
    world_state_at,
)
from training.encoder.captions import scene_caption, subgoal_caption

logger = logging.getLogger(__name__)

FRAMES_FORMAT = "helmstack-encoder-frames"
FRAMES_VERSION = 1


@dataclass
class FrameSet:
    """Images and their captions, one row per (decision, camera)."""

    images: NDArray[np.uint8]  # (N, H, W, 3)
    captions: list[str]  # scene caption per row
    subgoals: list[str]  # subgoal text per row
    task_ids: list[str]
    episode: NDArray[np.int64]  # (N,) index into `episodes`
    camera: list[str]
    episodes: list[dict[str, Any]] = field(default_factory=list)  # task_id, seed, ...

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, rows: NDArray[np.int64]) -> FrameSet:
        rows = np.asarray(rows, dtype=np.int64)
        return FrameSet(
            images=self.images[rows],
            captions=[self.captions[i] for i in rows],
            subgoals=[self.subgoals[i] for i in rows],
            task_ids=[self.task_ids[i] for i in rows],
            episode=self.episode[rows],
            camera=[self.camera[i] for i in rows],
            episodes=self.episodes,
        )


def _check_stride(frame_stride: int) -> None:
    if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride <= 0:
        raise ValueError(f"frame_stride must be a positive int, got {frame_stride!r}")


def keep_rows(episode: NDArray[np.int64], captions: list[str], subgoals: list[str], frame_stride: int) -> NDArray[np.int64]:
    """Rows to keep: every `frame_stride`-th decision of each episode (counting from its
    first) and every decision whose caption or subgoal differs from the previous one's."""
    _check_stride(frame_stride)
    keep = []
    position = 0
    for i in range(len(episode)):
        first = i == 0 or episode[i] != episode[i - 1]
        position = 0 if first else position + 1
        changed = first or captions[i] != captions[i - 1] or subgoals[i] != subgoals[i - 1]
        if changed or position % frame_stride == 0:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def _concat(parts: list[FrameSet]) -> FrameSet:
    if not parts:
        raise ValueError("no frames")
    episodes: list[dict[str, Any]] = []
    offsets = []
    for part in parts:
        offsets.append(len(episodes))
        episodes.extend(part.episodes)
    return FrameSet(
        images=np.concatenate([p.images for p in parts]),
        captions=[c for p in parts for c in p.captions],
        subgoals=[s for p in parts for s in p.subgoals],
        task_ids=[t for p in parts for t in p.task_ids],
        episode=np.concatenate([p.episode + off for p, off in zip(parts, offsets)]),
        camera=[c for p in parts for c in p.camera],
        episodes=episodes,
    )


def frames_from_demos(
    data_dir: str | Path,
    cameras: tuple[str, ...] = ("front",),
    frame_stride: int = 1,
    tasks: tuple[str, ...] = (),
    progress: bool = False,
) -> FrameSet:
    """Every stored image of the demonstrations in `data_dir` (selected tasks and cameras)
    with its scene and subgoal captions; raises ShardError / ValueError naming the problem."""
    _check_stride(frame_stride)
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    stored = tuple(manifest["config"].get("cameras", ()))
    if not cameras:
        raise ValueError("cameras must name at least one camera")
    missing = [c for c in cameras if c not in stored]
    if missing:
        raise ValueError(
            f"{data_dir}: the demonstrations store images of {list(stored) or 'no camera'}, not {missing}; "
            f"regenerate with: helmstack demos --out {data_dir} --cameras {','.join(cameras)} --image-size 96 96"
        )
    unknown = sorted(set(tasks) - set(manifest["tasks"]))
    if unknown:
        raise ValueError(f"tasks {unknown} have no demonstrations in {data_dir} (it has {sorted(manifest['tasks'])})")
    shards = [s for s in manifest["shards"] if not tasks or s["task_id"] in tasks]
    if not shards:
        raise ValueError(f"{data_dir}: no shards to load")
    parts = []
    for entry in tqdm(shards, desc="captioning demo frames", disable=not progress, dynamic_ncols=True):
        path = data_dir / entry["file"]
        arrays, meta = read_shard(path)
        task = get_task(meta["task_id"])
        names = meta["object_names"]
        if names != [o.name for o in task.objects]:
            raise ShardError(f"{path}: objects {names} do not match task {task.task_id!r}; the task changed since the demos were made")
        n = len(arrays["subgoal_index"])
        captions = [scene_caption(world_state_at(arrays, names, i), task) for i in range(n)]
        subgoals = [subgoal_caption(task, int(k)) for k in arrays["subgoal_index"]]
        episode = arrays["episode"].astype(np.int64)
        rows = keep_rows(episode, captions, subgoals, frame_stride)
        # One part per shard, every camera's rows pointing at the same episode entries.
        parts.append(FrameSet(
            images=np.concatenate([arrays[f"images_{camera}"][rows] for camera in cameras]),
            captions=[captions[i] for i in rows] * len(cameras),
            subgoals=[subgoals[i] for i in rows] * len(cameras),
            task_ids=[task.task_id] * (len(rows) * len(cameras)),
            episode=np.tile(episode[rows], len(cameras)),
            camera=[camera for camera in cameras for _ in rows],
            episodes=[{"task_id": task.task_id, "shard": entry["file"], "seed": e["seed"]} for e in meta["episodes"]],
        ))
    frames = _concat(parts)
    logger.info("%d frames (%d unique captions) from %d episodes in %s", len(frames), len(set(frames.captions)), len(frames.episodes), data_dir)
    return frames


# -- held-out episodes, recorded here ------------------------------------------------------
@dataclass(frozen=True)
class RecordConfig:
    """Which expert episodes to record frames from (held-out evaluation by default)."""

    tasks: tuple[str, ...] = ()  # empty = the whole suite
    n_seeds: int = 10  # per task: the split's first seeds
    split: str = "heldout"
    cameras: tuple[str, ...] = ("front",)
    image_width: int = 96
    image_height: int = 96
    frame_stride: int = 2
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # as the training demonstrations
    noise_seed: int = 0
    workers: int = 2
    physics_hz: int = 240
    control_hz: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if isinstance(self.n_seeds, bool) or not isinstance(self.n_seeds, int) or self.n_seeds <= 0:
            raise ValueError(f"n_seeds must be a positive int, got {self.n_seeds!r}")
        unknown = sorted(set(self.cameras) - set(CAMERA_NAMES))
        if not self.cameras or unknown or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must be distinct names from {list(CAMERA_NAMES)}, got {list(self.cameras)}")
        if self.image_width <= 0 or self.image_height <= 0:
            raise ValueError(f"image_width and image_height must be > 0, got {self.image_width}x{self.image_height}")
        _check_stride(self.frame_stride)
        if not 1 <= self.workers <= (os.cpu_count() or 1):
            raise ValueError(f"workers must be in [1, {os.cpu_count() or 1}], got {self.workers}")

    def fingerprint(self) -> str:
        keys = {k: v for k, v in asdict(self).items() if k not in ("workers", "progress")}
        keys["expert"] = asdict(ExpertConfig())
        keys["version"] = FRAMES_VERSION
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


_worker: dict[str, Any] = {}


def _init_worker(config: RecordConfig) -> None:
    scene = TabletopScene(physics_hz=config.physics_hz, control_hz=config.control_hz)
    _worker.update(
        config=config,
        scene=scene,
        expert=ScriptedExpert(PandaKinematics(), control_hz=config.control_hz, config=ExpertConfig()),
        cameras=make_cameras(scene, config.cameras, config.image_width, config.image_height),
    )


def _record_one(job: tuple[str, int]) -> dict[str, Any]:
    task_id, seed = job
    config: RecordConfig = _worker["config"]
    task = get_task(task_id)
    recorder = NoisyExpertRecorder(_worker["expert"], _worker["scene"], config.noise, episode_rng(config.noise_seed, task_id, seed), _worker["cameras"])
    result = run_episode(_worker["scene"], task, recorder, seed)
    decisions = recorder.decisions
    captions = [scene_caption(d.world, task) for d in decisions]
    subgoals = [subgoal_caption(task, d.subgoal_index) for d in decisions]
    rows = keep_rows(np.zeros(len(decisions), dtype=np.int64), captions, subgoals, config.frame_stride) if decisions else np.zeros(0, np.int64)
    return {
        "task_id": task_id,
        "seed": int(seed),
        "success": bool(result.success),
        "captions": [captions[i] for i in rows],
        "subgoals": [subgoals[i] for i in rows],
        "images": {c: np.stack([decisions[i].images[c] for i in rows]) if len(rows) else np.zeros((0, config.image_height, config.image_width, 3), np.uint8) for c in config.cameras},
    }


def record_frames(config: RecordConfig) -> FrameSet:
    """Run the noisy scripted expert on (task, seed) episodes of `config.split` and keep the
    rendered frames with their captions (worker pool when workers > 1)."""
    task_ids = sorted(load_suite()) if not config.tasks else list(config.tasks)
    for task_id in task_ids:
        get_task(task_id)  # UnknownTaskError lists the valid ids
    seeds = initial_state_seeds(config.split, config.n_seeds)
    jobs = [(t, s) for t in task_ids for s in seeds]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc=f"recording {config.split} frames", unit="ep", disable=not config.progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        if config.workers == 1:
            _init_worker(config)
            for job in jobs:
                results.append(_record_one(job))
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
                for result in pool.imap_unordered(_record_one, jobs, chunksize=1):
                    results.append(result)
                    bar.update(1)
    finally:
        bar.close()
    results.sort(key=lambda r: (r["task_id"], r["seed"]))
    parts, episodes = [], []
    for index, r in enumerate(results):
        n = len(r["captions"])
        episodes.append({"task_id": r["task_id"], "seed": r["seed"], "expert_success": r["success"]})
        for camera in config.cameras:
            parts.append(FrameSet(
                images=r["images"][camera], captions=list(r["captions"]), subgoals=list(r["subgoals"]),
                task_ids=[r["task_id"]] * n, episode=np.full(n, index, dtype=np.int64), camera=[camera] * n,
            ))
    frames = _concat(parts)
    frames.episodes = episodes
    logger.info("recorded %d frames from %d %s episodes in %.0f s", len(frames), len(results), config.split, time.perf_counter() - start)
    return frames


# -- a cache of recorded frames ----------------------------------------------------------
def save_frames(frames: FrameSet, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write frames to one .npz atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": FRAMES_FORMAT, "version": FRAMES_VERSION, **meta, "captions": frames.captions, "subgoals": frames.subgoals,
            "task_ids": frames.task_ids, "camera": frames.camera, "episodes": frames.episodes}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, meta_json=np.array(json.dumps(info)), images=frames.images, episode=frames.episode)
    os.replace(tmp, path)
    return path


def load_frames(path: str | Path) -> tuple[FrameSet, dict[str, Any]]:
    """(frames, meta) of a file written by `save_frames`; ShardError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            info = json.loads(str(data["meta_json"]))
            images, episode = data["images"], data["episode"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise ShardError(f"{path}: unreadable frames file ({exc})") from exc
    if info.get("format") != FRAMES_FORMAT or info.get("version") != FRAMES_VERSION:
        raise ShardError(f"{path}: format {info.get('format')!r} version {info.get('version')!r}, expected {FRAMES_FORMAT!r} {FRAMES_VERSION}")
    n = len(images)
    if not all(len(info[k]) == n for k in ("captions", "subgoals", "task_ids", "camera")) or len(episode) != n:
        raise ShardError(f"{path}: the frames file is inconsistent ({n} images)")
    frames = FrameSet(images=images, captions=info.pop("captions"), subgoals=info.pop("subgoals"), task_ids=info.pop("task_ids"),
                      episode=episode.astype(np.int64), camera=info.pop("camera"), episodes=info.pop("episodes"))
    return frames, info


def split_by_episode(frames: FrameSet, val_fraction: float, seed: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train rows, val rows): whole episodes held out, the same fraction of each task's
    episodes (at least one when a task has two or more and val_fraction > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(frames.episodes):
        by_task.setdefault(e["task_id"], []).append(i)
    val: list[int] = []
    for task_id in sorted(by_task):
        ids = np.array(by_task[task_id])
        n_val = int(round(val_fraction * len(ids)))
        if val_fraction > 0 and len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)
        val.extend(rng.permutation(ids)[:n_val].tolist())
    is_val = np.isin(frames.episode, np.array(val, dtype=np.int64))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
