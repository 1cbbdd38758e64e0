"""State-verifier examples from recorded rollouts (training.verifier.rollouts).

Every labelled sample becomes the exact inputs the run-time verifier computes
(runtime.state_verifier.VerifierFeaturizer): observation features, chunk features and the
features of the keyframes memory would return. Retrieval is replayed as it happens at run
time: the episode's keyframes enter a `runtime.helm_memory.HelmMemory` in the order they
were written, and each sample queries it (episode filter, top-k of the combined image +
subgoal-text key) with its own camera image and subgoal text, seeing only the keyframes
that existed at that moment. Embeddings come from the image-text encoder the
harness will run with, so that changing the encoder means rebuilding the features.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from policies.base import Observation
from runtime.helm_memory import HelmMemory, ImageTextEncoder
from runtime.state_verifier import KeyframeView, VerifierFeatureConfig, VerifierFeaturizer
from sim.tasks.suite import get_task
from training.verifier.rollouts import FORMAT, world_from_record

logger = logging.getLogger(__name__)


class RolloutDataError(ValueError):
    """A rollout directory that is missing, empty or not in the expected format."""


@dataclass
class Episode:
    meta: dict[str, Any]
    keyframe_images: NDArray[np.uint8]
    sample_images: NDArray[np.uint8]
    chunks: NDArray[np.float64]

    @property
    def name(self) -> str:
        return f"{self.meta['task_id']}-{self.meta['seed']}"


def load_episodes(data_dir: str | Path) -> list[Episode]:
    root = Path(data_dir)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise RolloutDataError(f"{manifest}: no verifier rollouts here (run `helmstack verifier-data --out {root}`)")
    if json.loads(manifest.read_text()).get("format") != FORMAT:
        raise RolloutDataError(f"{manifest}: not a {FORMAT} directory")
    episodes = []
    for path in sorted((root / "episodes").glob("*.json")):
        meta = json.loads(path.read_text())
        try:
            with np.load(path.with_suffix(".npz")) as arrays:
                episodes.append(Episode(meta, arrays["keyframe_images"], arrays["sample_images"], arrays["chunks"]))
        except (OSError, KeyError, ValueError) as exc:
            raise RolloutDataError(f"{path.with_suffix('.npz')}: {exc}") from exc
    if not episodes:
        raise RolloutDataError(f"{root}/episodes: no finished episodes")
    return episodes


@dataclass
class Examples:
    """Aligned arrays, one row per labelled sample."""

    observation: NDArray[np.float32]  # (N, Fo)
    chunk: NDArray[np.float32]  # (N, Fc)
    keyframes: NDArray[np.float32]  # (N, K, Fk)
    valid: NDArray[np.bool_]  # (N, K)
    label: NDArray[np.int64]  # (N,) 1 = the subgoal fails after this chunk
    episode: NDArray[np.int64]  # (N,) index into `episode_names`
    episode_names: list[str]

    def take(self, rows: NDArray[np.int64]) -> Examples:
        return Examples(self.observation[rows], self.chunk[rows], self.keyframes[rows], self.valid[rows],
                        self.label[rows], self.episode[rows], self.episode_names)

    def __len__(self) -> int:
        return len(self.label)


def build_examples(episodes: list[Episode], features: VerifierFeatureConfig, encoder: ImageTextEncoder | None,
                   progress: bool = True) -> Examples:
    """Featurise every sample; with `encoder` None, no keyframes are retrieved (the
    memory-free ablation's inputs: its keyframe arrays are all invalid)."""
    featurizer = VerifierFeaturizer(features)
    k = features.memory_k
    obs, act, kfs, valids, labels, groups = [], [], [], [], [], []
    for e, ep in enumerate(tqdm(episodes, desc="verifier features", unit="ep", disable=not progress, dynamic_ncols=True)):
        task = get_task(ep.meta["task_id"])
        keyframes = ep.meta["keyframes"]
        memory = None
        if encoder is not None and keyframes:
            # The run-time memory itself, fed in recording order with batch-computed image keys.
            memory = HelmMemory(encoder)
            memory.start_episode(ep.name)
            kf_img = np.asarray(encoder.encode_images(ep.keyframe_images), np.float32)
            sample_img = np.asarray(encoder.encode_images(ep.sample_images), np.float32) if len(ep.sample_images) else None
        for s in ep.meta["samples"]:
            world = world_from_record(s["world"])
            index = int(s["subgoal_index"])
            obs.append(featurizer.observation(world, task, index))
            act.append(featurizer.chunk(ep.chunks[s["chunk_index"]], world))
            chosen: list[KeyframeView] = []
            if memory is not None:
                while len(memory.memory) < s["n_keyframes"]:
                    i = len(memory.memory)
                    r = keyframes[i]
                    then = world_from_record(r["world"])
                    memory.write(r["kind"], r["subgoal_index"], task.subgoals[r["subgoal_index"]],
                                 Observation(then.joint_positions, then.sim_time_s, task, r["subgoal_index"], then),
                                 None, bool(r["verified"]), image_embedding=kf_img[i])
                now = Observation(world.joint_positions, world.sim_time_s, task, index, world)
                chosen = memory.context(now, index, k, image_embedding=sample_img[s["image_index"]])
            kf, valid = featurizer.keyframes(chosen, world, task, index)
            kfs.append(kf)
            valids.append(valid)
            labels.append(int(s["label"]))
            groups.append(e)
    if not labels:
        raise RolloutDataError("the rollouts hold no labelled samples")
    return Examples(np.stack(obs), np.stack(act), np.stack(kfs), np.stack(valids), np.asarray(labels, np.int64),
                    np.asarray(groups, np.int64), [ep.name for ep in episodes])


def split_by_episode(examples: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Train / validation rows, whole episodes on one side (no leakage between them)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = np.unique(examples.episode)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * val_fraction)))
    if n_val >= len(ids):
        raise RolloutDataError(f"need at least 2 episodes to split, got {len(ids)}")
    val = np.isin(examples.episode, ids[:n_val])
    return examples.take(np.flatnonzero(~val)), examples.take(np.flatnonzero(val))
