"""Demonstration dataset for the BC policy: shards -> (features, encoded action chunks).

What: `load_demos` reads the shards a `training.bc.demos` run wrote, rebuilds each recorded
decision's WorldState and turns it into the policy's feature vector with the same
`ObservationFeaturizer` the runtime policy uses (so training and deployment cannot
featurise differently), and encodes the expert's label chunk (`encode_chunk`). Features are
computed here rather than stored, so the feature design can change without regenerating
demonstrations. `split_by_episode` holds out whole episodes, per task: consecutive
decisions of one episode are nearly identical, so a per-decision split would leak them into
validation and make the validation loss meaningless.

History windows (`history_windows`): for a policy with a temporal window of H decisions
(`FeatureConfig.history`), each decision's window is the row indices of the H decisions of
its own episode that end with it, in order, with -1 where the episode had not started yet.
Rows are stored episode by episode in decision order (as the shards record them), so the
windows are index arithmetic over the rows; they never reach into another episode, and the
frames themselves are gathered per batch (`training.bc.model.gather_windows`) instead of
being copied H times.

Image features: `embed_demo_images` runs an `ImageEncoder` over the stored camera images
once and writes `embeddings/<name>/<shard>.npz` beside the shards; `load_demos(...,
embeddings=name)` reads them. The encoder is trained elsewhere and plugs in through the
protocol; nothing here depends on which model it is.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from sim.tasks.predicates import parse_predicate
from sim.tasks.suite import get_task
from training.bc.demos import ShardError, load_manifest, read_shard, world_state_at
from training.bc.model import (
    ActionConfig,
    FeatureConfig,
    ImageEncoder,
    ObservationFeaturizer,
    RobotState,
    TextEncoder,
    encode_chunk,
    motion_features,
)

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"


@dataclass
class DemoDataset:
    """All decisions of the selected demonstrations, in memory."""

    features: NDArray[np.float32]  # (N, F)
    actions: NDArray[np.float32]  # (N, K, 9) encoded: arm offsets, absolute fingers
    episode: NDArray[np.int64]  # (N,) index into `episodes`
    predicate: NDArray[np.int64]  # (N,) index into feature_config.predicates
    episodes: list[dict[str, Any]]  # per episode: task_id, seed, shard, success, ...
    feature_config: FeatureConfig
    action_config: ActionConfig

    def __len__(self) -> int:
        return int(self.features.shape[0])


def load_demos(
    data_dir: str | Path,
    feature_config: FeatureConfig,
    *,
    tasks: tuple[str, ...] = (),
    embeddings: str = "",
    text_encoder: TextEncoder | None = None,
    progress: bool = False,
) -> DemoDataset:
    """Featurise every decision of the (selected tasks') shards under `data_dir`."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    action_config = ActionConfig(chunk_steps=int(manifest["action"]["chunk_steps"]), control_hz=float(manifest["action"]["control_hz"]))
    if feature_config.cameras and not embeddings:
        raise ValueError(f"the features use cameras {list(feature_config.cameras)}: name the image embedding set (embeddings=...) made by embed_demo_images")
    known = set(manifest["tasks"])
    missing = sorted(set(tasks) - known)
    if missing:
        raise ValueError(f"tasks {missing} have no demonstrations in {data_dir} (it has {sorted(known)})")
    shards = [s for s in manifest["shards"] if not tasks or s["task_id"] in tasks]
    if not shards:
        raise ValueError(f"{data_dir}: no shards to load")
    featurizer = ObservationFeaturizer(feature_config, text_encoder)
    predicate_index = {name: i for i, name in enumerate(feature_config.predicates)}
    features, actions, episode_ids, predicates = [], [], [], []
    episodes: list[dict[str, Any]] = []
    for entry in tqdm(shards, desc="featurising shards", disable=not progress, dynamic_ncols=True):
        path = data_dir / entry["file"]
        arrays, meta = read_shard(path)
        task = get_task(meta["task_id"])
        names = meta["object_names"]
        if names != [o.name for o in task.objects]:
            raise ShardError(
                f"{path}: objects {names} do not match task {task.task_id!r} ({[o.name for o in task.objects]}); "
                "the task changed since the demos were made"
            )
        labels = arrays["label"]
        if labels.shape[1:] != (action_config.chunk_steps, 9) or not np.all(np.isfinite(labels)):
            raise ShardError(f"{path}: labels must be finite ({action_config.chunk_steps}, 9) chunks, got shape {labels.shape[1:]}")
        images = _load_embeddings(data_dir, embeddings, path, feature_config, len(labels)) if feature_config.cameras else {}
        n = len(labels)
        shard_features = np.empty((n, feature_config.dim), dtype=np.float32)
        previous: RobotState | None = None
        for i in range(n):
            ws = world_state_at(arrays, names, i)
            robot = RobotState.from_world(ws)
            if i == 0 or arrays["episode"][i] != arrays["episode"][i - 1]:
                previous = None  # an episode's first decision: no motion yet
            motion = motion_features(previous, float(arrays["sim_time_s"][i - 1]) if previous is not None else 0.0, robot, ws.sim_time_s)
            shard_features[i] = featurizer.features(
                robot, task, int(arrays["subgoal_index"][i]), world=ws if feature_config.use_object_state else None,
                image_embeddings={cam: emb[i] for cam, emb in images.items()}, motion=motion,
            )
            previous = robot
        features.append(shard_features)
        actions.append(encode_chunk(labels, arrays["joint_positions"]))
        episode_ids.append(arrays["episode"].astype(np.int64) + len(episodes))
        subgoal_predicate = [predicate_index[parse_predicate(sg.predicate).name] for sg in task.subgoals]
        predicates.append(np.array([subgoal_predicate[int(k)] for k in arrays["subgoal_index"]], dtype=np.int64))
        episodes.extend({"task_id": task.task_id, "shard": entry["file"], **e} for e in meta["episodes"])
    dataset = DemoDataset(
        features=np.concatenate(features),
        actions=np.concatenate(actions),
        episode=np.concatenate(episode_ids),
        predicate=np.concatenate(predicates),
        episodes=episodes,
        feature_config=feature_config,
        action_config=action_config,
    )
    logger.info("loaded %d decisions from %d episodes (%d shards) in %s", len(dataset), len(episodes), len(shards), data_dir)
    return dataset


def history_windows(episode: NDArray[np.integer], history: int) -> NDArray[np.int64]:
    """(N, H) row indices of each row's window: the H rows of its episode up to and including
    it, oldest first, -1 before the episode's first row. `episode` (N,) must list each
    episode's rows contiguously (in decision order), as `load_demos` does."""
    episode = np.asarray(episode)
    if episode.ndim != 1:
        raise ValueError(f"episode must be a 1-D array of episode ids, got shape {episode.shape}")
    if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history <= 0:
        raise ValueError(f"history must be a positive int, got {history!r}")
    n = len(episode)
    if n == 0:
        return np.zeros((0, int(history)), dtype=np.int64)
    starts_here = np.ones(n, dtype=bool)
    starts_here[1:] = episode[1:] != episode[:-1]
    starts = np.flatnonzero(starts_here)
    if len(np.unique(episode[starts])) != len(starts):
        raise ValueError("the rows of an episode must be contiguous: an episode id reappears after another episode's rows")
    first_row = starts[np.cumsum(starts_here) - 1]  # (N,) the first row of each row's episode
    rows = np.arange(n)[:, None] + np.arange(-int(history) + 1, 1)[None, :]  # (N, H)
    return np.where(rows >= first_row[:, None], rows, -1).astype(np.int64)


def split_by_episode(dataset: DemoDataset, val_fraction: float, seed: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train rows, val rows): whole episodes held out, the same fraction of each task's
    episodes (at least one when the task has two or more and val_fraction > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(dataset.episodes):
        by_task.setdefault(e["task_id"], []).append(i)
    val_episodes: list[int] = []
    for task_id in sorted(by_task):
        ids = np.array(by_task[task_id])
        n_val = int(round(val_fraction * len(ids)))
        if val_fraction > 0 and len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)
        val_episodes.extend(rng.permutation(ids)[:n_val].tolist())
    is_val = np.isin(dataset.episode, np.array(val_episodes, dtype=np.int64))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# -- image embeddings ---------------------------------------------------------------------
def _embedding_path(data_dir: Path, name: str, shard_path: Path) -> Path:
    return data_dir / EMBEDDINGS_DIR / name / shard_path.name


def embed_demo_images(data_dir: str | Path, encoder: ImageEncoder, name: str, batch_size: int = 64, progress: bool = True) -> Path:
    """Encode every stored camera image of every shard with `encoder`; writes
    `embeddings/<name>/<shard>.npz` (one (N, D) array per camera) and returns the folder."""
    if not name or not name.replace("-", "_").isidentifier():
        raise ValueError(f"name must be a short identifier for the embedding set (e.g. the encoder's run name), got {name!r}")
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    cameras = tuple(manifest["config"]["cameras"])
    if not cameras:
        raise ValueError(f"{data_dir}: the demonstrations were generated without images (cameras=[]); regenerate with --cameras")
    out = data_dir / EMBEDDINGS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    for entry in tqdm(manifest["shards"], desc=f"embedding images ({name})", disable=not progress, dynamic_ncols=True):
        shard_path = data_dir / entry["file"]
        arrays, _ = read_shard(shard_path)
        result: dict[str, NDArray[np.float32]] = {}
        for camera in cameras:
            images = arrays[f"images_{camera}"]  # (N, H, W, 3) uint8
            emb = np.concatenate(
                [np.asarray(encoder.encode_images(images[i : i + batch_size]), dtype=np.float32) for i in range(0, len(images), batch_size)]
            )  # (N, D)
            if emb.shape != (len(images), encoder.embedding_dim):
                raise ValueError(f"encoder returned {emb.shape} for {len(images)} images, expected ({len(images)}, {encoder.embedding_dim})")
            result[camera] = emb
        target = _embedding_path(data_dir, name, shard_path)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, meta_json=np.array(json.dumps({"encoder": name, "dim": encoder.embedding_dim})), **result)
        os.replace(tmp, target)
    return out


def _load_embeddings(data_dir: Path, name: str, shard_path: Path, config: FeatureConfig, n: int) -> dict[str, NDArray[np.float32]]:
    path = _embedding_path(data_dir, name, shard_path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "meta_json"}
    except OSError as exc:
        raise ShardError(f"{path}: no image embeddings ({exc}); run embed_demo_images(data_dir, encoder, {name!r}) first") from exc
    for camera in config.cameras:
        if camera not in arrays:
            raise ShardError(f"{path}: no embeddings for camera {camera!r} (has {sorted(arrays)})")
        if arrays[camera].shape != (n, config.image_embedding_dim):
            raise ShardError(f"{path}: {camera} embeddings have shape {arrays[camera].shape}, expected ({n}, {config.image_embedding_dim})")
    return {camera: arrays[camera] for camera in config.cameras}
