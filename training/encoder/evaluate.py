"""Held-out evaluation of an image-text encoder: image -> text retrieval on unseen scenes.

    helmstack eval encoder --checkpoint runs/encoder --out benchmarks/results/encoder.json [--seeds 10]

What: the noisy scripted expert runs every task from HELD-OUT seeds (initial states never
seen in training, `training.encoder.dataset.record_frames`); each kept frame's image is
embedded, and the texts are ranked by cosine similarity (`training.encoder.retrieval`):
scene captions (all distinct captions of the held-out frames, and those of the frame's own
task) and subgoal texts (the whole suite's, and the task's own). Reported: recall@1 and @5
over frames, the same per episode with a 95% Student-t interval over episodes (frames of
one episode are not independent samples, episodes are), per-task recall, the chance level
of each pool, the same architecture untrained (random init, as a floor), and encoding speed.

The encoder is loaded with `perception.encoder.load_encoder`, i.e. through
``open_clip.create_model_and_transforms(model_name, pretrained=<file>)``: what is measured is
what the harness loads. Recording the held-out frames is the slow part (software
rendering); `--frames-cache FILE` keeps them for the next evaluation with the same settings.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.encoder import ClipEncoder, EncoderLoadError, load_encoder
from runtime.stats import mean_ci
from sim.tasks.suite import SPLITS, UnknownTaskError, get_task
from training.bc.demos import ShardError
from training.encoder.dataset import FrameSet, RecordConfig, load_frames, record_frames, save_frames
from training.encoder.retrieval import KINDS, recall_at, retrieval_ranks, suite_subgoals
from runtime.config import require_positive_ints

logger = logging.getLogger(__name__)

KS = (1, 5)


@dataclass(frozen=True)
class EncoderEvalConfig:
    """Held-out retrieval evaluation of one encoder."""

    checkpoint: str  # training run, its encoder/ export, or an open_clip checkpoint file
    out: str  # JSON report
    model_name: str = ""  # for a checkpoint file: its registered open_clip model (default the project's)
    config_file: str = ""  # a JSON architecture config to register first (a user's model)
    tasks: tuple[str, ...] = ()  # empty = the whole suite
    n_seeds: int = 10  # per task, the split's first seeds
    split: str = "heldout"
    cameras: tuple[str, ...] = ("front",)
    image_size: int = 96  # rendered frames (square); the encoder resizes to its own input
    frame_stride: int = 2
    workers: int = 2
    frames_cache: str = ""  # .npz of recorded frames, reused when its settings match
    baseline: bool = True  # also evaluate the same architecture with random weights
    num_threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.out:
            raise ValueError(f"checkpoint and out must be paths, got {self.checkpoint!r} and {self.out!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        require_positive_ints(self, ("n_seeds", "image_size", "frame_stride", "num_threads"))

    def record_config(self) -> RecordConfig:
        return RecordConfig(
            tasks=self.tasks, n_seeds=self.n_seeds, split=self.split, cameras=self.cameras, image_width=self.image_size,
            image_height=self.image_size, frame_stride=self.frame_stride, workers=self.workers, progress=self.progress,
        )


def held_out_frames(config: EncoderEvalConfig) -> FrameSet:
    """Record the frames, or read them from frames_cache when it was made with the same settings."""
    record = config.record_config()
    cache = Path(config.frames_cache) if config.frames_cache else None
    if cache is not None and cache.exists():
        try:
            frames, meta = load_frames(cache)
            if meta.get("fingerprint") == record.fingerprint():
                logger.info("using %d cached frames from %s", len(frames), cache)
                return frames
            logger.info("%s was recorded with other settings: recording again", cache)
        except ShardError as exc:
            logger.warning("recording again: %s", exc)
    frames = record_frames(record)
    if cache is not None:
        save_frames(frames, cache, {"fingerprint": record.fingerprint(), "record_config": asdict(record)})
    return frames


def _chance(pool_sizes: np.ndarray, k: int) -> float:
    return float(np.mean(np.minimum(k, pool_sizes) / pool_sizes))


def _episode_values(values: np.ndarray, episode: np.ndarray) -> list[float]:
    return [float(values[episode == e].mean()) for e in np.unique(episode)]


def retrieval_report(encoder: ClipEncoder, frames: FrameSet, subgoal_pool: list[str]) -> dict[str, Any]:
    """Recall@k per kind (frames and episode mean with a CI), chance levels, per task."""
    image_emb = encoder.encode_images(frames.images)
    ranks, sizes = retrieval_ranks(image_emb, frames.captions, frames.subgoals, frames.task_ids, encoder.encode_texts, subgoal_pool)
    tasks = np.asarray(frames.task_ids)
    # Pool size per frame (for chance): the whole pool, or the frame's task's pool.
    per_frame_pool = {"caption": np.full(len(frames), sizes["caption"]), "subgoal": np.full(len(frames), sizes["subgoal"])}
    per_frame_pool["caption_in_task"] = np.array([len({frames.captions[j] for j in np.flatnonzero(tasks == t)}) for t in tasks]) if len(frames) else np.zeros(0)
    per_frame_pool["subgoal_in_task"] = np.array([len({sg.name for sg in get_task(t).subgoals}) for t in tasks])
    out: dict[str, Any] = {}
    for kind in KINDS:
        entry: dict[str, Any] = {"pool": sizes[kind] if not kind.endswith("in_task") else {"max": sizes[kind]}}
        for k in KS:
            hits = (ranks[kind] < k).astype(np.float64)
            entry[f"r{k}"] = {"frames": recall_at(ranks[kind], k), "episode_mean": mean_ci(_episode_values(hits, frames.episode)),
                              "chance": _chance(per_frame_pool[kind], k)}
        out[kind] = entry
    per_task: dict[str, Any] = {}
    for task_id in sorted(set(frames.task_ids)):
        rows = np.flatnonzero(tasks == task_id)
        per_task[task_id] = {"frames": int(len(rows)), **{f"{kind}_r{k}": recall_at(ranks[kind][rows], k) for kind in KINDS for k in KS}}
    return {"retrieval": out, "per_task": per_task, "ranks": ranks}


def encoding_speed(encoder: ClipEncoder, frames: FrameSet, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds per image at batch 1 and per image at batch 64 (current torch threads)."""
    def median_ms(fn, n: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)

    one = frames.images[:1]
    batch = frames.images[:64]
    texts = sorted(set(frames.captions))[:64]
    return {
        "threads": torch.get_num_threads(),
        "image_ms_batch1": median_ms(lambda: encoder.encode_images(one), repeats),
        "image_ms_per_image_batch64": median_ms(lambda: encoder.encode_images(batch), max(3, repeats // 4)) / len(batch),
        "text_ms_per_text_batch64": median_ms(lambda: encoder.encode_texts(texts), max(3, repeats // 4)) / max(1, len(texts)),
    }


def _examples(frames: FrameSet, ranks: dict[str, np.ndarray], n: int = 5) -> list[dict[str, Any]]:
    """A few frames whose caption was not retrieved first, for reading what goes wrong."""
    wrong = np.flatnonzero(ranks["caption_in_task"] > 0)
    rng = np.random.default_rng(0)
    return [
        {"task_id": frames.task_ids[i], "episode": int(frames.episode[i]), "caption": frames.captions[i], "subgoal": frames.subgoals[i],
         "caption_in_task_rank": int(ranks["caption_in_task"][i])}
        for i in sorted(rng.choice(wrong, min(n, len(wrong)), replace=False).tolist())
    ]


def evaluate_encoder(config: EncoderEvalConfig, command: str = "") -> dict[str, Any]:
    """Run the evaluation and write the JSON report (atomically); returns it."""
    torch.set_num_threads(config.num_threads)
    encoder = load_encoder(config.checkpoint, config.model_name or None, config_file=config.config_file or None)
    frames = held_out_frames(config)
    if len(frames) == 0:
        raise ValueError("no held-out frames were recorded")
    pool = suite_subgoals(config.tasks)
    start = time.perf_counter()
    report = retrieval_report(encoder, frames, pool)
    ranks = report.pop("ranks")
    training: dict[str, Any] = {}
    if encoder.checkpoint:
        info = Path(encoder.checkpoint).with_name("training.json")
        if info.exists():
            training = json.loads(info.read_text())
    result: dict[str, Any] = {
        "config": asdict(config),
        "command": command,
        "encoder": {"model_name": encoder.model_name, "checkpoint": encoder.checkpoint, "embedding_dim": encoder.embedding_dim,
                    "image_size": list(encoder.image_size), "parameters": int(sum(p.numel() for p in encoder.model.parameters())),
                    "training": training},
        "frames": {"n": len(frames), "episodes": len(frames.episodes), "split": config.split,
                   "seeds": sorted({int(e["seed"]) for e in frames.episodes}), "tasks": sorted(set(frames.task_ids)),
                   "unique_captions": len(set(frames.captions)), "expert_success": float(np.mean([e["expert_success"] for e in frames.episodes]))},
        **report,
        "speed": encoding_speed(encoder, frames),
        "examples_missed": _examples(frames, ranks),
    }
    if config.baseline:
        torch.manual_seed(0)  # the floor is one fixed random initialisation
        untrained = ClipEncoder(encoder.model_name, None, config_file=config.config_file or None)
        base = retrieval_report(untrained, frames, pool)
        result["baseline_untrained"] = {kind: {f"r{k}": base["retrieval"][kind][f"r{k}"]["frames"] for k in KS} for kind in KINDS}
    result["eval_wall_s"] = time.perf_counter() - start
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return result


def summary_markdown(report: dict[str, Any]) -> str:
    lines = ["| retrieval | pool | R@1 | R@1 episodes (95% CI) | R@5 | chance R@1 | untrained R@1 |", "|---|---|---|---|---|---|---|"]
    for kind, entry in report["retrieval"].items():
        pool = entry["pool"] if isinstance(entry["pool"], int) else f"<= {entry['pool']['max']}"
        ep = entry["r1"]["episode_mean"]
        base = report.get("baseline_untrained", {}).get(kind, {}).get("r1")
        lines.append(
            f"| {kind} | {pool} | {entry['r1']['frames']:.3f} | {ep['mean']:.3f} [{ep['ci95'][0]:.3f}, {ep['ci95'][1]:.3f}] | "
            f"{entry['r5']['frames']:.3f} | {entry['r1']['chance']:.3f} | {'-' if base is None else f'{base:.3f}'} |"
        )
    return "\n".join(lines)


def eval_main(argv: list[str] | None = None, prog: str = "python -m training.encoder.evaluate") -> int:
    """Evaluation command line; `prog` is how the caller names it (e.g. "helmstack eval encoder")."""
    parser = argparse.ArgumentParser(prog=prog, description="Held-out image->text retrieval of an image-text encoder.")
    parser.add_argument("--checkpoint", required=True, help="encoder training run, its encoder/ export, or an open_clip checkpoint file")
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--model", default="", help="registered open_clip model of a checkpoint file (default the project's)")
    parser.add_argument("--model-config", default="", help="JSON architecture config to register first (a user's model)")
    parser.add_argument("--tasks", help="comma-separated task ids (default: the whole suite)")
    parser.add_argument("--seeds", type=int, default=10, help="episodes per task (the split's first N seeds)")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--cameras", default="front")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--frame-stride", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--frames-cache", default="", help="keep the recorded frames in this .npz and reuse them")
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained-architecture floor")
    parser.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = EncoderEvalConfig(
            checkpoint=args.checkpoint, out=args.out, model_name=args.model, config_file=args.model_config,
            tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else (),
            n_seeds=args.seeds, split=args.split, cameras=tuple(c.strip() for c in args.cameras.split(",") if c.strip()),
            image_size=args.image_size, frame_stride=args.frame_stride, workers=args.workers, frames_cache=args.frames_cache,
            baseline=not args.no_baseline, progress=not args.no_progress,
        )
        config.record_config()  # validates cameras, workers
        report = evaluate_encoder(config, command=f"{prog} " + " ".join(shlex.quote(a) for a in argv))
    except (ValueError, EncoderLoadError, ShardError, UnknownTaskError) as exc:
        parser.error(" ".join(str(exc).split()))
    print(summary_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
