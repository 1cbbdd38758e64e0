"""Run our GRPO-family plug-in methods on Hugging Face TRL's ``GRPOTrainer`` (written against TRL 1.16).

Why: TRL with accelerate is the loop users with GPUs already run (DDP, DeepSpeed, the
Trainer's logging, checkpointing and callbacks), but TRL gives every sequence one advantage
and always builds a group as ``num_generations`` samples of one prompt. Our methods
(``training.lm_rl.methods``) build their own groups and return per-token advantages
A[B, T] and per-token loss masks M[B, T]. ``PluginGRPOTrainer`` keeps TRL's loop and swaps
the three places where that is decided:

- ``_generate_and_score_completions``: rebuilds the step's ``Problem`` rows, calls
  ``method.build_groups(ctx, problems)`` with a ``RolloutContext`` over the unwrapped TRL
  model, our tokenizer, a ``SamplingConfig`` taken from the ``GRPOConfig``
  (``max_completion_length``, ``temperature``, ``top_p``) and the reward functions passed to
  the trainer, then ``method.advantages`` and ``method.mask``. It returns TRL's inputs dict
  with per-token ``advantages`` (B, T), ``completion_mask`` (the valid tokens, attended in the
  log-prob pass) and the method's mask as ``loss_mask`` (tokens in the loss).
- ``_compute_loss``: ``policy_loss_for`` with our loss preset (grpo, dr_grpo, dapo, gspo,
  rloo), which takes per-token advantages as they are.
- ``_prepare_inputs``: a method may return any number of samples B (MGRPO adds
  corrections), so the batch is split into ``steps_per_generation`` near-equal micro-batches
  (TRL's own split silently drops the remainder of an uneven B).

Log-probs: pi_theta is recomputed with ``rollout.sequence_logprobs`` (untempered, the full
logits of the completion positions), because pi_old is the sampling-time untempered
``GroupBatch.old_logp`` and the two must be the same function of the weights. TRL's fused,
temperature-scaled LM head is therefore not used, which costs memory on large vocabularies.

Normalisation across micro-batches and processes: each micro-batch's loss is rescaled by
its share of the optimizer step's rows (or loss tokens for ``token_mean``), counted over all
processes at generation time, so gradient accumulation and DDP averaging reproduce the
preset's aggregation over the whole generation batch (the rule TRL applies to ``dapo`` via
``num_items_in_batch``, applied here to all three aggregations).

Supported: one process or DDP (each process builds its own groups from its own prompts;
groups never span processes), gradient accumulation and ``steps_per_generation`` > 1,
``num_iterations`` > 1 (samples are reused and pi_old stays the sampling-time policy, so
the ratio is a real importance weight), PEFT (``peft_config``), a KL term (``args.beta`` > 0:
a frozen copy of the initial policy is made here, because TRL would reload the reference
from the model's hub id, which a local or freshly built model does not have), evaluation.
The tests (tests/training/lm_rl/test_trl_adapter.py) run one CPU process only; DDP, DeepSpeed
and PEFT are untested.

Refused with a ValueError naming the setting (they would otherwise be silently ignored):
vLLM and continuous-batching generation (methods sample through ``RolloutContext.sample``,
which forces completion prefixes and records untempered per-token log-probs; vLLM gives
neither), top_k / min_p / repetition_penalty / generation_kwargs (our sampler implements
temperature and top-p only), tools / environments / rollout_func, reward models and async
reward functions, entropy masks and bonuses, off-policy masks, ``delta``,
``mask_truncated_completions`` (masks are the method's job), ``sync_ref_model``,
``normalize_then_sum``, MoE auxiliary losses, and a KL term under DeepSpeed or FSDP.
TRL's own loss settings (``loss_type``, ``epsilon``, ``epsilon_high``, ``scale_rewards``,
``importance_sampling_level``) are ignored: the loss preset decides them.
The sampling generator is seeded from ``args.seed`` and the process index and is not saved
in TRL checkpoints, so a resumed run samples differently from an uninterrupted one.

Dataset rows are our ``Problem`` fields as columns (``problems_to_dataset``): ``prompt``
(the raw problem text; the method encodes it with ``sft.encode_prompt``), ``task``,
``answer``, ``difficulty`` and ``meta`` (JSON text, so rows of different tasks share one
Arrow schema).

Shapes: P problems per process and step, G = ``num_generations``, B samples built by the
method (P * G for plain GRPO), L the longest prompt, T the longest completion.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from training.lm_rl.core import LossConfig, get_preset, policy_loss_for, to_token_advantages
from training.lm_rl.methods import GroupBatch, Method, RolloutContext, get_method
from training.lm_rl.models import load_policy_model
from training.lm_rl.rewards import RewardFn, correctness_reward, safe_reward
from training.lm_rl.rollout import SamplingConfig, sequence_logprobs
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tasks import Problem

logger = logging.getLogger(__name__)

PROBLEM_COLUMNS: tuple[str, ...] = ("prompt", "task", "answer", "difficulty", "meta")


# --- dataset rows <-> Problem ------------------------------------------------------------------
def _tuples(value: Any) -> Any:
    """JSON lists back to tuples, as the task generators store sequences in ``Problem.meta``."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return value


def problem_columns(problems: Sequence[Problem]) -> dict[str, list[Any]]:
    """Column-major view of problems: one list per ``PROBLEM_COLUMNS`` entry, ``meta`` as JSON."""
    return {
        "prompt": [p.prompt for p in problems],
        "task": [p.task for p in problems],
        "answer": [p.answer for p in problems],
        "difficulty": [p.difficulty for p in problems],
        "meta": [json.dumps(p.meta, sort_keys=True) for p in problems],
    }


def problems_to_dataset(problems: Sequence[Problem]) -> Dataset:
    """A ``datasets.Dataset`` with one row per problem, the training set of ``PluginGRPOTrainer``."""
    if not problems:
        raise ValueError("problems_to_dataset needs at least one problem")
    return Dataset.from_dict(problem_columns(problems))


def problems_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[Problem]:
    """Rebuild ``Problem``s from dataset rows (``meta`` as JSON text or a dict; absent means {})."""
    problems = []
    for index, row in enumerate(rows):
        missing = [name for name in ("prompt", "task", "answer", "difficulty") if name not in row]
        if missing:
            raise ValueError(
                f"dataset row {index} lacks column(s) {missing}; build the dataset with problems_to_dataset"
            )
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        problems.append(
            Problem(
                task=row["task"], prompt=row["prompt"], answer=row["answer"],
                difficulty=int(row["difficulty"]), meta=_tuples(dict(meta)),
            )
        )
    return problems


def trl_reward(fn: RewardFn) -> RewardFn:
    """Adapt one of our rewards ``fn(completions, problems=...)`` to stock TRL's calling convention.

    Stock TRL calls a reward with ``prompts``, ``completions`` and every other dataset column
    as per-completion lists; the wrapper rebuilds one ``Problem`` per completion from them.
    ``PluginGRPOTrainer`` passes ``problems`` itself and needs no wrapping.
    """

    @functools.wraps(fn)
    def wrapped(
        completions: Sequence[Any], prompts: Sequence[Any], task: Sequence[str], answer: Sequence[str],
        difficulty: Sequence[int], meta: Sequence[str] | None = None, **kwargs: Any,
    ) -> list[float]:
        metas = meta if meta is not None else [None] * len(completions)
        rows = [
            {"prompt": p, "task": t, "answer": a, "difficulty": d, "meta": m}
            for p, t, a, d, m in zip(prompts, task, answer, difficulty, metas)
        ]
        return fn(completions, problems=problems_from_rows(rows))

    return wrapped


# --- batching helpers --------------------------------------------------------------------------
def _left_pad(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B tensors (L_i,) -> (ids (B, L), mask (B, L) long), padded on the left like TRL's prompts."""
    ids = pad_sequence(list(sequences), batch_first=True, padding_value=pad_id, padding_side="left")
    ones = [torch.ones_like(s, dtype=torch.long) for s in sequences]
    mask = pad_sequence(ones, batch_first=True, padding_value=0, padding_side="left")
    return ids, mask


def split_rows(batch: dict[str, Any], num_chunks: int, shuffle: bool = True) -> list[dict[str, Any]]:
    """Split every per-row entry (tensors with a leading B dimension, lists of length B) into
    ``num_chunks`` near-equal micro-batches; 0-d tensors (batch-level counts) go to every chunk.

    With ``shuffle`` the rows are permuted first (``torch.randperm``), so a micro-batch mixes
    groups instead of holding the first groups of the step only.
    """
    sizes = {len(v) for v in batch.values() if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.dim() > 0)}
    if len(sizes) != 1:
        raise ValueError(f"per-row entries disagree on the batch size: {sorted(sizes)}")
    size = sizes.pop()
    if size < num_chunks:
        raise ValueError(
            f"the method built {size} samples, fewer than steps_per_generation={num_chunks} micro-batches"
        )
    order = torch.randperm(size) if shuffle and num_chunks > 1 else torch.arange(size)
    bounds = [round(i * size / num_chunks) for i in range(num_chunks + 1)]
    chunks = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = order[start:stop]
        chunk: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                chunk[key] = value[rows.to(value.device)]
            elif isinstance(value, list):
                chunk[key] = [value[int(i)] for i in rows]
            else:
                chunk[key] = value
        chunks.append(chunk)
    return chunks


def _check_supported(args: GRPOConfig) -> None:
    """Refuse GRPOConfig settings the plug-in path would otherwise silently ignore."""
    if args.max_completion_length is None:
        raise ValueError("GRPOConfig.max_completion_length must be set: it is the sampling budget of the methods")
    refused = {
        "use_vllm": args.use_vllm,
        "use_transformers_continuous_batching": args.use_transformers_continuous_batching,
        "top_k": args.top_k not in (0, None),
        "min_p": args.min_p is not None,
        "repetition_penalty": args.repetition_penalty != 1.0,
        "generation_kwargs": bool(args.generation_kwargs),
        "top_entropy_quantile": args.top_entropy_quantile < 1.0,
        "entropy_coef": args.entropy_coef != 0.0 or args.use_adaptive_entropy,
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
        "delta": args.delta is not None,
        "mask_truncated_completions": args.mask_truncated_completions,
        "sync_ref_model": args.sync_ref_model,
        "multi_objective_aggregation": args.multi_objective_aggregation != "sum_then_normalize",
    }
    bad = [name for name, is_set in refused.items() if is_set]
    if bad:
        raise ValueError(
            f"PluginGRPOTrainer does not support GRPOConfig setting(s) {bad}: plug-in methods sample with "
            "training.lm_rl.rollout (temperature and top-p only), own the loss mask, and use the loss preset "
            "(see the training.lm_rl.trl_adapter docstring)"
        )
    per_process = args.per_device_train_batch_size * args.steps_per_generation
    if per_process % args.num_generations:
        raise ValueError(
            f"per_device_train_batch_size * steps_per_generation = {per_process} must be a multiple of "
            f"num_generations={args.num_generations}, so that every process receives whole prompt groups"
        )


def _check_reward_funcs(reward_funcs: Sequence[Any]) -> None:
    for fn in reward_funcs:
        if isinstance(fn, (str, torch.nn.Module)):
            raise ValueError(
                f"reward model {fn!r} is not supported by PluginGRPOTrainer: pass callables "
                "(completions, problems, ...) -> list[float]"
            )
        if not callable(fn) or inspect.iscoroutinefunction(fn):
            raise ValueError(f"reward function {fn!r} must be a synchronous callable")


class PluginGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` whose groups, per-token advantages and masks come from one of our methods.

    model: a loaded causal LM, or a name for ``load_policy_model`` ("tiny" or a local
        directory; then ``processing_class`` defaults to its tokenizer).
    method: a registered method name (``get_method(method, **method_options)``) or an instance.
    loss: a preset name, a ``LossConfig``, or None for the method's default preset. A preset
        takes its KL weight from ``args.beta`` and its constant normaliser from
        ``method.max_completion_length(args.max_completion_length)``, as our trainer does.
    reward_funcs: callables ``(completions, problems=..., prompts=..., <columns>, trainer_state=...)
        -> list[float | None]``, summed with ``args.reward_weights`` (None counts as 0); by
        default the task verifier. ``GroupBatch.correct`` is always the task verifier.
    The remaining arguments are TRL's. See the module docstring for what is supported.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        method: Method | str = "grpo",
        *,
        args: GRPOConfig,
        train_dataset: Dataset,
        loss: str | LossConfig | None = None,
        method_options: Mapping[str, Any] | None = None,
        reward_funcs: Callable[..., list[float]] | Sequence[Callable[..., list[float]]] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        eval_dataset: Dataset | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
    ) -> None:
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a trl.GRPOConfig, got {type(args).__name__}")
        _check_supported(args)
        if isinstance(model, str):
            model, tokenizer = load_policy_model(model, seed=args.seed)
            processing_class = tokenizer if processing_class is None else processing_class
        if processing_class is None:
            raise ValueError("processing_class (the policy's tokenizer) is required for a loaded model")
        # GRPOConfig turns activation checkpointing on by default; say how to fix it up front.
        checkpointable = not isinstance(model, PreTrainedModel) or model.supports_gradient_checkpointing
        if args.gradient_checkpointing and not checkpointable:
            raise ValueError(
                f"{type(model).__name__} does not support activation checkpointing, which GRPOConfig enables "
                "by default: pass activation_checkpointing=False"
            )
        if isinstance(method, str):
            method = get_method(method, **dict(method_options or {}))
        elif method_options:
            raise ValueError("method_options only apply when method is given by name")
        self.method = method

        if isinstance(loss, LossConfig):
            loss_config = loss
            if loss_config.beta != args.beta:
                raise ValueError(
                    f"LossConfig.beta={loss_config.beta} disagrees with GRPOConfig.beta={args.beta}; set them equal"
                )
        else:
            loss_config = get_preset(
                loss or method.default_loss,
                **method.loss_overrides(),
                max_completion_length=method.max_completion_length(args.max_completion_length),
                beta=args.beta,
                use_reference=args.beta > 0,
            )
        self.loss_config = loss_config

        if reward_funcs is None:
            reward_funcs = [safe_reward(correctness_reward)]
        elif isinstance(reward_funcs, (str, torch.nn.Module)) or callable(reward_funcs):
            reward_funcs = [reward_funcs]
        reward_funcs = list(reward_funcs)
        _check_reward_funcs(reward_funcs)
        missing = [c for c in ("prompt", "task", "answer", "difficulty") if c not in train_dataset.column_names]
        if missing:
            raise ValueError(f"train_dataset lacks column(s) {missing}; build it with problems_to_dataset")

        reference = None
        if loss_config.use_reference:
            if args.deepspeed_plugin is not None or args.fsdp:
                raise ValueError("a KL term (beta > 0) is not supported with DeepSpeed or FSDP by PluginGRPOTrainer")
            # Copied before TRL wraps the model (PEFT), so it is the initial policy.
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        # TRL would build its reference from the hub id in the model config; ours is made above.
        # Dropout off: sampling-time and training-time log-probs must be the same function.
        trl_args = copy.copy(args)
        trl_args.beta = 0.0
        trl_args.disable_dropout = True
        super().__init__(
            model=model, reward_funcs=reward_funcs, args=trl_args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
            optimizers=optimizers, peft_config=peft_config,
        )
        self.args.beta = args.beta
        self.beta = args.beta
        if self.aux_loss_enabled:
            raise ValueError(
                "MoE load-balancing loss is not supported by PluginGRPOTrainer; set GRPOConfig.router_aux_loss_coef=0.0"
            )
        if reference is not None:
            self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)
        self.sampling = SamplingConfig(
            max_new_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        self._verifier = safe_reward(correctness_reward)
        self._generator: torch.Generator | None = None
        logger.info("PluginGRPOTrainer: method %r, loss %s", method.name, loss_config)

    # --- generation and scoring ----------------------------------------------------------------
    def _sampling_generator(self) -> torch.Generator:
        # One stream per process, so processes do not sample identical completions.
        if self._generator is None:
            seed = self.args.seed + self.accelerator.process_index
            self._generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        return self._generator

    def _problems_of(self, inputs: list[dict[str, Any]], group_size: int) -> list[Problem]:
        """One problem per group of ``group_size`` consecutive rows (TRL's sampler repeats each row)."""
        if len(inputs) % group_size:
            raise ValueError(f"got {len(inputs)} rows, not a multiple of the group size {group_size}")
        firsts = inputs[::group_size]
        for start, first in zip(range(0, len(inputs), group_size), firsts):
            if any(row["prompt"] != first["prompt"] for row in inputs[start : start + group_size]):
                raise ValueError(
                    "rows of one prompt group are not consecutive; PluginGRPOTrainer needs TRL's own "
                    "train dataloader (RepeatSampler)"
                )
        return problems_from_rows(firsts)

    def _score(self, texts: list[str], problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``RolloutContext.score`` of this trainer: (reward (B,), correctness (B,)), float32 on the CPU."""
        if len(texts) != len(problems):
            raise ValueError(f"got {len(texts)} completions for {len(problems)} problems")
        mode = "train" if self.model.training else "eval"
        columns = problem_columns(problems)
        kwargs = {
            **{key: value for key, value in columns.items() if key != "prompt"},
            "prompts": columns["prompt"], "problems": list(problems), "trainer_state": self.state,
        }
        per_func = torch.zeros(len(texts), len(self.reward_funcs))  # (B, F)
        for index, (fn, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            values = fn(completions=list(texts), **kwargs)
            if len(values) != len(texts):
                raise ValueError(f"reward function {name!r} returned {len(values)} values for {len(texts)} completions")
            per_func[:, index] = torch.tensor([math.nan if v is None else float(v) for v in values])
            self._metrics[mode][f"rewards/{name}/mean"].append(torch.nanmean(per_func[:, index]).item())
        rewards = (per_func * self.reward_weights[None, :]).nansum(dim=1)  # (B,)
        correct = torch.tensor(self._verifier(list(texts), problems=list(problems)), dtype=torch.float32)
        return rewards, correct

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Build the method's groups for this process's rows; returns TRL's inputs dict (see the module docstring)."""
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        problems = self._problems_of(inputs, group_size)
        tokenizer = self._tokenizer
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
        ):
            ctx = RolloutContext(
                model=unwrapped, tokenizer=tokenizer, sampling=self.sampling, generator=self._sampling_generator(),
                group_size=group_size, score=self._score,
                encode_prompt=lambda text: encode_prompt(tokenizer, text),
            )
            batch: GroupBatch = self.method.build_groups(ctx, problems)
        device = self.accelerator.device
        advantages = self.method.advantages(batch, self.loss_config).to(device)  # (B, T)
        loss_mask = self.method.mask(batch, self.loss_config).to(device).bool()  # (B, T)
        completion_mask = batch.completion_mask.to(device).bool()  # (B, T)
        pad_id = tokenizer.pad_token_id
        prompt_ids, prompt_mask = _left_pad([p.to(device) for p in batch.prompt_ids], pad_id)  # (B, L)
        output: dict[str, Any] = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": batch.completion_ids.to(device).masked_fill(~completion_mask, pad_id),  # (B, T)
            "completion_mask": completion_mask.long(),
            "loss_mask": loss_mask,
            "advantages": advantages,
            "old_per_token_logps": batch.old_logp.to(device),  # (B, T)
            # Step-level counts over all processes, for the micro-batch shares in _compute_loss.
            "num_items_in_batch": self.accelerator.gather(loss_mask.sum()).sum(),
            "num_sequences_in_batch": self.accelerator.gather(loss_mask.any(dim=1).sum()).sum(),
        }
        if self.ref_model is not None and self.loss_config.use_reference:
            with torch.no_grad():
                output["ref_per_token_logps"] = sequence_logprobs(
                    self.ref_model, list(batch.prompt_ids), output["completion_ids"], completion_mask, pad_id=pad_id
                )
        self._log_batch(mode, batch, advantages, loss_mask)
        return output

    def _log_batch(self, mode: str, batch: GroupBatch, advantages: torch.Tensor, loss_mask: torch.Tensor) -> None:
        metrics = self._metrics[mode]
        sampled = (batch.completion_mask & ~batch.forced_mask).sum(dim=1).float()  # (B,)
        metrics["reward"].append(batch.rewards.mean().item())
        metrics["reward_std"].append(batch.rewards.std().item() if batch.size > 1 else 0.0)
        metrics["accuracy"].append(batch.correct.mean().item())
        metrics["completions/mean_length"].append(sampled.mean().item())
        metrics["samples"].append(float(batch.size))
        metrics["samples_in_loss"].append(float(loss_mask.any(dim=1).sum()))
        metrics["num_generated_tokens"].append(float(batch.num_generated_tokens))
        for key, value in batch.metrics.items():
            metrics[f"method/{key}"].append(float(value))
        # The completions table of log_completions: one row per sample, its mean token advantage.
        weights = loss_mask.float()
        row_advantage = (advantages * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B,)
        self._logs["prompt"].extend(p.prompt for p in batch.problems)
        self._logs["completion"].extend(batch.texts)
        self._logs["advantages"].extend(row_advantage.tolist())
        # A method may score in several calls and reorder rows, so only the summed reward is per row.
        self._logs["rewards"]["reward"].extend(batch.rewards.tolist())

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """Generate once per ``steps_per_generation * num_iterations`` steps and hand out micro-batches."""
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_rows(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # --- loss ----------------------------------------------------------------------------------
    def _policy_logprobs(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """log pi_theta of the completion tokens, (B, T) with gradient, untempered (like old_logp)."""
        prompts = [row[mask.bool()] for row, mask in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
        with self.accelerator.autocast():
            return sequence_logprobs(
                model, prompts, inputs["completion_ids"], inputs["completion_mask"].bool(),
                pad_id=self._tokenizer.pad_token_id,
            )

    def _loss_share(self, mask: torch.Tensor, inputs: Mapping[str, Any], mode: str) -> torch.Tensor | float:
        """This micro-batch's share of the optimizer step's normaliser (see the module docstring).

        mask: (B, T) bool. Without step-level counts in ``inputs`` (a hand-made TRL inputs
        dict), TRL's own convention applies: divide by the gradient-accumulation steps.
        """
        # Set by the Trainer's loop; a direct call outside it uses the configured value.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        accumulation = steps if mode == "train" else 1
        if self.loss_config.aggregation == "token_mean":
            local, total = mask.sum(), inputs.get("num_items_in_batch")
        else:
            local, total = mask.any(dim=1).sum(), inputs.get("num_sequences_in_batch")
        if total is None:
            return 1.0 / accumulation
        window = total.float() / self.accelerator.num_processes
        if mode == "train":
            window = window * accumulation / self.args.steps_per_generation
        return local.float() / window.clamp(min=1.0)

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Our ``policy_loss_for`` on TRL inputs; advantages may be (B,) (TRL) or (B, T) (ours)."""
        mode = "train" if self.model.training else "eval"
        logp = self._policy_logprobs(model, inputs)  # (B, T)
        mask = inputs.get("loss_mask")
        if mask is None:  # a TRL inputs dict: its loss mask
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
        mask = mask.bool()
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = to_token_advantages(advantages, mask)
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        ref_logp = inputs.get("ref_per_token_logps") if self.loss_config.use_reference else None
        loss, stats = policy_loss_for(self.loss_config, logp, old_logp, advantages, mask, ref_logp)
        share = self._loss_share(mask, inputs, mode)
        metrics = self._metrics[mode]
        metrics["policy_loss"].append(loss.item())
        metrics["clip_ratio/region_mean"].append(stats["clip_fraction"])
        metrics["ratio_mean"].append(stats["ratio_mean"])
        if self.loss_config.use_reference:
            metrics["kl"].append(stats["kl_mean"])
        return loss * share
