"""GRPO-family training loop for a causal LM on the verifiable reasoning tasks.

What: ``GRPOTrainer`` runs on-policy group-relative policy optimisation: each step draws
prompts from the TRAIN split (``make_split``), lets the method (``training.lm_rl.methods``)
build its groups through a ``RolloutContext`` (sampling with ``generate``, scoring with the
task verifier ``safe_reward(correctness_reward)`` plus an optional weighted
``format_reward``), takes the method's per-token advantages A[B, T] and mask M[B, T],
recomputes log-probs with gradients (``sequence_logprobs``) and takes one AdamW step on
``policy_loss_for`` with the loss preset.

Loss presets (docs/papers/lm-rl.md, ``training.lm_rl.core.registry``): ``grpo``
(DeepSeekMath), ``dr_grpo`` (Dr. GRPO), ``dapo`` (DAPO clip-higher, dynamic sampling as
dropping zero-variance groups, token-level loss), ``gspo`` (GSPO sequence-level ratio) and
``rloo`` (leave-one-out baseline). Each is also a method with plain groups; a paper's method
uses its own default preset unless ``loss`` names another.

Outputs under ``out_dir``: ``tb/`` (TensorBoard, namespaced keys ``charts/*``, ``losses/*``,
``eval/*``), ``metrics.jsonl`` (one JSON record per step, plus eval records), ``curves.png``
and ``checkpoints/step-XXXXXXXX/``. A checkpoint is written into a hidden staging directory
and renamed into place, so a directory with a final name was complete when written; it holds
the model and tokenizer (``save_pretrained``, safetensors; a VLM's image processor too), ``optimizer.pt`` and
``trainer_state.pt`` (step, config, RNG states of python / torch / the sampling generator),
both loadable with ``torch.load(weights_only=True)``. Resuming picks the newest checkpoint
that loads cleanly and refuses damaged ones with a warning naming the problem.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.lm_rl.core import get_preset, policy_loss_for, preset_names, zero_variance_samples
from training.lm_rl.committed import committed_sft, ensure_format_tokens, is_committed_task
from training.lm_rl.methods import GroupBatch, RolloutContext, get_method, method_names
from training.lm_rl.models import TINY
from training.lm_rl.rewards import correctness_reward, format_reward, safe_reward
from training.lm_rl.rollout import SamplingConfig, sequence_logprobs
from training.lm_rl.sft import encode_prompt, greedy_accuracy, sft_warm_start
from training.lm_rl.tasks import Problem, get_task, make_split
from training.lm_rl.tool_env import max_forced_tokens, tool_rollout_context
from training.lm_rl.vlm.policy import (
    TINY_VLM,
    VisionPrompts,
    check_model_for_task,
    load_any_policy,
    save_policy_atomically,
    vlm_greedy_accuracy,
    vlm_sft_warm_start,
)
from training.run_files import (
    CHECKPOINT_DIR,
    checkpoint_path,
    commit_checkpoint,
    list_checkpoints,
    log_record,
    read_records,
    staging_path,
    truncate_records,
)

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
# SFT warm-start settings: a batch and lr that teach the tiny model the answer format in a
# few hundred steps (see tests/training/lm_rl/test_sft.py).
_SFT_BATCH_SIZE = 16
_SFT_LR = 3e-3


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is required, or checkpoints where none are expected."""


@dataclass
class TrainConfig:
    """Settings of one GRPO-family run; every field is also a ``helmstack train lm`` option."""

    method: str = field(default="grpo", metadata={"help": "Method (training.lm_rl.methods): grpo, mgrpo, ibpo, ..."})
    loss: str = field(default="", metadata={"help": "Loss preset (grpo | dr_grpo | dapo | gspo | rloo); '' = the method's default."})
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Keyword options of the method (e.g. {'corrections': 2} for mgrpo)."}
    )
    task: str = field(default="arithmetic", metadata={"help": "Task family (arithmetic, countdown, logic_chain, math_followup, logic_followup, science_qa, tool_use)."})
    difficulty: int = field(default=1, metadata={"help": "Task difficulty level (>= 1)."})
    model: str = field(default=TINY, metadata={"help": "'tiny' (fresh TinyLM), 'tiny-vlm' (fresh TinyVLM, for the visual tasks) or a local save_pretrained directory."})
    out_dir: str = field(default="runs/lm_rl", metadata={"help": "Run directory: tb/, metrics.jsonl, checkpoints/, curves.png."})
    max_steps: int = field(default=100, metadata={"help": "Optimiser steps in total (a resumed run continues up to it)."})
    max_generated_tokens: int = field(
        default=0,
        metadata={"help": "Stop once this many tokens were sampled in total (matched compute across methods); 0: no limit."},
    )
    prompts_per_step: int = field(default=8, metadata={"help": "Prompts drawn from the TRAIN split per step."})
    group_size: int = field(default=8, metadata={"help": "Completions sampled per prompt (the GRPO group, >= 2)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation budget per completion, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0; training needs sampling)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]."})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate (constant)."})
    beta: float = field(default=0.0, metadata={"help": "k3 KL weight to the frozen initial policy; 0 disables the reference."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping threshold (> 0)."})
    format_weight: float = field(default=0.0, metadata={"help": "Weight of format_reward added to the correctness reward (>= 0)."})
    save_every: int = field(default=50, metadata={"help": "Checkpoint (and held-out eval) every this many steps."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest checkpoints kept (>= 2, so a damaged one has a fallback)."})
    eval_problems: int = field(default=64, metadata={"help": "Held-out TEST problems for greedy accuracy (0 skips eval)."})
    sft_steps: int = field(default=0, metadata={"help": "SFT warm-start steps before RL when the model is 'tiny' (0: none)."})
    seed: int = field(default=0, metadata={"help": "Seed of model init, prompt stream, sampling and torch/python RNGs."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when available), 'cpu' or 'cuda[:N]'."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ValueError(f"TrainConfig.method={self.method!r} is unknown; valid: {', '.join(method_names())}")
        if self.loss and self.loss not in preset_names():
            raise ValueError(f"TrainConfig.loss={self.loss!r} is unknown; valid: {', '.join(preset_names())}")
        get_method(self.method, **self.method_options)  # raises on an unknown or invalid option
        get_task(self.task)  # raises ValueError naming the valid tasks
        positive = ("difficulty", "max_steps", "prompts_per_step", "max_new_tokens", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"TrainConfig.group_size must be >= 2 (a group needs a spread), got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"TrainConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"TrainConfig.top_p must be in (0, 1], got {self.top_p}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("beta", "format_weight", "eval_problems", "sft_steps", "max_generated_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 2:
            raise ValueError(f"TrainConfig.keep_checkpoints must be >= 2, got {self.keep_checkpoints}")
        if self.sft_steps > 0 and self.model not in (TINY, TINY_VLM):
            raise ValueError(
                f"TrainConfig.sft_steps={self.sft_steps} needs model='tiny' or {TINY_VLM!r}, got model={self.model!r}"
            )
        check_model_for_task(self.model, self.task)  # visual tasks need a VLM, text tasks a causal LM
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class _LoadedCheckpoint:
    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]
    vision: VisionPrompts | None = None  # a VLM's prompts and image processor; None for text


def _load_checkpoint(path: Path) -> _LoadedCheckpoint:
    """Load every part of one checkpoint; any missing or damaged file raises CheckpointError."""
    try:
        # Read the weights file directly first: a truncated safetensors file is reported as
        # such instead of as a generic model-loading failure.
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        for weights in weight_files:
            load_file(weights)
        optimizer_state = torch.load(path / OPTIMIZER_FILE, weights_only=True)
        trainer_state = torch.load(path / STATE_FILE, weights_only=True)
        for key in ("step", "config", "python_rng", "torch_rng", "generator"):
            if key not in trainer_state:
                raise KeyError(f"{STATE_FILE} lacks {key!r}")
        model, tokenizer, vision = load_any_policy(str(path))
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, KeyError, ValueError) as error:
        # ModelLoadError is a ValueError; RuntimeError covers torch's "failed reading zip archive".
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete: {type(error).__name__}: {error}") from error
    return _LoadedCheckpoint(path, model, tokenizer, optimizer_state, trainer_state, vision)


def load_latest_checkpoint(out_dir: str | os.PathLike) -> _LoadedCheckpoint:
    """The newest checkpoint in out_dir that loads cleanly; damaged ones are refused with a warning."""
    candidates = list_checkpoints(out_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume from in {Path(out_dir) / CHECKPOINT_DIR}")
    problems: list[str] = []
    for path in reversed(candidates):
        try:
            return _load_checkpoint(path)
        except CheckpointError as error:
            logger.warning("refusing %s; trying the previous checkpoint", error)
            problems.append(str(error))
    raise CheckpointError("no complete checkpoint to resume from:\n  " + "\n  ".join(problems))


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of out_dir/metrics.jsonl in order (empty when the file does not exist)."""
    return read_records(Path(out_dir) / METRICS_FILE)


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """PNG of reward, accuracy, policy loss and tokens/s per step, with held-out accuracy marks."""
    import matplotlib

    matplotlib.use("Agg")  # headless: training machines have no display
    import matplotlib.pyplot as plt

    train = [r for r in records if "charts/reward" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    panels = (
        ("charts/reward", "reward"),
        ("charts/accuracy", "train accuracy"),
        ("losses/policy", "policy loss"),
        ("charts/tokens_per_s", "tokens/s"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot([r["step"] for r in train], [r[key] for r in train], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if evals:
        axes[0, 1].plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "s-", label="held-out (greedy)")
        axes[0, 1].legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class GRPOTrainer:
    """On-policy GRPO-family trainer (one optimiser step per sampled batch).

    Building it loads the policy (or, with ``resume``, the newest complete checkpoint in
    ``config.out_dir``); ``train()`` runs up to ``config.max_steps``.
    Raises ModelLoadError for an unloadable model and CheckpointError when resuming finds no
    usable checkpoint or a fresh run would mix with an existing one.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.device = _resolve_device(config.device)
        self.method = get_method(config.method, **config.method_options)
        self.loss_config = get_preset(
            config.loss or self.method.default_loss,
            **self.method.loss_overrides(),
            # Dr. GRPO's constant normaliser is the generation budget; other presets ignore it.
            # Tool tasks add the environment's forced result tokens on top (tool_env).
            max_completion_length=self.method.max_completion_length(config.max_new_tokens)
            + max_forced_tokens(get_task(config.task)),
            beta=config.beta,
            use_reference=config.beta > 0,
        )
        self.sampling = SamplingConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p, seed=config.seed
        )
        self.correctness = safe_reward(correctness_reward)
        self.format = safe_reward(format_reward)
        self.step = 0
        self.generated_tokens = 0  # sampled tokens so far, the compute budget of max_generated_tokens
        loaded: _LoadedCheckpoint | None = None
        if resume:
            loaded = load_latest_checkpoint(self.out_dir)
            self.model, self.tokenizer, self.vision = loaded.model, loaded.tokenizer, loaded.vision
            self.step = int(loaded.trainer_state["step"])
            self.generated_tokens = int(loaded.trainer_state.get("generated_tokens", 0))
            logger.info("resuming from %s at step %d", loaded.path, self.step)
            self._warn_on_changed_config(loaded.trainer_state["config"])
        else:
            if list_checkpoints(self.out_dir):
                raise CheckpointError(
                    f"{self.out_dir} already holds checkpoints; pass resume=True (--resume) or choose a new out_dir"
                )
            self._seed_everything()
            # vision: None for a causal LM; a VLM's prompt/image plumbing (training.lm_rl.vlm.policy).
            self.model, self.tokenizer, self.vision = load_any_policy(config.model, seed=config.seed)
        self.model.to(self.device)
        # Dropout would make the sampled and the trained policy differ; RL keeps eval mode.
        self.model.eval()
        committed = is_committed_task(config.task)
        if committed:
            # Committed-format tasks (docs/cerl.md) need their tags as whole tokens; a no-op for
            # the char tokenizer and for checkpoints that already have them.
            ensure_format_tokens(self.tokenizer, self.model)
        if not resume and config.sft_steps > 0 and self.vision is not None:
            # Visual tasks: image + prompt -> trace, a share with the answer-hint line (training.lm_rl.vlm.sft).
            vlm_sft_warm_start(
                self.model, self.vision, [config.task], config.difficulty, steps=config.sft_steps,
                batch_size=_SFT_BATCH_SIZE, lr=_SFT_LR, seed=config.seed, progress=config.progress,
                eval_problems=max(config.eval_problems, 1), max_new_tokens=config.max_new_tokens,
            )
            self.model.eval()
        elif not resume and config.sft_steps > 0:
            # Committed-format tasks warm-start on traces plus their follow-up turns.
            warm_start = committed_sft if committed else sft_warm_start
            warm_start(
                self.model, self.tokenizer, [config.task], config.difficulty, steps=config.sft_steps,
                batch_size=_SFT_BATCH_SIZE, lr=_SFT_LR, seed=config.seed, progress=config.progress,
                eval_problems=max(config.eval_problems, 1), max_new_tokens=config.max_new_tokens,
            )
            self.model.eval()
        self.reference = self._reference_policy(resume)
        # weight_decay 0: RL fine-tuning should move the policy only where rewards say so.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        if loaded is not None:
            self.optimizer.load_state_dict(loaded.optimizer_state)
            self._restore_rng(loaded.trainer_state)
        # The prompt stream is a fixed function of (task, difficulty, seed): step s always
        # trains on the same prompts, which a resumed run needs. make_split's stream is a
        # prefix-stable sequence, so its length does not change earlier prompts.
        self.train_problems = make_split(
            config.task, "train", config.max_steps * config.prompts_per_step, config.difficulty, seed=config.seed
        )
        self.test_problems = make_split(config.task, "test", config.eval_problems, config.difficulty, seed=config.seed)

    # --- setup helpers -------------------------------------------------------------------
    def _seed_everything(self) -> None:
        random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)

    def _warn_on_changed_config(self, saved: dict[str, Any]) -> None:
        # A changed prompt stream or loss makes the resumed run differ from an uninterrupted one.
        for name in ("method", "loss", "method_options", "task", "difficulty", "prompts_per_step", "group_size",
                     "seed", "lr", "beta"):
            if saved.get(name) != getattr(self.config, name):
                logger.warning("resuming with %s=%r, but the checkpoint was trained with %r",
                               name, getattr(self.config, name), saved.get(name))

    def _reference_policy(self, resume: bool) -> PreTrainedModel | None:
        """Frozen initial policy for the KL term, saved once so a resumed run keeps the same one."""
        if self.config.beta == 0:
            return None
        path = self.out_dir / REFERENCE_DIR
        if resume:
            reference, _, _ = load_any_policy(str(path))
        else:
            reference = copy.deepcopy(self.model)
            save_policy_atomically(reference, self.tokenizer, self.vision, path)
        reference.to(self.device).eval().requires_grad_(False)
        return reference

    def _restore_rng(self, state: dict[str, Any]) -> None:
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        self.method.load_state_dict(state.get("method_state", {}))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # --- one step --------------------------------------------------------------------------
    def _batch_problems(self, step: int) -> list[Problem]:
        per_step = self.config.prompts_per_step
        return self.train_problems[step * per_step : (step + 1) * per_step]

    def _rewards(self, texts: list[str], problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward, correctness), each (B,) float32."""
        correct = torch.tensor(self.correctness(texts, problems=problems), dtype=torch.float32)
        reward = correct.clone()
        if self.config.format_weight > 0:
            fmt = torch.tensor(self.format(texts, problems=problems), dtype=torch.float32)
            reward = reward + self.config.format_weight * fmt
        return reward, correct

    def context(self, generator: torch.Generator | None = None) -> RolloutContext:
        """The method's view of the current policy: sampler, generator (the run's by default) and verifier.

        For a task with tools (``tool_env`` on its family, e.g. tool_use) the context samples
        multi-turn episodes through ``training.lm_rl.tool_env``.
        """
        fields = dict(
            model=self.model, tokenizer=self.tokenizer, sampling=self.sampling,
            generator=self.generator if generator is None else generator,
            group_size=self.config.group_size, score=self._rewards,
            encode_prompt=lambda text: encode_prompt(self.tokenizer, text),
        )
        family = get_task(self.config.task)
        if getattr(family, "tool_env", None) is not None:
            return tool_rollout_context(family.tool_env, family.max_turns, **fields)
        if self.vision is not None:
            # A VLM samples with each prompt's image (training.lm_rl.vlm.sampling).
            return self.vision.context(**fields)
        return RolloutContext(**fields)

    def train_step(self) -> dict[str, float]:
        """Build the method's groups, score and update once; returns the step's metrics (self.step advances)."""
        cfg = self.config
        started = time.perf_counter()
        batch: GroupBatch = self.method.build_groups(self.context(), self._batch_problems(self.step))
        advantages = self.method.advantages(batch, self.loss_config).to(self.device)  # (B, T)
        mask = self.method.mask(batch, self.loss_config).to(self.device)  # (B, T)
        pad_id = self.tokenizer.pad_token_id
        # A VLM sees each row's image again; None for text policies.
        pixel_values = self.vision.pixel_values(batch.prompt_ids) if self.vision is not None else None
        logp = sequence_logprobs(
            self.model, batch.prompt_ids, batch.completion_ids, batch.completion_mask, pad_id=pad_id,
            pixel_values=pixel_values,
        )  # (B, T), with grad
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = sequence_logprobs(
                    self.reference, batch.prompt_ids, batch.completion_ids, batch.completion_mask, pad_id=pad_id,
                    pixel_values=pixel_values,
                )
        # pi_old is the sampling-time untempered policy, so the ratio is ~1 on this single
        # on-policy update and clipping reports numerical drift only.
        loss, stats = policy_loss_for(
            self.loss_config, logp, batch.old_logp.to(self.device), advantages, mask, ref_logp
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite policy loss {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        self.generated_tokens += batch.num_generated_tokens

        elapsed = time.perf_counter() - started
        lengths = (batch.completion_mask & ~batch.forced_mask).sum(dim=1).float()  # (B,) sampled tokens
        rows_in_loss = mask.any(dim=1)  # (B,)
        primary = batch.primary.to(lengths.device)  # (B,)
        flat = zero_variance_samples(batch.rewards, batch.group_ids)  # (B,)
        return {
            "step": self.step,
            # Over the policy's own samples (GroupBatch.primary), not rows a method added.
            "charts/reward": float(batch.rewards[primary].mean()),
            "charts/reward_std": float(batch.rewards[primary].std()) if int(primary.sum()) > 1 else 0.0,
            "charts/accuracy": float(batch.correct[primary].mean()),
            "charts/completion_length": float(lengths[primary].mean()),
            "charts/truncated_fraction": sum(r == "length" for r in batch.finish_reason) / batch.size,
            "charts/zero_variance_groups": float(torch.unique(batch.group_ids[flat]).numel()),
            # Samples a failing reward function (raised, NaN, wrong length) gave 0.0, so far.
            "charts/reward_failed_samples": float(
                getattr(self.correctness, "failed_samples", 0) + getattr(self.format, "failed_samples", 0)
            ),
            "charts/samples": float(batch.size),
            "charts/samples_in_loss": float(rows_in_loss.sum()),
            "charts/generated_tokens": float(batch.num_generated_tokens),
            "charts/generated_tokens_total": float(self.generated_tokens),
            "charts/tokens_per_s": batch.num_generated_tokens / elapsed,
            "charts/step_time_s": elapsed,
            "losses/policy": float(loss.detach()),
            "losses/clip_fraction": stats["clip_fraction"],
            "losses/ratio_mean": stats["ratio_mean"],
            "losses/kl": stats["kl_mean"],
            "losses/grad_norm": float(grad_norm),
            **{f"method/{key}": float(value) for key, value in batch.metrics.items()},
        }

    # --- evaluation and checkpoints ----------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out TEST problems (task verifier); {} when eval_problems is 0."""
        if not self.test_problems:
            return {}
        if self.vision is not None:
            metrics = vlm_greedy_accuracy(self.model, self.vision, self.test_problems, self.config.max_new_tokens)
        else:
            metrics = greedy_accuracy(self.model, self.tokenizer, self.test_problems, self.config.max_new_tokens)
        # Its own fixed-seed generator: evaluating must not move the training sample stream.
        eval_generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
        extra = self.method.evaluate(self.context(eval_generator), self.test_problems)
        return {**metrics, **{f"eval/{key}": float(value) for key, value in extra.items()}}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-XXXXXXXX atomically, then prune to keep_checkpoints."""
        target = checkpoint_path(self.out_dir, self.step)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(target)
        self.model.save_pretrained(staging)  # safetensors by default
        self.tokenizer.save_pretrained(staging)
        if self.vision is not None:
            self.vision.save_pretrained(staging)  # the image processor, beside the weights
        torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
        state: dict[str, Any] = {
            "step": self.step,
            "generated_tokens": self.generated_tokens,
            "config": asdict(self.config),
            "python_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "method_state": self.method.state_dict(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, staging / STATE_FILE)
        commit_checkpoint(staging, target, self.out_dir, self.config.keep_checkpoints)
        logger.info("saved checkpoint %s", target)
        return target

    def budget_spent(self) -> bool:
        """Whether max_generated_tokens (when set) has been reached."""
        return 0 < self.config.max_generated_tokens <= self.generated_tokens

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train up to max_steps; returns the last step's metrics, final eval and output paths."""
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        truncate_records(self.out_dir / METRICS_FILE, self.step)
        # purge_step hides TensorBoard events a killed run wrote after its last checkpoint.
        writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step + 1 if self.step else None)
        metrics_path = self.out_dir / METRICS_FILE
        last: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc=f"{cfg.method}/{cfg.task}",
            disable=not cfg.progress, dynamic_ncols=True,
        )
        try:
            with metrics_path.open("a") as metrics_file:
                while self.step < cfg.max_steps and not self.budget_spent():
                    last = self.train_step()
                    log_record(writer, metrics_file, last)
                    bar.update(1)
                    bar.set_postfix(
                        tok_s=f"{last['charts/tokens_per_s']:.0f}",
                        reward=f"{last['charts/reward']:.3f}",
                        acc=f"{last['charts/accuracy']:.3f}",
                    )
                    if self.step % cfg.save_every == 0 or self.step == cfg.max_steps or self.budget_spent():
                        eval_metrics = self._evaluate_and_log(writer, metrics_file)
                        self.save_checkpoint()
                if not eval_metrics:
                    # A resumed run that had already reached max_steps still reports held-out accuracy.
                    eval_metrics = self._evaluate_and_log(writer, metrics_file)
        finally:
            bar.close()
            writer.close()
        plot = plot_curves(read_metrics(self.out_dir), self.out_dir / PLOT_FILE)
        if eval_metrics:
            logger.info("step %d held-out accuracy %.3f", self.step, eval_metrics["eval/accuracy"])
        return {
            **last,
            **eval_metrics,
            "step": self.step,
            "generated_tokens": self.generated_tokens,
            "plot": str(plot),
            "checkpoint": str(list_checkpoints(self.out_dir)[-1]),
        }

    def _evaluate_and_log(self, writer: Any, metrics_file: Any) -> dict[str, float]:
        eval_metrics = self.evaluate()
        if eval_metrics:
            log_record(writer, metrics_file, {"step": self.step, **eval_metrics})
        return eval_metrics

