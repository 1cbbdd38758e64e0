"""Train HELM's State Verifier on labelled rollouts.

    helmstack train verifier --data runs/sv-data-train --encoder runs/encoder --out runs/sv
    helmstack train verifier --data runs/sv-data-train --no-memory --out runs/sv-nomem

Binary cross-entropy (positives re-weighted by the class ratio) with AdamW and a cosine
schedule; whole episodes are held out for validation. Every `eval_every` steps the model
is scored on validation (AUROC, F1) and checkpointed (training.run_files layout: a killed
run resumes with --resume, same sample stream); the checkpoint with the best validation
AUROC is written to `<out>/best` as a verifier checkpoint with its operating threshold,
the F1-optimal one on validation. tqdm progress, TensorBoard (`<out>/tb`), metrics.jsonl
and a curves PNG.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from runtime.state_verifier import (
    StateVerifierNet,
    VerifierCheckpoint,
    VerifierFeatureConfig,
    VerifierModelConfig,
    VerifierNormalization,
    save_verifier,
)
from training.run_files import (
    checkpoint_path, commit_checkpoint, list_checkpoints, log_record, read_records, staging_path, truncate_records,
)
from training.verifier.dataset import Examples, build_examples, load_episodes, split_by_episode
from training.verifier.metrics import at_threshold, auroc, best_f1_threshold

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifierTrainConfig:
    data_dir: str
    out_dir: str
    encoder: str = ""  # open_clip checkpoint for memory keys (required with use_memory)
    use_memory: bool = True
    memory_k: int = 6
    hidden_dim: int = 256
    memory_dim: int = 128
    dropout: float = 0.1
    batch_size: int = 256
    max_steps: int = 3000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    eval_every: int = 250
    seed: int = 0
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.use_memory and not self.encoder:
            raise ValueError("use_memory needs --encoder (the image-text encoder that keys the memory)")
        for name in ("batch_size", "max_steps", "eval_every", "threads", "memory_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")


def load_image_text_encoder(path: str) -> Any:
    from perception.encoder import load_encoder

    return load_encoder(path)


class VerifierTrainer:
    def __init__(self, config: VerifierTrainConfig, resume: bool = False) -> None:
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.config = config
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.features = VerifierFeatureConfig(memory_k=config.memory_k)
        encoder = load_image_text_encoder(config.encoder) if config.use_memory else None
        examples = build_examples(load_episodes(config.data_dir), self.features, encoder, progress=config.progress)
        self.train_set, self.val_set = split_by_episode(examples, config.val_fraction, config.seed)
        self.norm = VerifierNormalization.fit(self.train_set.observation, self.train_set.chunk, self.train_set.keyframes,
                                              self.train_set.valid)
        self.model_config = VerifierModelConfig(
            observation_dim=examples.observation.shape[1], chunk_dim=examples.chunk.shape[1],
            keyframe_dim=examples.keyframes.shape[2], use_memory=config.use_memory, hidden_dim=config.hidden_dim,
            memory_dim=config.memory_dim, dropout=config.dropout)
        self.net = StateVerifierNet(self.model_config)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        positives = max(1, int(self.train_set.label.sum()))
        self.pos_weight = torch.tensor((len(self.train_set) - positives) / positives, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.best_auroc = -1.0
        if resume:
            self._resume()

    # -- tensors ------------------------------------------------------------------------------
    def _inputs(self, data: Examples, rows: np.ndarray | slice) -> tuple[torch.Tensor, ...]:
        n = self.norm
        o = (torch.from_numpy(data.observation[rows]) - n.observation_mean) / n.observation_std
        c = (torch.from_numpy(data.chunk[rows]) - n.chunk_mean) / n.chunk_std
        k = (torch.from_numpy(data.keyframes[rows]) - n.keyframe_mean) / n.keyframe_std
        return o, c, k, torch.from_numpy(data.valid[rows])

    def scores(self, data: Examples) -> np.ndarray:
        self.net.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(data), 2048):
                rows = slice(start, start + 2048)
                out.append(torch.sigmoid(self.net(*self._inputs(data, rows))).double().numpy())
        self.net.train()
        return np.concatenate(out)

    def lr_at(self, step: int) -> float:
        warmup = min(100, self.config.max_steps // 10)
        if step < warmup:
            return self.config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.config.max_steps - warmup)
        return self.config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def train_step(self) -> float:
        rows = torch.randint(len(self.train_set), (self.config.batch_size,), generator=self.generator).numpy()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        logits = self.net(*self._inputs(self.train_set, rows))
        target = torch.from_numpy(self.train_set.label[rows]).float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def validate(self) -> dict[str, float]:
        s = self.scores(self.val_set)
        threshold = best_f1_threshold(self.val_set.label, s)
        at = at_threshold(self.val_set.label, s, threshold)
        return {"val/auroc": auroc(self.val_set.label, s), "val/f1": at["f1"], "val/precision": at["precision"],
                "val/threshold": threshold}

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        target = checkpoint_path(self.out, self.step)
        staging = staging_path(target)
        staging.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(staging / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps({"step": self.step, "best_auroc": self.best_auroc}))
        commit_checkpoint(staging, target, self.out, keep=2)

    def _resume(self) -> None:
        found = list_checkpoints(self.out)
        if not found:
            logger.warning("no checkpoint in %s: starting from scratch", self.out)
            return
        last = found[-1]
        self.net.load_state_dict(load_file(str(last / "model.safetensors")))
        state = torch.load(last / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        info = json.loads((last / "state.json").read_text())
        self.step, self.best_auroc = int(info["step"]), float(info["best_auroc"])
        truncate_records(self.out / "metrics.jsonl", self.step)

    def save_best(self, val: dict[str, float]) -> None:
        info = {"train_config": asdict(self.config), "step": self.step, "validation": val,
                "train_samples": len(self.train_set), "val_samples": len(self.val_set),
                "train_positive_rate": float(self.train_set.label.mean()), "val_positive_rate": float(self.val_set.label.mean())}
        save_verifier(self.out / "best", VerifierCheckpoint(self.features, self.model_config, val["val/threshold"],
                                                            self.net, self.norm, info))

    def train(self) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config
        writer = SummaryWriter(str(self.out / "tb"))
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="state verifier", disable=not cfg.progress, dynamic_ncols=True)
        start = time.perf_counter()
        losses: list[float] = []
        with open(self.out / "metrics.jsonl", "a") as metrics:
            while self.step < cfg.max_steps:
                losses.append(self.train_step())
                bar.update()
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    val = self.validate()
                    record = {"step": self.step, "train/loss": float(np.mean(losses)), "train/lr": self.lr_at(self.step), **val}
                    losses = []
                    log_record(writer, metrics, record)
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}", auroc=f"{val['val/auroc']:.3f}")
                    # AUROC is undefined on a one-class validation split: count it as chance.
                    score = val["val/auroc"] if math.isfinite(val["val/auroc"]) else 0.5
                    if score > self.best_auroc or not (self.out / "best").exists():
                        self.best_auroc = max(score, self.best_auroc)
                        self.save_best(val)
                    self.save_checkpoint()
        bar.close()
        writer.close()
        plot_curves(read_records(self.out / "metrics.jsonl"), self.out / "curves.png")
        return {"best_val_auroc": self.best_auroc, "steps": self.step, "wall_s": time.perf_counter() - start}


def plot_curves(records: list[dict[str, float]], path: Path) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [r["train/loss"] for r in records])
    axes[0].set(xlabel="step", ylabel="weighted BCE", title="training loss")
    axes[1].plot(steps, [r["val/auroc"] for r in records], label="AUROC")
    axes[1].plot(steps, [r["val/f1"] for r in records], label="F1 (best threshold)")
    axes[1].set(xlabel="step", title="validation", ylim=(0, 1))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, prog: str = "python -m training.verifier.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="rollouts from `helmstack verifier-data`")
    parser.add_argument("--out", required=True)
    parser.add_argument("--encoder", default="", help="open_clip checkpoint keying the memory (runs/encoder)")
    parser.add_argument("--no-memory", action="store_true", help="the ablation: no retrieved keyframes")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250, help="validation + checkpoint interval (steps)")
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = VerifierTrainConfig(data_dir=a.data, out_dir=a.out, encoder=a.encoder, use_memory=not a.no_memory,
                                     max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                                     eval_every=a.eval_every, hidden_dim=a.hidden_dim, dropout=a.dropout,
                                     progress=not a.no_progress)
        trainer = VerifierTrainer(config, resume=a.resume)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    result = trainer.train()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
