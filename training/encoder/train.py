"""Contrastive training of the in-domain image-text encoder with open_clip's model and loss.

    helmstack train encoder --data runs/encoder-demos --out runs/encoder [--max-steps 600] [--resume]

What: frames of the scripted-expert demonstrations (`training.encoder.dataset`, TRAIN seeds)
paired with two generated texts each, the scene caption and the current subgoal
(`training.encoder.captions`). The model is an open_clip architecture built by
``open_clip.create_model_and_transforms`` (default the project's `helm-vit-tiny`, optionally
initialised from a checkpoint file), trained with ``open_clip.ClipLoss`` on both pairings:
``loss = ClipLoss(image, scene caption) + subgoal_loss_weight * ClipLoss(image, subgoal)``,
one image forward pass shared by the two.

Why batches without repeated texts: ClipLoss treats every other text of the batch as a
negative. Many frames share a caption ("the red cube is on the table. the gripper is
empty"), so a batch drawn at random would contain the same text as positive and negative
at once. Batches are drawn with replacement from a seeded generator and skip frames whose
caption is already in the batch; the subgoal loss uses the first frame of each distinct
subgoal in that batch. The generator's state is checkpointed, so a resumed run draws the
very same batches.

Optimisation as open_clip's own training script does it: AdamW (beta2 0.98, eps 1e-6) with
no weight decay on gains, biases and the logit scale, linear warm-up then cosine decay, the
logit scale clamped to ln(100) after each step; plus gradient clipping and, optionally, a
random shift of a few pixels per image (a camera is never mounted twice at the same pixel).

Outputs under `out_dir`: `tb/` (TensorBoard), `metrics.jsonl`, `curves.png`,
`checkpoints/step-XXXXXXXX/` (written into a hidden folder and renamed:
`open_clip_pytorch_model.bin` in open_clip's training-script format ``{"epoch", "name",
"state_dict", "optimizer", ...}``, `open_clip_config.json`, `trainer_state.pt` with the
step and random states; all read back with weights_only=True) and, at the end, `encoder/`:
the final weights without optimizer state and the config. The export loads through
``open_clip.create_model_and_transforms(model_name, pretrained=".../encoder/open_clip_pytorch_model.bin")``,
``"local-dir:.../encoder"`` and `perception.encoder.load_encoder(out_dir)`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from perception.encoder import (
    DEFAULT_MODEL,
    EXPORT_DIR,
    OPEN_CLIP_CONFIG_FILE,
    WEIGHTS_FILE,
    EncoderLoadError,
    check_model_name,
    preprocess_cfg_of,
    preprocess_images,
    register_model_configs,
)
from runtime.config import ConfigError, load_config, require_positive_ints
from sim.tasks.suite import UnknownTaskError
from training.bc.demos import ShardError, load_manifest
from training.encoder.dataset import FrameSet, frames_from_demos, split_by_episode
from training.encoder.retrieval import recall_at, retrieval_ranks, suite_subgoals
from training.run_files import (
    check_resumable,
    checkpoint_path,
    commit_checkpoint,
    jsonable,
    list_checkpoints,
    log_record,
    read_records,
    replace_dir,
    staging_path,
    truncate_records,
    warmup_cosine,
)

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip's clamp


class CheckpointError(RuntimeError):
    """No checkpoint in a run directory can be resumed from; the message names each one."""


@dataclass(frozen=True)
class EncoderTrainConfig:
    """An encoder training run. Every field can come from YAML (`--config`) or a flag."""

    data_dir: str  # demonstrations with images (helmstack demos --cameras front --image-size 96 96)
    out_dir: str  # run directory
    model_name: str = DEFAULT_MODEL  # a registered open_clip config
    init_checkpoint: str = ""  # start from these weights (open_clip checkpoint file); "" = random init
    cameras: tuple[str, ...] = ("front",)
    tasks: tuple[str, ...] = ()  # empty = every task in the data
    frame_stride: int = 2  # keep every k-th decision (plus every caption / subgoal change)
    batch_size: int = 128  # frames per step, with distinct captions
    subgoal_loss_weight: float = 1.0
    max_steps: int = 600
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    warmup_steps: int = 50  # at most a tenth of max_steps
    grad_clip_norm: float = 1.0
    shift_px: int = 4  # random image shift (augmentation); 0 = none
    val_fraction: float = 0.1  # of each task's episodes, held out whole (validation, not the held-out seeds)
    val_max_frames: int = 1500
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    num_threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data_dir or not self.out_dir:
            raise ValueError(f"data_dir and out_dir must be paths, got {self.data_dir!r} and {self.out_dir!r}")
        require_positive_ints(self, ("frame_stride", "batch_size", "max_steps", "val_max_frames", "eval_every", "save_every", "keep_checkpoints", "num_threads"))
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        for name in ("warmup_steps", "shift_px"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "grad_clip_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("subgoal_loss_weight", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not self.cameras:
            raise ValueError("cameras must name at least one camera")


# Settings a resumed run may change: they do not alter what has been learned so far.
RESUMABLE_CHANGES = ("out_dir", "max_steps", "eval_every", "save_every", "keep_checkpoints", "num_threads", "progress", "val_max_frames")


def _no_decay(name: str, parameter: torch.Tensor) -> bool:
    """open_clip's rule: gains, biases, norms and the logit scale are not decayed."""
    return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """Which demonstrations a run was trained on: their generation settings and shard list."""
    keys = {"fingerprint": manifest["fingerprint"], "shards": [s["file"] for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


class EncoderTrainer:
    """Contrastive image-text training (see the module docstring)."""

    def __init__(self, config: EncoderTrainConfig, resume: bool = False, frames: FrameSet | None = None) -> None:
        import open_clip

        self.config = config
        self.out_dir = Path(config.out_dir)
        torch.set_num_threads(config.num_threads)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        register_model_configs()
        self.model_cfg = check_model_name(config.model_name)
        manifest = load_manifest(config.data_dir)
        self.frames = frames if frames is not None else frames_from_demos(
            config.data_dir, config.cameras, config.frame_stride, config.tasks, progress=config.progress
        )
        self.data_info = {
            "dir": str(config.data_dir),
            "fingerprint": data_fingerprint(manifest),
            "demo_config": manifest["config"],
            "frames": len(self.frames),
            "episodes": len(self.frames.episodes),
            "unique_captions": len(set(self.frames.captions)),
            "seeds": sorted({int(e["seed"]) for e in self.frames.episodes}),
        }
        self.train_rows, self.val_rows = split_by_episode(self.frames, config.val_fraction, config.seed)
        if len(self.train_rows) == 0:
            raise ValueError(f"{config.data_dir}: the training split is empty ({len(self.frames.episodes)} episodes)")
        if len(self.val_rows) > config.val_max_frames:
            pick = np.random.default_rng(config.seed).choice(len(self.val_rows), config.val_max_frames, replace=False)
            self.val_rows = np.sort(self.val_rows[pick])

        init = config.init_checkpoint or None
        if init is not None and not Path(init).is_file():
            raise EncoderLoadError(f"{init}: no such init_checkpoint file")
        try:
            self.model, _, _ = open_clip.create_model_and_transforms(config.model_name, pretrained=init)
        except Exception as exc:
            raise EncoderLoadError(f"{init or config.model_name}: cannot build/load open_clip model {config.model_name!r} ({exc})") from exc
        self.preprocess_cfg = preprocess_cfg_of(self.model)
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        self.loss_fn = open_clip.ClipLoss()

        # Texts: tokenised once; frames point at them by index.
        self.texts = sorted(set(self.frames.captions) | set(self.frames.subgoals))
        index = {t: i for i, t in enumerate(self.texts)}
        self.tokens = self.tokenizer(self.texts)  # (U, context)
        self._check_context(self.tokens)
        self.caption_id = torch.tensor([index[c] for c in self.frames.captions])
        self.subgoal_id = torch.tensor([index[s] for s in self.frames.subgoals])
        self.images = torch.from_numpy(np.ascontiguousarray(self.frames.images))  # (N, H, W, 3) uint8
        self.train_index = torch.from_numpy(self.train_rows)
        self.n_train_captions = len(set(self.caption_id[self.train_index].tolist()))

        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and not _no_decay(n, p)]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and _no_decay(n, p)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.command = ""  # the command line that started the run, for the record
        if resume:
            self._resume()
        logger.info(
            "encoder %s: %d train / %d val frames, %d distinct train captions, %d parameters",
            config.model_name, len(self.train_rows), len(self.val_rows), self.n_train_captions, sum(p.numel() for p in self.model.parameters()),
        )

    def _check_context(self, tokens: torch.Tensor) -> None:
        # SimpleTokenizer puts the end-of-text token last when it truncates.
        lengths = (tokens != 0).sum(dim=1)
        longest = int(lengths.max()) if len(lengths) else 0
        if longest >= tokens.shape[1]:
            cut = [t for t, n in zip(self.texts, lengths.tolist()) if n >= tokens.shape[1]]
            logger.warning("%d texts are cut at the model's context length %d, e.g. %r", len(cut), tokens.shape[1], cut[0])

    # --- batches -------------------------------------------------------------------------
    def sample_batch(self) -> torch.Tensor:
        """Rows of a batch with pairwise distinct captions (see the module docstring)."""
        cfg = self.config
        want = min(cfg.batch_size, self.n_train_captions)
        chosen: list[int] = []
        seen: set[int] = set()
        while len(chosen) < want:
            draw = self.train_index[torch.randint(len(self.train_index), (4 * cfg.batch_size,), generator=self.generator)]
            for row, cap in zip(draw.tolist(), self.caption_id[draw].tolist()):
                if cap not in seen:
                    seen.add(cap)
                    chosen.append(row)
                    if len(chosen) == want:
                        break
        return torch.tensor(chosen)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Shift each image by up to shift_px pixels (edge pixels repeated)."""
        s = self.config.shift_px
        if s == 0:
            return x
        n, _, h, w = x.shape
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=self.generator)
        return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])

    # --- steps ---------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        lr = cfg.lr * warmup_cosine(self.step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = self.sample_batch()
        start = time.perf_counter()
        x = preprocess_images(self.images[rows], self.preprocess_cfg)
        x = self._augment(x)
        image_f = self.model.encode_image(x, normalize=True)
        caption_f = self.model.encode_text(self.tokens[self.caption_id[rows]], normalize=True)
        scale = self.model.logit_scale.exp()
        caption_loss = self.loss_fn(image_f, caption_f, scale)
        # The first frame of each distinct subgoal in the batch.
        sg = self.subgoal_id[rows].tolist()
        first = sorted({s: i for i, s in reversed(list(enumerate(sg)))}.values())
        subgoal_loss = torch.zeros(())
        if cfg.subgoal_loss_weight > 0 and len(first) >= 2:
            sub = torch.tensor(first)
            subgoal_f = self.model.encode_text(self.tokens[self.subgoal_id[rows[sub]]], normalize=True)
            subgoal_loss = self.loss_fn(image_f[sub], subgoal_f, scale)
        loss = caption_loss + cfg.subgoal_loss_weight * subgoal_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        self.step += 1
        elapsed = time.perf_counter() - start
        return {
            "step": self.step,
            "losses/total": float(loss.item()),
            "losses/caption": float(caption_loss.item()),
            "losses/subgoal": float(subgoal_loss.item()),
            "charts/logit_scale": float(self.model.logit_scale.exp().item()),
            "charts/grad_norm": float(grad_norm.item()),
            "charts/lr": lr,
            "charts/batch": float(len(rows)),
            "charts/subgoal_batch": float(len(first)),
            "charts/samples_per_s": len(rows) / max(elapsed, 1e-9),
        }

    @torch.no_grad()
    def encode_frames(self, rows: np.ndarray, batch: int = 256) -> np.ndarray:
        self.model.eval()
        out = [
            self.model.encode_image(preprocess_images(self.images[torch.from_numpy(rows[i : i + batch])], self.preprocess_cfg), normalize=True)
            for i in range(0, len(rows), batch)
        ]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.model.eval()
        return self.model.encode_text(self.tokenizer(texts), normalize=True).numpy()

    def evaluate(self) -> dict[str, float]:
        """Validation retrieval recall (episodes of TRAIN seeds held out of training); {} without a split."""
        if len(self.val_rows) == 0:
            return {}
        val = self.frames.subset(self.val_rows)
        ranks, _ = retrieval_ranks(
            self.encode_frames(self.val_rows), val.captions, val.subgoals, val.task_ids, self.encode_texts, suite_subgoals(sorted(set(self.frames.task_ids)))
        )
        out: dict[str, float] = {"step": self.step}
        for kind, r in ranks.items():
            out[f"val/{kind}_r1"] = recall_at(r, 1)
            out[f"val/{kind}_r5"] = recall_at(r, 5)
        return out

    # --- checkpoints ---------------------------------------------------------------------
    def _open_clip_config(self) -> dict[str, Any]:
        cfg = dict(self.preprocess_cfg)
        cfg["size"] = list(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
        return {"model_name": self.config.model_name, "model_cfg": self.model_cfg, "preprocess_cfg": jsonable(cfg)}

    def _weights(self, with_optimizer: bool) -> dict[str, Any]:
        """open_clip's training-script checkpoint dict (plus the step and model name)."""
        n_train = max(1, len(self.train_rows))
        checkpoint = {
            "epoch": int(self.step * self.config.batch_size // n_train),
            "step": self.step,
            "name": self.out_dir.name,
            "model_name": self.config.model_name,
            "state_dict": self.model.state_dict(),
        }
        if with_optimizer:
            checkpoint["optimizer"] = self.optimizer.state_dict()
        return checkpoint

    def _training_info(self, val: dict[str, float] | None) -> dict[str, Any]:
        return {"train_config": asdict(self.config), "step": self.step, "val": val or {}, "data": self.data_info, "command": self.command}

    def _write_export(self, directory: Path, with_optimizer: bool, val: dict[str, float] | None) -> None:
        torch.save(self._weights(with_optimizer), directory / WEIGHTS_FILE)
        (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(self._open_clip_config(), indent=2))
        (directory / "training.json").write_text(json.dumps(self._training_info(val), indent=2))

    def save_checkpoint(self, val: dict[str, float] | None = None) -> Path:
        """Write checkpoints/step-XXXXXXXX atomically, then prune to keep_checkpoints."""
        target = checkpoint_path(self.out_dir, self.step)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(target)
        staging.mkdir()
        self._write_export(staging, with_optimizer=True, val=val)
        torch.save({"step": self.step, "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}, staging / STATE_FILE)
        commit_checkpoint(staging, target, self.out_dir, self.config.keep_checkpoints)
        logger.info("saved checkpoint %s", target)
        return target

    def export(self, val: dict[str, float] | None = None) -> Path:
        """The final weights (no optimizer state) and config as `out_dir/encoder/`."""
        target = self.out_dir / EXPORT_DIR
        staging = staging_path(target)
        staging.mkdir(parents=True)
        self._write_export(staging, with_optimizer=False, val=val)
        replace_dir(staging, target)
        return target

    def _resume(self) -> None:
        refused = []
        for directory in reversed(list_checkpoints(self.out_dir)):
            try:
                weights = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
                state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
                info = json.loads((directory / "training.json").read_text())
                if not isinstance(weights, dict) or "state_dict" not in weights or "optimizer" not in weights:
                    raise ValueError("not a training checkpoint (no state_dict / optimizer)")
            except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
                refused.append(f"{directory.name}: {exc}")
                logger.warning("not resuming from %s: %s", directory, exc)
                continue
            check_resumable(directory, self.config, info.get("train_config", {}), RESUMABLE_CHANGES,
                            self.data_info["fingerprint"], info.get("data", {}).get("fingerprint"))
            self.model.load_state_dict(weights["state_dict"])
            self.optimizer.load_state_dict(weights["optimizer"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            self.step = int(state["step"])
            logger.info("resumed from %s (step %d)", directory, self.step)
            return
        if refused:
            raise CheckpointError(f"{self.out_dir}: no checkpoint to resume from loads: " + "; ".join(refused))
        logger.info("no checkpoint in %s: starting from scratch", self.out_dir)

    # --- the loop ------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to max_steps (or stop at `until_step`, checkpointed so that a `resume=True`
        trainer continues exactly); exports `encoder/` when max_steps is reached."""
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config
        stop = cfg.max_steps if until_step is None else min(until_step, cfg.max_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / METRICS_FILE
        truncate_records(metrics_path, self.step)
        writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step + 1 if self.step else None)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"encoder {cfg.model_name}", disable=not cfg.progress, dynamic_ncols=True)
        last: dict[str, float] = {}
        val: dict[str, float] = {}
        start = time.perf_counter()
        try:
            with metrics_path.open("a") as metrics_file:
                while self.step < stop:
                    last = self.train_step()
                    log_record(writer, metrics_file, last)
                    bar.update(1)
                    if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                        val = self.evaluate()
                        if val:
                            log_record(writer, metrics_file, val)
                    bar.set_postfix(loss=f"{last['losses/total']:.3f}", val_r1=f"{val.get('val/caption_r1', math.nan):.3f}")
                    if self.step % cfg.save_every == 0 or self.step == stop:
                        self.save_checkpoint(val)
        finally:
            bar.close()
            writer.close()
        export = self.export(val) if self.step == cfg.max_steps else None
        plot = plot_curves(read_records(metrics_path), self.out_dir / PLOT_FILE)
        checkpoints = list_checkpoints(self.out_dir)
        return {
            **last,
            **val,
            "step": self.step,
            "wall_s": time.perf_counter() - start,
            "plot": str(plot) if plot else None,
            "checkpoint": str(checkpoints[-1]) if checkpoints else None,
            "encoder": str(export) if export else None,
        }


def plot_curves(records: list[dict[str, float]], path: Path) -> Path | None:
    """Losses, validation recall@1 and the learning rate against step."""
    train = [(r["step"], r["losses/caption"], r["losses/subgoal"]) for r in records if "losses/caption" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = np.array(train)
    window = max(1, len(t) // 50)
    for col, label in ((1, "caption"), (2, "subgoal")):
        axes[0].plot(t[:, 0], t[:, col], alpha=0.25)
        if window > 1:
            axes[0].plot(t[window - 1 :, 0], np.convolve(t[:, col], np.ones(window) / window, mode="valid"), label=f"{label} (mean of {window})")
        else:
            axes[0].plot(t[:, 0], t[:, col], label=label)
    axes[0].set(xlabel="step", ylabel="ClipLoss", title="training loss")
    axes[0].legend()
    val = [r for r in records if "val/caption_r1" in r]
    for key in ("caption_r1", "caption_in_task_r1", "subgoal_r1", "subgoal_in_task_r1"):
        if val:
            axes[1].plot([r["step"] for r in val], [r[f"val/{key}"] for r in val], "o-", label=key)
    axes[1].set(xlabel="step", ylabel="recall@1", title="validation image->text retrieval", ylim=(0, 1))
    if val:
        axes[1].legend()
    lrs = [(r["step"], r["charts/lr"]) for r in records if "charts/lr" in r]
    axes[2].plot(*np.array(lrs).T)
    axes[2].set(xlabel="step", ylabel="lr", title="learning rate")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# -- command line -------------------------------------------------------------------------
def train_main(argv: list[str] | None = None, prog: str = "python -m training.encoder.train") -> int:
    """Training command line; `prog` is how the caller names it (e.g. "helmstack train encoder")."""
    parser = argparse.ArgumentParser(prog=prog, description="Contrastive (open_clip ClipLoss) training of the in-domain image-text encoder.")
    parser.add_argument("--data", required=True, help="demonstrations with images (helmstack demos --cameras front --image-size 96 96)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--config", help="YAML with EncoderTrainConfig fields (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--model", dest="model_name", help=f"registered open_clip model (default {DEFAULT_MODEL})")
    parser.add_argument("--init-checkpoint", help="start from these open_clip weights")
    parser.add_argument("--cameras", help="comma-separated cameras (default front)")
    parser.add_argument("--tasks", help="comma-separated task ids (default all in the data)")
    for name, kind in (("frame-stride", int), ("batch-size", int), ("max-steps", int), ("lr", float), ("weight-decay", float),
                       ("warmup-steps", int), ("subgoal-loss-weight", float), ("shift-px", int), ("val-fraction", float),
                       ("eval-every", int), ("save-every", int), ("seed", int), ("num-threads", int)):
        parser.add_argument(f"--{name}", type=kind)
    parser.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"data_dir": args.data, "out_dir": args.out}
    for name in ("model_name", "init_checkpoint", "frame_stride", "batch_size", "max_steps", "lr", "weight_decay", "warmup_steps",
                 "subgoal_loss_weight", "shift_px", "val_fraction", "eval_every", "save_every", "seed", "num_threads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for name in ("cameras", "tasks"):
        if getattr(args, name):
            overrides[name] = [t.strip() for t in getattr(args, name).split(",") if t.strip()]
    if args.no_progress:
        overrides["progress"] = False
    try:
        config = load_config(EncoderTrainConfig, args.config, overrides, root="encoder")
        trainer = EncoderTrainer(config, resume=args.resume)
    except (ConfigError, ValueError, CheckpointError, EncoderLoadError, ShardError, UnknownTaskError) as exc:
        parser.error(" ".join(str(exc).split()))
    trainer.command = f"{prog} " + " ".join(shlex.quote(a) for a in argv)
    print(json.dumps(trainer.train()))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
