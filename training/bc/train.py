"""Train the behaviour-cloning base policy, and measure it per subgoal on held-out states.

    python -m training.bc.train --data data/bc_demos --out runs/bc [--seed 0] [--max-steps 30000] [--resume]
    python -m training.bc.train eval --checkpoint runs/bc --out runs/bc_eval.json [--seeds 20] [--workers 2]

Training (`BCTrainer`): the demonstrations are featurised (`training.bc.dataset`), split by
episode, normalised with the training split's statistics, and the residual MLP
(`training.bc.model.BCNet`) regresses the expert's normalised action chunk with an L1 loss
(robust to the occasional multi-modal label: L1 picks a median, L2 would average two
different recoveries into one that is neither), AdamW, linear warm-up then cosine decay, and
gradient clipping. Batches are drawn with replacement from a seeded generator whose state is
checkpointed, so a resumed run continues the very same sample stream. Different `seed`s give
independently initialised members of an ensemble (HELM's ensemble baseline): train each into
its own `--out`. `--history H` trains the longer-context variant (HELM's "base policy +
longer context" baseline): each sample is also the window of its episode's last H decisions
(`training.bc.dataset.history_windows`), gathered per batch from the normalised features.

Outputs under `out_dir`: `tb/` (TensorBoard: `losses/*`, `charts/*`, `val/*`),
`metrics.jsonl`, `curves.png`, `checkpoints/step-XXXXXXXX/` (the policy files of
`training.bc.model` plus `optimizer.pt` and `trainer_state.pt`, both read back with
`torch.load(weights_only=True)`) and `best/` (the policy files at the lowest validation
loss; what `policies.bc.BCPolicy(out_dir)` loads). Checkpoint directories are staged under a
hidden name and renamed into place, so a directory with a final name is complete; resuming
takes the newest one that loads and names any it refuses.

Evaluation (`evaluate_policy`), the number the issue asks for: per-subgoal success on
held-out initial states. For each task and held-out seed the scripted expert runs the task;
at the start of every subgoal (the state the expert reaches there) the scene is saved, the
policy gets control for that one subgoal with a step limit, and the scene is restored for
the expert to go on. A policy with history (`observe`, e.g. BCPolicy's motion features) is
first shown the expert's last observations (as many as its `history_length`, else the last
one), as a demonstration would have shown them. So each
subgoal is tested from a realistic state, independently of the policy's earlier mistakes; the full long-horizon success of the policy alone is measured
too, from the same seeds. Runs in a pool of worker processes like `sim.expert_eval`, and
writes JSON with Wilson intervals and a markdown table.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from tqdm.auto import tqdm

from policies.base import Observation, Policy
from policies.bc import BCPolicy
from runtime.config import ConfigError, load_config, require_positive_ints
from runtime.stats import wilson_interval
from sim.expert import ExpertConfig, ScriptedExpert
from sim.panda import PandaKinematics
from sim.rollout import SubgoalResult, run_episode
from sim.scene import TabletopScene
from sim.sensors.camera import Camera
from sim.tasks.predicates import evaluate, parse_predicate
from sim.tasks.spec import TaskSpec
from sim.tasks.suite import SPLITS, get_task, initial_state_seeds, load_suite
from sim.world_state import WorldState
from training.bc.dataset import DemoDataset, history_windows, load_demos, split_by_episode
from training.bc.demos import load_manifest, make_cameras, render_cameras
from training.bc.model import (
    BCModelConfig,
    BCNet,
    CheckpointError,
    FeatureConfig,
    NormalizationStats,
    TextEncoder,
    gather_windows,
    load_checkpoint,
    pad_frames,
    write_policy_files,
)
from training.run_files import (
    check_resumable,
    checkpoint_path,
    commit_checkpoint,
    list_checkpoints,
    log_record,
    read_records,
    replace_dir,
    staging_path,
    truncate_records,
    warmup_cosine,
)

logger = logging.getLogger(__name__)

BEST_DIR = "best"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
# The bar for the base policy: each single subgoal succeeds this often on held-out states.
SUBGOAL_SUCCESS_TARGET = 0.8


@dataclass(frozen=True)
class BCTrainConfig:
    """Behaviour-cloning run. Every field can come from YAML (`--config`) or a flag."""

    data_dir: str  # demonstrations written by training.bc.demos
    out_dir: str  # run directory
    tasks: tuple[str, ...] = ()  # train on these tasks' demos only (empty = all)
    use_object_state: bool = True  # privileged object state features
    use_motion: bool = True  # hand/gripper velocity since the previous decision
    max_entities: int = 6  # entity slots (predicate arguments + other objects)
    cameras: tuple[str, ...] = ()  # image embeddings of these cameras as features
    image_embeddings: str = ""  # embedding set under data_dir/embeddings/ (with cameras)
    image_embedding_dim: int = 0
    history: int = 0  # temporal window of the last H decisions (0 = the current one only)
    history_width: int = 32  # temporal encoder channels (with history)
    history_out_dim: int = 128  # encoded window size (with history)
    hidden_dim: int = 512
    n_blocks: int = 3
    dropout: float = 0.0
    batch_size: int = 256
    max_steps: int = 30000
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 1e-4
    warmup_steps: int = 500  # at most a tenth of max_steps is spent warming up
    grad_clip_norm: float = 1.0
    val_fraction: float = 0.1  # of each task's episodes, held out whole
    eval_every: int = 500
    save_every: int = 2000
    keep_checkpoints: int = 2
    seed: int = 0  # init, split and sampling; vary it for ensemble members
    num_threads: int = 1  # torch intra-op threads (one per process is fastest on a shared box)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data_dir or not self.out_dir:
            raise ValueError(f"data_dir and out_dir must be paths, got {self.data_dir!r} and {self.out_dir!r}")
        require_positive_ints(self, ("batch_size", "max_steps", "eval_every", "save_every", "keep_checkpoints", "num_threads", "history_width", "history_out_dim"))
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("lr", "grad_clip_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.cameras and not self.image_embeddings:
            raise ValueError("image_embeddings must name an embedding set (training.bc.dataset.embed_demo_images) when cameras are used")
        self.feature_config()  # FeatureConfig validates the feature fields

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(
            use_object_state=self.use_object_state,
            use_motion=self.use_motion,
            max_entities=self.max_entities,
            cameras=self.cameras,
            image_embedding_dim=self.image_embedding_dim,
            history=self.history,
        )


# Settings a resumed run may change: they do not alter what has been learned so far.
RESUMABLE_CHANGES = ("out_dir", "max_steps", "eval_every", "save_every", "keep_checkpoints", "num_threads", "progress")


class BCTrainer:
    """Behaviour cloning of the scripted expert's chunks (see the module docstring)."""

    def __init__(self, config: BCTrainConfig, resume: bool = False, text_encoder: TextEncoder | None = None) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        torch.set_num_threads(config.num_threads)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        manifest = load_manifest(config.data_dir)
        self.data: DemoDataset = load_demos(
            config.data_dir, config.feature_config(), tasks=config.tasks, embeddings=config.image_embeddings,
            text_encoder=text_encoder, progress=config.progress,
        )
        self.data_info = {
            "dir": str(config.data_dir),
            "fingerprint": manifest["fingerprint"],
            "episodes": len(self.data.episodes),
            "decisions": len(self.data),
            "image_size": [manifest["config"]["image_width"], manifest["config"]["image_height"]],
        }
        self.train_rows, self.val_rows = split_by_episode(self.data, config.val_fraction, config.seed)
        if len(self.train_rows) == 0:
            raise ValueError(f"{config.data_dir}: the training split is empty ({len(self.data.episodes)} episodes)")
        self.model_config = BCModelConfig(
            input_dim=self.data.feature_config.dim, chunk_steps=self.data.action_config.chunk_steps,
            hidden_dim=config.hidden_dim, n_blocks=config.n_blocks, dropout=config.dropout,
            history=config.history, history_width=config.history_width, history_out_dim=config.history_out_dim,
        )
        # (N, H) rows of each decision's window within its episode; None without history.
        self.windows = torch.from_numpy(history_windows(self.data.episode, config.history)) if config.history else None
        self.net = BCNet(self.model_config)
        decay = [p for p in self.net.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.net.parameters() if p.ndim < 2]  # biases and norms are not shrunk
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.best_val = math.inf
        self.stats = NormalizationStats.fit(self.data.features[self.train_rows], self.data.actions[self.train_rows])
        if resume:
            self._resume()
        self._normalise()
        logger.info(
            "BC: %d train / %d val decisions, %d features, chunk %d, %d parameters",
            len(self.train_rows), len(self.val_rows), self.model_config.input_dim, self.model_config.chunk_steps,
            sum(p.numel() for p in self.net.parameters()),
        )

    def _normalise(self) -> None:
        s = self.stats
        self.x = (torch.from_numpy(self.data.features) - s.feature_mean) / s.feature_std  # (N, F)
        self.y = (torch.from_numpy(self.data.actions) - s.action_mean) / s.action_std  # (N, K, 9)
        self.train_index = torch.from_numpy(self.train_rows)
        self.val_index = torch.from_numpy(self.val_rows)
        self.x_padded = pad_frames(self.x) if self.windows is not None else None  # (N + 1, F)

    def predict(self, rows: torch.Tensor) -> torch.Tensor:
        """The network's normalised chunks (B, K, 9) for dataset rows (B,), with their windows."""
        if self.windows is None:
            return self.net(self.x[rows])
        frames, mask = gather_windows(self.x_padded, self.windows[rows])
        return self.net(self.x[rows], frames, mask)

    # --- checkpoints ---------------------------------------------------------------------
    def _training_info(self, val: dict[str, float] | None) -> dict[str, Any]:
        return {
            "train_config": asdict(self.config),
            "step": self.step,
            "val": val or {},
            "data": self.data_info,
            "split": {"train_decisions": int(len(self.train_rows)), "val_decisions": int(len(self.val_rows))},
        }

    def save_checkpoint(self, val: dict[str, float] | None = None) -> Path:
        """Write checkpoints/step-XXXXXXXX atomically, then prune to keep_checkpoints."""
        target = checkpoint_path(self.out_dir, self.step)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(target)
        staging.mkdir()
        write_policy_files(staging, self.net, self.stats, self.data.feature_config, self.data.action_config, self._training_info(val))
        torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
        state = {
            "step": self.step,
            "best_val": self.best_val,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, staging / STATE_FILE)
        commit_checkpoint(staging, target, self.out_dir, self.config.keep_checkpoints)
        logger.info("saved checkpoint %s", target)
        return target

    def _save_best(self, val: dict[str, float]) -> None:
        staging = staging_path(self.out_dir / BEST_DIR)
        staging.mkdir(parents=True)
        write_policy_files(staging, self.net, self.stats, self.data.feature_config, self.data.action_config, self._training_info(val))
        replace_dir(staging, self.out_dir / BEST_DIR)

    def _resume(self) -> None:
        refused = []
        for directory in reversed(list_checkpoints(self.out_dir)):
            try:
                checkpoint = load_checkpoint(directory)
                optimizer_state = torch.load(directory / OPTIMIZER_FILE, weights_only=True)
                state = torch.load(directory / STATE_FILE, weights_only=True)
            except (CheckpointError, OSError, RuntimeError, EOFError, ValueError) as exc:
                refused.append(f"{directory.name}: {exc}")
                logger.warning("not resuming from %s: %s", directory, exc)
                continue
            check_resumable(directory, self.config, checkpoint.training.get("train_config", {}), RESUMABLE_CHANGES,
                            self.data_info["fingerprint"], checkpoint.training.get("data", {}).get("fingerprint"))
            self.net.load_state_dict(checkpoint.net.state_dict())
            self.stats = checkpoint.stats
            self.optimizer.load_state_dict(optimizer_state)
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            self.step = int(state["step"])
            self.best_val = float(state["best_val"])
            logger.info("resumed from %s (step %d)", directory, self.step)
            return
        if refused:
            raise CheckpointError(f"{self.out_dir}: no checkpoint to resume from loads: " + "; ".join(refused))
        logger.info("no checkpoint in %s: starting from scratch", self.out_dir)

    # --- steps ---------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(self.step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        pick = torch.randint(len(self.train_index), (cfg.batch_size,), generator=self.generator)
        rows = self.train_index[pick]
        start = time.perf_counter()
        pred = self.predict(rows)  # (B, K, 9)
        loss = torch.nn.functional.l1_loss(pred, self.y[rows])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip_norm)
        self.optimizer.step()
        self.step += 1
        elapsed = time.perf_counter() - start
        return {
            "step": self.step,
            "losses/train_l1": float(loss.item()),
            "charts/grad_norm": float(grad_norm.item()),
            "charts/lr": self.optimizer.param_groups[0]["lr"],
            "charts/samples_per_s": cfg.batch_size / max(elapsed, 1e-9),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation L1 (normalised, the training loss) and errors in physical units: arm
        joint targets (rad) and finger targets (m), per predicate too; {} without a val split."""
        if len(self.val_index) == 0:
            return {}
        self.net.eval()
        preds = torch.cat([self.predict(self.val_index[i : i + 4096]) for i in range(0, len(self.val_index), 4096)])  # (V, K, 9)
        target = self.y[self.val_index]
        l1 = (preds - target).abs()  # (V, K, 9) normalised
        physical = l1 * self.stats.action_std  # (V, K, 9) rad / m
        out = {
            "step": self.step,
            "val/l1": float(l1.mean()),
            "val/arm_error_rad": float(physical[..., :7].mean()),
            "val/finger_error_m": float(physical[..., 7:].mean()),
        }
        predicate = torch.from_numpy(self.data.predicate[self.val_rows])
        for i, name in enumerate(self.data.feature_config.predicates):
            mask = predicate == i
            if bool(mask.any()):
                out[f"val/l1_{name}"] = float(l1[mask].mean())
        return out

    # --- the loop ------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to max_steps (or stop early at `until_step`, checkpointed so that a
        `resume=True` trainer continues exactly); returns the last metrics and paths."""
        # TensorBoard loads in about a second; only a training run pays for it.
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config
        stop = cfg.max_steps if until_step is None else min(until_step, cfg.max_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / METRICS_FILE
        truncate_records(metrics_path, self.step)
        # purge_step hides TensorBoard events a killed run wrote after its last checkpoint.
        writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step + 1 if self.step else None)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"bc seed {cfg.seed}", disable=not cfg.progress, dynamic_ncols=True)
        last: dict[str, float] = {}
        val: dict[str, float] = {}
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
                            if val["val/l1"] < self.best_val:
                                self.best_val = val["val/l1"]
                                self._save_best(val)
                    bar.set_postfix(l1=f"{last['losses/train_l1']:.4f}", val=f"{val.get('val/l1', math.nan):.4f}")
                    if self.step % cfg.save_every == 0 or self.step == stop:
                        self.save_checkpoint(val)
        finally:
            bar.close()
            writer.close()
        if not (self.out_dir / BEST_DIR).exists() and self.step == cfg.max_steps:
            # No validation split: the final weights are the policy.
            self._save_best(val)
        plot = plot_curves(read_metrics(metrics_path), self.out_dir / PLOT_FILE)
        checkpoints = list_checkpoints(self.out_dir)
        return {
            **last,
            **val,
            "step": self.step,
            "best_val_l1": self.best_val,
            "plot": str(plot) if plot else None,
            "checkpoint": str(checkpoints[-1]) if checkpoints else None,
            "policy": str(self.out_dir / BEST_DIR) if (self.out_dir / BEST_DIR).exists() else None,
        }


def read_metrics(path: Path) -> list[dict[str, float]]:
    return read_records(path)


def plot_curves(records: list[dict[str, float]], path: Path) -> Path | None:
    """Training and validation L1, validation arm error and learning rate against step."""
    train = [(r["step"], r["losses/train_l1"]) for r in records if "losses/train_l1" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [(r["step"], r["val/l1"], r["val/arm_error_rad"]) for r in records if "val/l1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps, losses = np.array(train).T
    axes[0].plot(steps, losses, alpha=0.3, label="train (per step)")
    window = len(losses) // 50
    if window > 1:
        axes[0].plot(steps[window - 1 :], np.convolve(losses, np.ones(window) / window, mode="valid"), label=f"train (mean of {window})")
    if val:
        v = np.array(val)
        axes[0].plot(v[:, 0], v[:, 1], "o-", label="validation")
        axes[1].plot(v[:, 0], v[:, 2], "o-")
    axes[0].set(xlabel="step", ylabel="L1 (normalised)", yscale="log", title="loss")
    axes[0].legend()
    axes[1].set(xlabel="step", ylabel="rad", title="validation arm-target error")
    lrs = [(r["step"], r["charts/lr"]) for r in records if "charts/lr" in r]
    axes[2].plot(*np.array(lrs).T)
    axes[2].set(xlabel="step", ylabel="lr", title="learning rate")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# =========================================================================================
# Held-out evaluation: per-subgoal success from the expert's states, and long-horizon success
# =========================================================================================
@dataclass(frozen=True)
class SubgoalEvalConfig:
    """Per-subgoal and long-horizon evaluation of a policy."""

    checkpoint: str  # BC checkpoint or run directory (unused when evaluate_policy gets a policy_factory)
    out: str  # JSON report path
    tasks: tuple[str, ...] = ()  # empty = the whole suite
    n_seeds: int = 20  # per task, the split's first seeds
    split: str = "heldout"
    workers: int = 2
    max_steps_per_subgoal: int = 0  # per-subgoal handovers; 0 = each task's own limit (whole-task runs always use it)
    long_horizon: bool = True  # also run the policy alone through the whole task
    execute_steps: int = 0  # steps of each predicted chunk to execute (0 = all)
    image_width: int = 128  # camera images for image policies, as in the demos
    image_height: int = 128
    physics_hz: int = 240
    control_hz: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.n_seeds <= 0:
            raise ValueError(f"n_seeds must be > 0, got {self.n_seeds}")
        if not 1 <= self.workers <= (os.cpu_count() or 1):
            raise ValueError(f"workers must be in [1, {os.cpu_count() or 1}], got {self.workers}")
        if self.max_steps_per_subgoal < 0 or self.execute_steps < 0:
            raise ValueError(f"max_steps_per_subgoal and execute_steps must be >= 0, got {self.max_steps_per_subgoal}, {self.execute_steps}")


class PolicyActor:
    """A `policies.base.Policy` behind the episode loop's `act` interface: builds the
    Observation (world state only for privileged policies, camera images it reads)."""

    def __init__(self, policy: Policy, scene: TabletopScene, cameras: dict[str, Camera]) -> None:
        self.policy = policy
        self.scene = scene
        self.cameras = cameras
        # Policies with history take in observations without acting (BCPolicy.observe), as
        # many as their history_length (decisions they read, at least the last one).
        self.observe: Callable[[Observation], None] | None = getattr(policy, "observe", None)
        self.history_length = max(1, int(getattr(policy, "history_length", 1) or 1)) if self.observe is not None else 0

    def reset(self) -> None:
        self.policy.reset()

    def observation(self, world_state: WorldState, joint_positions: ArrayLike, task: TaskSpec, subgoal_index: int) -> Observation:
        return Observation(
            joint_positions=np.asarray(joint_positions, dtype=np.float64),
            sim_time_s=world_state.sim_time_s,
            task=task,
            subgoal_index=subgoal_index,
            world=world_state if self.policy.requires_privileged_state else None,
            images=render_cameras(self.scene, self.cameras) if self.cameras else {},
        )

    def act(self, world_state: WorldState, joint_positions: ArrayLike, task: TaskSpec, subgoal_index: int) -> NDArray[np.float64]:
        return self.policy.select_action(self.observation(world_state, joint_positions, task, subgoal_index)).positions

    def take_over(self, recent: Observation | Sequence[Observation] | None) -> None:
        """Reset, then show a policy with history the observations before it takes over, oldest
        first (the history it would have had in a demonstration, where decisions run on): the
        last `history_length` of `recent` (one Observation counts as a list of one)."""
        self.policy.reset()
        if self.observe is None or recent is None:
            return
        observations = [recent] if isinstance(recent, Observation) else list(recent)
        for obs in observations[-self.history_length :]:
            self.observe(obs)


class WitnessedExpert:
    """The scripted expert in the episode loop, keeping the observations of its latest
    decisions (as the policy under test would have seen them; as many as the policy's
    `history_length`) for `PolicyActor.take_over`."""

    def __init__(self, expert: ScriptedExpert, actor: PolicyActor) -> None:
        self.expert = expert
        self.actor = actor
        self.recent_observations: deque[Observation] = deque(maxlen=max(1, actor.history_length))

    @property
    def last_observation(self) -> Observation | None:
        return self.recent_observations[-1] if self.recent_observations else None

    def reset(self) -> None:
        self.expert.reset()
        self.recent_observations.clear()

    def act(self, world_state: WorldState, joint_positions: ArrayLike, task: TaskSpec, subgoal_index: int) -> NDArray[np.float64]:
        if self.actor.observe is not None:  # only policies with history need it (images cost a render)
            self.recent_observations.append(self.actor.observation(world_state, joint_positions, task, subgoal_index))
        return self.expert.act(world_state, joint_positions, task, subgoal_index)


def attempt_subgoal(scene: TabletopScene, task: TaskSpec, index: int, actor: PolicyActor, max_steps: int) -> dict[str, Any]:
    """Let `actor` pursue subgoal `index` from the scene's current state, with the episode
    loop's semantics (sim.rollout.run_episode): the predicate is checked after every
    control step and the attempt ends the moment it holds."""
    call = parse_predicate(task.subgoals[index].predicate)
    ws = scene.world_state()
    steps = 0
    reached = evaluate(call, ws, task.geometry)
    reason = None
    while not reached and steps < max_steps:
        try:
            chunk = actor.act(ws, ws.joint_positions, task, index)
        except (ValueError, RuntimeError) as exc:  # FeatureError, NonFiniteActionError, ...
            reason = f"policy error: {exc}"
            break
        for row in chunk:
            scene.apply_joint_targets(row)
            scene.step_control()
            steps += 1
            ws = scene.world_state()
            reached = evaluate(call, ws, task.geometry)
            if reached or steps >= max_steps:
                break
    if not reached and reason is None:
        reason = f"not reached within {max_steps} steps"
    return {"success": bool(reached), "steps": steps, "reason": reason}


def evaluate_episode(
    scene: TabletopScene,
    expert: ScriptedExpert,
    policy: Policy,
    task: TaskSpec,
    seed: int,
    cameras: dict[str, Camera],
    max_steps_per_subgoal: int,
    long_horizon: bool,
) -> dict[str, Any]:
    """One (task, seed): per-subgoal handovers along the expert's episode, then the
    policy's own long-horizon episode."""
    actor = PolicyActor(policy, scene, cameras)
    witness = WitnessedExpert(expert, actor)
    limit = max_steps_per_subgoal or task.max_steps_per_subgoal
    results: list[dict[str, Any]] = [
        {"index": k, "name": sg.name, "predicate": sg.predicate, "status": "not_reached_by_expert", "steps": 0, "reason": None}
        for k, sg in enumerate(task.subgoals)
    ]

    def handover(k: int) -> None:
        """The scene is at the start of subgoal k: let the policy try it, then put it back."""
        handle = scene.save_state()
        try:
            if evaluate(parse_predicate(task.subgoals[k].predicate), scene.world_state(), task.geometry):
                results[k].update(status="already_satisfied")
                return
            actor.take_over(list(witness.recent_observations))
            attempt = attempt_subgoal(scene, task, k, actor, limit)
            results[k].update(status="success" if attempt["success"] else "failure", steps=attempt["steps"], reason=attempt["reason"])
        finally:
            scene.restore_state(handle)
            scene.discard_state(handle)

    def after_subgoal(k: int, result: SubgoalResult) -> None:
        # run_episode calls this at the boundary, before the expert starts subgoal k + 1.
        if result.success and k + 1 < len(task.subgoals):
            handover(k + 1)

    start = time.perf_counter()
    scene.reset(task, seed)
    handover(0)
    expert_result = run_episode(scene, task, witness, seed, on_subgoal=after_subgoal)
    out: dict[str, Any] = {"task_id": task.task_id, "seed": int(seed), "subgoals": results, "expert_success": expert_result.success}
    if long_horizon:
        try:
            episode = run_episode(scene, task, actor, seed)
            out["long_horizon"] = {
                "success": episode.success,
                "subgoals_reached": sum(bool(s["success"]) for s in episode.subgoals),
                "total_steps": episode.total_steps,
                "reason": episode.reason,
            }
        except (ValueError, RuntimeError) as exc:
            out["long_horizon"] = {"success": False, "subgoals_reached": 0, "total_steps": 0, "reason": f"policy error: {exc}"}
    out["wall_s"] = time.perf_counter() - start
    return out


_eval_worker: dict[str, Any] = {}


def _init_eval_worker(config: SubgoalEvalConfig, policy_factory: Callable[[], Policy]) -> None:
    torch.set_num_threads(1)
    scene = TabletopScene(physics_hz=config.physics_hz, control_hz=config.control_hz)
    policy = policy_factory()
    _eval_worker.update(
        config=config,
        scene=scene,
        expert=ScriptedExpert(PandaKinematics(), control_hz=config.control_hz, config=ExpertConfig()),
        policy=policy,
        cameras=make_cameras(scene, tuple(getattr(policy, "cameras", ())), config.image_width, config.image_height),
    )


def _eval_one(job: tuple[str, int]) -> dict[str, Any]:
    task_id, seed = job
    w = _eval_worker
    cfg: SubgoalEvalConfig = w["config"]
    return evaluate_episode(
        w["scene"], w["expert"], w["policy"], get_task(task_id), seed, w["cameras"], cfg.max_steps_per_subgoal, cfg.long_horizon
    )


def _rate(successes: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(successes, n)
    return {"success_rate": successes / n if n else None, "ci95": [lo, hi], "n": n, "successes": successes}


def summarize_evaluation(task_ids: list[str], episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and subgoal, per predicate and overall rates with Wilson intervals. A subgoal
    attempt counts when the policy got control and the subgoal did not already hold."""
    per_task: dict[str, Any] = {}
    by_predicate: dict[str, list[bool]] = {}
    all_attempts: list[bool] = []
    long_all: list[bool] = []
    below: list[dict[str, Any]] = []
    for task_id in task_ids:
        eps = sorted((e for e in episodes if e["task_id"] == task_id), key=lambda e: e["seed"])
        subgoals = []
        for k, sg in enumerate(get_task(task_id).subgoals):
            rows = [e["subgoals"][k] for e in eps]
            attempts = [r["status"] == "success" for r in rows if r["status"] in ("success", "failure")]
            done = [r for r in rows if r["status"] == "success"]
            entry = {
                "index": k,
                "name": sg.name,
                "predicate": sg.predicate,
                **_rate(sum(attempts), len(attempts)),
                "already_satisfied": sum(r["status"] == "already_satisfied" for r in rows),
                "not_reached_by_expert": sum(r["status"] == "not_reached_by_expert" for r in rows),
                "mean_steps_success": sum(r["steps"] for r in done) / len(done) if done else None,
                "failures": [{"seed": e["seed"], "reason": e["subgoals"][k]["reason"]} for e in eps if e["subgoals"][k]["status"] == "failure"],
            }
            subgoals.append(entry)
            by_predicate.setdefault(parse_predicate(sg.predicate).name, []).extend(attempts)
            all_attempts.extend(attempts)
            if attempts and sum(attempts) / len(attempts) < SUBGOAL_SUCCESS_TARGET:
                below.append({"task_id": task_id, "index": k, "name": sg.name, "success_rate": sum(attempts) / len(attempts), "n": len(attempts)})
        task_entry: dict[str, Any] = {"subgoals": subgoals}
        longs = [(e["seed"], e["long_horizon"]) for e in eps if "long_horizon" in e]
        if longs:
            long_all.extend(bool(r["success"]) for _, r in longs)
            task_entry["long_horizon"] = {
                **_rate(sum(bool(r["success"]) for _, r in longs), len(longs)),
                "mean_subgoals_reached": sum(r["subgoals_reached"] for _, r in longs) / len(longs),
                "failures": [{"seed": seed, "reason": r["reason"]} for seed, r in longs if not r["success"]],
            }
        per_task[task_id] = task_entry
    rates = [s["success_rate"] for t in per_task.values() for s in t["subgoals"] if s["n"]]
    return {
        "per_task": per_task,
        "per_predicate": {name: _rate(sum(v), len(v)) for name, v in sorted(by_predicate.items())},
        "overall": {
            "subgoal": {**_rate(sum(all_attempts), len(all_attempts)), "min_subgoal_rate": min(rates) if rates else None},
            "long_horizon": _rate(sum(long_all), len(long_all)) if long_all else None,
            "target_subgoal_rate": SUBGOAL_SUCCESS_TARGET,
            "subgoals_below_target": below,
        },
    }


def evaluation_markdown(summary: dict[str, Any]) -> str:
    lines = ["| task | subgoal | predicate | success | 95% CI | n |", "|---|---|---|---|---|---|"]
    for task_id, t in summary["per_task"].items():
        for s in t["subgoals"]:
            rate = f"{s['success_rate']:.0%}" if s["n"] else "-"
            lines.append(f"| {task_id} | {s['index']}: {s['name']} | `{s['predicate']}` | {rate} | [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] | {s['n']} |")
        if "long_horizon" in t:
            lh = t["long_horizon"]
            lines.append(f"| {task_id} | **whole task** | | {lh['success_rate']:.0%} | [{lh['ci95'][0]:.2f}, {lh['ci95'][1]:.2f}] | {lh['n']} |")
    overall = summary["overall"]
    sg = overall["subgoal"]
    if sg["n"]:
        lines.append(f"| **all** | **per subgoal** | | {sg['success_rate']:.1%} | [{sg['ci95'][0]:.3f}, {sg['ci95'][1]:.3f}] | {sg['n']} |")
    if overall["long_horizon"]:
        lh = overall["long_horizon"]
        lines.append(f"| **all** | **whole task** | | {lh['success_rate']:.1%} | [{lh['ci95'][0]:.3f}, {lh['ci95'][1]:.3f}] | {lh['n']} |")
    return "\n".join(lines)


def evaluate_policy(config: SubgoalEvalConfig, policy_factory: Callable[[], Policy] | None = None, command: str = "") -> dict[str, Any]:
    """Run the evaluation (worker pool when workers > 1) and write the JSON report.

    `policy_factory` builds the policy in each worker (it must pickle when workers > 1);
    default: the BC checkpoint `config.checkpoint`.
    """
    task_ids = sorted(load_suite()) if not config.tasks else list(config.tasks)
    for task_id in task_ids:
        get_task(task_id)
    checkpoint_info: dict[str, Any] = {}
    if policy_factory is None:
        checkpoint = load_checkpoint(config.checkpoint)  # fail here, not in every worker
        checkpoint_info = {"path": str(checkpoint.path), "training": checkpoint.training}
        policy_factory = functools.partial(
            BCPolicy, config.checkpoint, control_hz=float(config.control_hz), execute_steps=config.execute_steps or None, num_threads=1
        )
    seeds = initial_state_seeds(config.split, config.n_seeds)
    jobs = [(t, s) for t in task_ids for s in seeds]
    episodes: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="evaluation episodes", disable=not config.progress, dynamic_ncols=True)
    try:
        if config.workers == 1:
            _init_eval_worker(config, policy_factory)
            results = map(_eval_one, jobs)
            for ep in results:
                episodes.append(ep)
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(config.workers, initializer=_init_eval_worker, initargs=(config, policy_factory)) as pool:
                for ep in pool.imap_unordered(_eval_one, jobs, chunksize=1):
                    episodes.append(ep)
                    bar.update(1)
    finally:
        bar.close()
    summary = summarize_evaluation(task_ids, episodes)
    report = {
        "config": asdict(config),
        "command": command,
        "checkpoint": checkpoint_info,
        "seeds": seeds,
        "wall_s": time.perf_counter() - start,
        **summary,
        "episodes": sorted(episodes, key=lambda e: (e["task_id"], e["seed"])),
    }
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    return report


# -- command line -------------------------------------------------------------------------
def train_main(argv: list[str] | None = None, prog: str = "python -m training.bc.train") -> int:
    """Training command line; `prog` is how the caller names the command (e.g. "helmstack train bc")."""
    parser = argparse.ArgumentParser(prog=prog, description="Behaviour cloning of the scripted expert's action chunks.")
    parser.add_argument("--data", required=True, help="demonstration directory (python -m training.bc.demos)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--config", help="YAML with BCTrainConfig fields (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--seed", type=int, help="seed (ensemble members: one --out per seed)")
    parser.add_argument("--tasks", help="comma-separated task ids to train on (default all in the data)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--hidden-dim", type=int)
    parser.add_argument("--n-blocks", type=int)
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--num-threads", type=int)
    parser.add_argument("--no-motion", action="store_true", help="leave out the hand/gripper velocity features (ablation)")
    parser.add_argument("--history", type=int, help="temporal window of the last H decisions (HELM's longer-context baseline: 32; default 0)")
    parser.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"data_dir": args.data, "out_dir": args.out}
    for name in ("seed", "max_steps", "batch_size", "lr", "hidden_dim", "n_blocks", "dropout", "eval_every", "save_every", "num_threads", "history"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.tasks:
        overrides["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_progress:
        overrides["progress"] = False
    if args.no_motion:
        overrides["use_motion"] = False
    try:
        config = load_config(BCTrainConfig, args.config, overrides, root="bc")
        trainer = BCTrainer(config, resume=args.resume)
    except (ConfigError, ValueError, CheckpointError) as exc:
        parser.error(" ".join(str(exc).split()))
    summary = trainer.train()
    print(json.dumps(summary))
    return 0


def eval_main(argv: list[str] | None = None, prog: str = "python -m training.bc.train eval") -> int:
    """Evaluation command line; `prog` is how the caller names the command (e.g. "helmstack eval bc")."""
    parser = argparse.ArgumentParser(prog=prog, description="Per-subgoal and long-horizon success of a BC policy on held-out seeds.")
    parser.add_argument("--checkpoint", required=True, help="BC run directory or checkpoint directory")
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--tasks", help="comma-separated task ids (default: the whole suite)")
    parser.add_argument("--seeds", type=int, default=20, help="episodes per task (the split's first N seeds)")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--max-steps-per-subgoal", type=int, default=0, help="0 = each task's own limit")
    parser.add_argument("--execute-steps", type=int, default=0, help="steps of each chunk to execute (0 = all)")
    parser.add_argument("--no-long-horizon", action="store_true", help="skip the policy-only whole-task episodes")
    parser.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = SubgoalEvalConfig(
            checkpoint=args.checkpoint, out=args.out,
            tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else (),
            n_seeds=args.seeds, split=args.split, workers=args.workers, max_steps_per_subgoal=args.max_steps_per_subgoal,
            execute_steps=args.execute_steps, long_horizon=not args.no_long_horizon, progress=not args.no_progress,
        )
        command = f"{prog} " + " ".join(shlex.quote(a) for a in argv)
        report = evaluate_policy(config, command=command)
    except (ValueError, CheckpointError) as exc:
        parser.error(" ".join(str(exc).split()))
    print(evaluation_markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
