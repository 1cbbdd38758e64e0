"""Rollout engine: batched sampling from a Hugging Face causal LM for GRPO-family methods.

``generate`` left-pads a batch of prompts, runs the prompt prefill once, then decodes token by
token with a ``DynamicCache``, sampling with temperature and nucleus (top-p) filtering from a
seeded ``torch.Generator``. ``sequence_logprobs`` recomputes per-token log-probs of given
completions in one teacher-forced pass (the trainer's ``logp`` with gradients, and the
reference model's log-probs).

Why not ``model.generate``: the methods in docs/papers/lm-rl.md need things it does not give
cleanly:
- the per-token log-prob of every sampled token, both under the sampling distribution and
  under the untempered model (see ``Rollout``);
- forced completion prefixes, one per sample ("regeneration from a prefix" for IBPO prefix
  trees, EqLen prefix inheritance, internalization), flagged token by token in
  ``forced_mask`` so a method can include or exclude them from its loss;
- groups of samples per prompt that share one prompt prefill (GRPO groups, MGRPO's second
  pass), by repeating the KV cache instead of recomputing it;
- stop strings checked per sequence on the decoded tail only, with the text cut at the stop.

Shapes: B = number of samples (prompts x num_samples_per_prompt), T = longest completion
(forced prefix + sampled tokens), V = vocabulary size.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

logger = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How completions are sampled.

    max_new_tokens: most tokens the model samples per completion; forced prefix tokens come
        on top of this budget.
    temperature: softmax temperature; 0 means greedy (argmax) decoding.
    top_p: nucleus filtering: keep the smallest set of most likely tokens whose probability
        mass reaches top_p (1.0 keeps everything).
    stop_strings: a completion ends after the sampled token that completes any of these.
    seed: seeds the sampling generator when ``generate`` is not given one.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p must be a number, got {self.top_p!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, (tuple, list)):
            raise TypeError(f"stop_strings must be a tuple of strings, got {self.stop_strings!r}")
        self.stop_strings = tuple(self.stop_strings)
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop_strings must hold non-empty strings, got {self.stop_strings!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")


@dataclass
class Rollout:
    """A batch of sampled completions, row i of every (B, ...) field being one sample.

    Two log-probs are recorded for each token because they answer different questions:
    ``logp`` is the probability the token was actually drawn with (after temperature and
    top-p; 0 for greedy), the right quantity for importance weights against the behaviour
    policy or for entropy of what was sampled. ``logp_raw`` is the untempered model's
    log-prob, the same quantity ``sequence_logprobs`` computes during training, so it is
    GRPO's ``old_logp``: the ratio pi_theta / pi_old must compare one policy definition, and
    the trainer's pi_theta is the untempered model. On forced tokens (not drawn from the
    sampling distribution) ``logp`` equals ``logp_raw``.
    """

    prompt_ids: list[torch.Tensor]  # B tensors (L_i,) long, unpadded
    completion_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    completion_mask: torch.Tensor  # (B, T) bool, True up to and including the eos/stop token
    forced_mask: torch.Tensor  # (B, T) bool, True on forced prefix tokens (subset of completion_mask)
    logp: torch.Tensor  # (B, T) float32, log-prob under the sampling distribution, 0 where masked
    logp_raw: torch.Tensor  # (B, T) float32, log-prob under the untempered model, 0 where masked
    texts: list[str]  # B decoded completions (prefix included), cut after the stop string
    finish_reason: list[str]  # B of "eos" | "stop" | "length"
    group_ids: torch.Tensor  # (B,) long, index of the prompt each sample came from
    num_generated_tokens: int  # tokens sampled by the model (forced tokens excluded)
    wall_time_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes the KV cache (renamed across versions)."""
    parameters = inspect.signature(model.forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_pad(
    sequences: list[torch.Tensor], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad 1-D token tensors into one batch.

    Returns input_ids (B, L) long, attention_mask (B, L) long and position_ids (B, L) long,
    positions counting from 0 at each sequence's first real token (as ``generate`` does).
    """
    length = max(int(s.numel()) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if seq.numel():
            input_ids[row, length - seq.numel():] = seq.to(device)
            attention_mask[row, length - seq.numel():] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _tokenize_prompts(tokenizer, prompts: list[str] | list[list[int]]) -> list[torch.Tensor]:
    if not prompts:
        raise ValueError("prompts must not be empty")
    ids: list[torch.Tensor] = []
    for index, prompt in enumerate(prompts):
        tokens = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError(f"prompts[{index}] tokenizes to no tokens; every prompt needs at least one")
        ids.append(torch.tensor(tokens, dtype=torch.long))
    return ids


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Eos ids of the tokenizer and of the model's generation config (which may list several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    return ids


def _sample(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    logits: (B, V). Returns tokens (B,) long and their logp (B,) under the sampling
    distribution (temperature, then top-p, renormalised; 0 for greedy).
    """
    if config.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    scaled = torch.log_softmax(logits.float() / config.temperature, dim=-1)  # (B, V)
    if config.top_p < 1.0:
        sorted_logp, order = scaled.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
        # Keep a token while the mass of the more likely tokens is still short of top_p;
        # the most likely token always survives.
        drop_sorted = mass_before >= config.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = torch.log_softmax(scaled.masked_fill(drop, float("-inf")), dim=-1)
    tokens = torch.multinomial(scaled.exp(), num_samples=1, generator=generator)[:, 0]
    return tokens, scaled.gather(-1, tokens[:, None])[:, 0]


class _StopChecker:
    """Detects stop strings by decoding only the last few tokens of a completion."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        # A stop string of n characters spans at most n tokens when every token decodes to
        # at least one character; the margin covers tokens that decode to partial bytes.
        self.window = max((len(s) for s in stop_strings), default=0) + 4

    def completes_stop(self, tokens: list[int]) -> bool:
        """True if the last token completes a stop string that the tokens before it did not."""
        tail = tokens[-self.window:]
        now = self.tokenizer.decode(tail, skip_special_tokens=True)
        if not any(s in now for s in self.stop_strings):
            return False
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=True)
        return not any(s in before for s in self.stop_strings)

    def cut(self, text: str, prefix_text: str) -> str:
        """Cut text just after the first stop string that ends past the forced prefix."""
        ends = []
        for stop in self.stop_strings:
            start = text.find(stop, max(0, len(prefix_text) - len(stop) + 1))
            if start >= 0:
                ends.append(start + len(stop))
        return text[: min(ends)] if ends else text


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str] | list[list[int]],
    config: SamplingConfig,
    *,
    num_samples_per_prompt: int = 1,
    prefixes: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
    pixel_values: torch.Tensor | None = None,
) -> Rollout:
    """Sample ``num_samples_per_prompt`` completions for each prompt.

    prompts: strings (tokenized with the tokenizer's defaults, special tokens included) or
        token id lists. Sample ``i * num_samples_per_prompt + k`` is the k-th sample of
        prompt i and has group id i.
    prefixes: optional, one token list per sample (B of them, may be empty): forced
        completion tokens fed before sampling starts. They appear in ``completion_ids``
        with ``completion_mask`` and ``forced_mask`` True and are never checked for eos
        or stop strings.
    generator: source of randomness; when None a generator seeded with ``config.seed`` on
        the model's device is used, so one config gives one rollout.
    pixel_values: for a vision-language model, (P, C, H, W), one image per prompt, passed to
        the prompt prefill only (the KV cache carries the image into every decoding step).
        None (text models) leaves every call exactly as before.

    The model is run as is (the caller chooses train/eval mode) and without gradients.
    """
    if num_samples_per_prompt < 1:
        raise ValueError(f"num_samples_per_prompt must be >= 1, got {num_samples_per_prompt}")
    start = time.perf_counter()
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id to pad with")
    eos_ids = _eos_ids(model, tokenizer)
    prompt_ids = _tokenize_prompts(tokenizer, prompts)
    batch = len(prompt_ids) * num_samples_per_prompt
    if prefixes is None:
        prefixes = [[] for _ in range(batch)]
    if len(prefixes) != batch:
        raise ValueError(
            f"prefixes must hold one token list per sample ({batch} = {len(prompt_ids)} prompts x "
            f"{num_samples_per_prompt}), got {len(prefixes)}"
        )
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop_checker = _StopChecker(tokenizer, config.stop_strings) if config.stop_strings else None
    cache_kwarg = _cache_kwarg(model)

    # Prefill once per prompt, then repeat the cache rows for the samples of each group.
    input_ids, attention_mask, position_ids = _left_pad(prompt_ids, pad_id, device)  # (P, L)
    cache = DynamicCache(config=model.config)
    # Only the last position's logits are needed from the prefill.
    prefill_extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    if pixel_values is not None:
        if pixel_values.shape[0] != len(prompt_ids):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images for {len(prompt_ids)} prompts")
        prefill_extra["pixel_values"] = pixel_values.to(device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_kwarg: cache},
        **prefill_extra,
    )
    logits = out.logits[:, -1, :]  # (P, V)
    next_position = position_ids[:, -1] + 1  # (P,)
    if num_samples_per_prompt > 1:
        cache.batch_repeat_interleave(num_samples_per_prompt)
        logits = logits.repeat_interleave(num_samples_per_prompt, dim=0)  # (B, V)
        attention_mask = attention_mask.repeat_interleave(num_samples_per_prompt, dim=0)  # (B, L)
        next_position = next_position.repeat_interleave(num_samples_per_prompt, dim=0)  # (B,)

    tokens_per_row: list[list[int]] = [[] for _ in range(batch)]
    finish_reason: list[str | None] = [None] * batch
    sampled_count = [0] * batch
    step_tokens: list[torch.Tensor] = []  # each (B,)
    step_logp: list[torch.Tensor] = []
    step_logp_raw: list[torch.Tensor] = []
    step_valid: list[list[bool]] = []
    step_forced: list[list[bool]] = []
    step = 0
    while True:
        sampled, logp = _sample(logits, config, generator)  # (B,) each
        forced_rows = [step < len(prefixes[i]) for i in range(batch)]
        valid_rows = [finish_reason[i] is None for i in range(batch)]
        chosen = sampled.tolist()
        for i in range(batch):
            if not valid_rows[i]:
                chosen[i] = pad_id
            elif forced_rows[i]:
                chosen[i] = int(prefixes[i][step])
        tokens = torch.tensor(chosen, dtype=torch.long, device=device)
        forced = torch.tensor(forced_rows, device=device)
        step_tokens.append(tokens)
        logp_raw = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]  # (B,)
        step_logp.append(torch.where(forced, logp_raw, logp))
        step_logp_raw.append(logp_raw)
        step_valid.append(valid_rows)
        step_forced.append([v and f for v, f in zip(valid_rows, forced_rows)])

        for i in range(batch):
            if not valid_rows[i]:
                continue
            tokens_per_row[i].append(chosen[i])
            if forced_rows[i]:
                continue
            sampled_count[i] += 1
            if chosen[i] in eos_ids:
                finish_reason[i] = "eos"
            elif stop_checker is not None and stop_checker.completes_stop(tokens_per_row[i]):
                finish_reason[i] = "stop"
            elif sampled_count[i] >= config.max_new_tokens:
                finish_reason[i] = "length"
        step += 1
        if all(reason is not None for reason in finish_reason):
            break

        attention_mask = torch.cat(
            [attention_mask, torch.ones((batch, 1), dtype=attention_mask.dtype, device=device)], dim=-1
        )  # (B, L + step)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position[:, None],
            use_cache=True,
            **{cache_kwarg: cache},
        )
        logits = out.logits[:, -1, :]  # (B, V)
        next_position = next_position + 1

    valid = torch.tensor(step_valid, device=device).T  # (B, T)
    completion_ids = torch.stack(step_tokens, dim=1)  # (B, T)
    zero = torch.zeros((), device=device)
    rollout_logp = torch.where(valid, torch.stack(step_logp, dim=1), zero)
    rollout_logp_raw = torch.where(valid, torch.stack(step_logp_raw, dim=1), zero)
    texts = []
    for i in range(batch):
        text = tokenizer.decode(tokens_per_row[i], skip_special_tokens=True)
        if finish_reason[i] == "stop":
            prefix_text = tokenizer.decode(prefixes[i], skip_special_tokens=True)
            text = stop_checker.cut(text, prefix_text)
        texts.append(text)
    num_generated = sum(sampled_count)
    wall_time_s = time.perf_counter() - start
    logger.debug(
        "generated %d tokens for %d samples in %.3f s (%.1f tokens/s)",
        num_generated, batch, wall_time_s, num_generated / max(wall_time_s, 1e-9),
    )
    return Rollout(
        prompt_ids=[prompt_ids[i // num_samples_per_prompt] for i in range(batch)],
        completion_ids=completion_ids,
        completion_mask=valid,
        forced_mask=torch.tensor(step_forced, device=device).T,
        logp=rollout_logp,
        logp_raw=rollout_logp_raw,
        texts=texts,
        finish_reason=[str(reason) for reason in finish_reason],
        group_ids=torch.arange(len(prompt_ids), device=device).repeat_interleave(num_samples_per_prompt),
        num_generated_tokens=num_generated,
        wall_time_s=wall_time_s,
    )


def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int = 0,
    pixel_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log-probs of given completions in one teacher-forced forward pass.

    prompt_ids: B tensors (L_i,) long, unpadded; completion_ids: (B, T) long, right-padded;
    completion_mask: (B, T) bool. Returns (B, T) float32 log-probs under the untempered
    model, 0 where the mask is False. Gradients flow (this is the trainer's ``logp``); wrap
    the call in ``torch.no_grad()`` for the reference model. ``pad_id`` only fills masked
    positions, whose value never reaches a real token. ``pixel_values`` (B, C, H, W): one image
    per row for a vision-language model; None for text models.
    """
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 2:
        raise ValueError(
            f"completion_ids and completion_mask must both be (B, T), got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    if len(prompt_ids) != completion_ids.shape[0]:
        raise ValueError(f"prompt_ids holds {len(prompt_ids)} prompts but completions have B={completion_ids.shape[0]}")
    device = _model_device(model)
    prompt_input, prompt_mask, _ = _left_pad(prompt_ids, pad_id, device)  # (B, L)
    completion_mask = completion_mask.to(device)
    completion_input = completion_ids.to(device).masked_fill(~completion_mask, pad_id)  # (B, T)
    input_ids = torch.cat([prompt_input, completion_input], dim=1)  # (B, L + T)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)  # (B, L + T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    num_completion = completion_ids.shape[1]
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = num_completion + 1
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values.to(device)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    ).logits
    # Logits at position j predict token j + 1: the last T + 1 positions minus the final one.
    logits = logits[:, -(num_completion + 1):-1, :].float()  # (B, T, V)
    token_logits = logits.gather(-1, completion_input[..., None])[..., 0]  # (B, T)
    logp = token_logits - torch.logsumexp(logits, dim=-1)
    return logp.masked_fill(~completion_mask, 0.0)
