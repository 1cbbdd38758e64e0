"""Policy diagnostics every LM RL method is measured with, on the same footing.

Why a separate module: the method comparisons of docs/papers/lm-rl.md report more than
accuracy. EqLen (2604.17328) is judged on response-length drift, TGC (2604.13088) on the
drift of log-probs of frequent, weak-credit tokens and on entropy collapse. A benchmark
needs those numbers for plain GRPO and every other method too, so they are computed here
from the model alone, never from a method's internals:

- ``greedy_response_length``: mean greedy completion length on held-out prompts; the drift
  is its change over training.
- ``FrequentTokenProbe``: a fixed probe set built once from the completions the initial
  policy samples on held-out prompts. Its positions whose token is among the ``top_k`` most
  frequent sampled tokens are the "frequent" positions; ``measure`` returns the mean
  log-prob of those tokens under the current policy (drift = current - initial) and the
  mean entropy of the full next-token distribution over all probe contexts.
- ``sampled_entropy_estimate``: the per-step Monte-Carlo entropy estimate -mean log pi(y_t)
  over the sampled tokens of a batch (no extra forward pass).

Shapes: N probe completions, T the longest probe completion, V the vocabulary size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from training.lm_rl.rollout import SamplingConfig, generate
from training.lm_rl.sft import pad_left


@torch.no_grad()
def greedy_response_length(
    model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int
) -> float:
    """Mean number of tokens the policy produces greedily (eos included) for token-id prompts.

    Counted like the trainer's ``charts/completion_length``: every emitted token up to and
    including eos, at most ``max_new_tokens``.
    """
    if not prompts:
        raise ValueError("greedy_response_length needs at least one prompt")
    rollout = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    return float(rollout.completion_mask.sum(dim=1).float().mean())


def sampled_entropy_estimate(logp: torch.Tensor, mask: torch.Tensor) -> float:
    """-mean of log pi over sampled tokens: an unbiased estimate of the policy's per-token
    entropy when the tokens were drawn from pi itself (temperature 1, top_p 1); at other
    sampling settings it is the cross-entropy of pi under the sampling distribution.

    logp: (B, T) log-probs of the sampled tokens; mask: (B, T) bool, the sampled tokens.
    """
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must have the same (B, T) shape")
    mask = mask.bool()
    count = int(mask.sum())
    if count == 0:
        return 0.0
    return float(-(logp.float() * mask).sum() / count)


@torch.no_grad()
def token_logp_and_entropy(
    model: torch.nn.Module,
    prompt_ids: list[torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-prob of each completion token and entropy of the full next-token
    distribution at its context.

    prompt_ids: B tensors (L_i,); completion_ids, completion_mask: (B, T).
    Returns (logp (B, T), entropy (B, T)) float32 on the CPU, 0 where the mask is False.
    Rows go through the model ``batch_size`` at a time, so a large vocabulary never needs
    a (B, T, V) tensor for the whole probe.
    """
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 2:
        raise ValueError(
            f"completion_ids and completion_mask must both be (B, T), got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    if len(prompt_ids) != completion_ids.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompts for {completion_ids.shape[0]} completions")
    device = next(model.parameters()).device
    width = completion_ids.shape[1]
    logp_rows, entropy_rows = [], []
    for start in range(0, len(prompt_ids), batch_size):
        stop = start + batch_size
        prompt_input, prompt_mask = pad_left([p.tolist() for p in prompt_ids[start:stop]], pad_id)  # (b, L)
        mask = completion_mask[start:stop].bool().to(device)  # (b, T)
        tokens = completion_ids[start:stop].to(device).masked_fill(~mask, pad_id)  # (b, T)
        input_ids = torch.cat([prompt_input.to(device), tokens], dim=1)  # (b, L + T)
        attention_mask = torch.cat([prompt_mask.to(device), mask.long()], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        # Position j predicts token j + 1: the T positions before the last one.
        log_probs = torch.log_softmax(logits[:, -(width + 1):-1, :].float(), dim=-1)  # (b, T, V)
        logp = log_probs.gather(-1, tokens[..., None])[..., 0]  # (b, T)
        entropy = torch.special.entr(log_probs.exp()).sum(-1)  # (b, T); entr(0) = 0, no NaN
        logp_rows.append(logp.masked_fill(~mask, 0.0).cpu())
        entropy_rows.append(entropy.masked_fill(~mask, 0.0).cpu())
    return torch.cat(logp_rows), torch.cat(entropy_rows)


def frequent_token_ids(tokens: torch.Tensor, mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` most frequent token ids among the masked tokens, most frequent first.

    tokens, mask: (B, T). Equal counts are ordered by token id so the set is deterministic.
    Returns (k,) long with k = min(top_k, number of distinct tokens).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    values = tokens[mask.bool()].long().cpu()
    if values.numel() == 0:
        raise ValueError("no masked tokens to count: every probe completion is empty")
    counts = torch.bincount(values)  # (max id + 1,)
    present = torch.nonzero(counts, as_tuple=True)[0]  # ascending token ids
    # A stable sort on descending counts keeps ascending ids among ties.
    order = torch.sort(counts[present], descending=True, stable=True).indices
    return present[order][:top_k]


@dataclass
class ProbeReading:
    """The policy measured on a probe set."""

    frequent_token_logp: float  # mean log pi of the frequent tokens at their probe positions
    entropy: float  # mean next-token entropy (nats) over all probe contexts


@dataclass
class FrequentTokenProbe:
    """A fixed set of (context, token) probes and the initial policy's reading of it.

    Built once (``build``) from the initial policy; ``measure`` reads any later policy on
    the same positions, so ``drift`` compares like with like. ``state_dict`` holds only
    tensors and plain numbers, loadable with ``torch.load(weights_only=True)``.
    """

    prompt_ids: list[torch.Tensor]  # N tensors (L_i,) long
    completion_ids: torch.Tensor  # (N, T) long
    completion_mask: torch.Tensor  # (N, T) bool: the probe contexts (every completion token)
    frequent_mask: torch.Tensor  # (N, T) bool: positions whose token is a frequent token
    frequent_tokens: torch.Tensor  # (k,) long, most frequent first
    initial: ProbeReading

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        top_k: int,
        generator: torch.Generator | None = None,
    ) -> FrequentTokenProbe:
        """Sample one completion per prompt with ``sampling`` and mark its frequent tokens.

        The initial reading is taken with ``measure`` (the same teacher-forced pass used
        later), so the drift of the unchanged policy is exactly 0.
        """
        rollout = generate(model, tokenizer, prompts, sampling, generator=generator)
        mask = rollout.completion_mask.cpu()  # (N, T)
        tokens = rollout.completion_ids.cpu()  # (N, T)
        frequent = frequent_token_ids(tokens, mask, top_k)
        probe = cls(
            prompt_ids=[p.cpu() for p in rollout.prompt_ids],
            completion_ids=tokens,
            completion_mask=mask,
            frequent_mask=mask & torch.isin(tokens, frequent),
            frequent_tokens=frequent,
            initial=ProbeReading(0.0, 0.0),
        )
        probe.initial = probe.measure(model, _pad_id(tokenizer))
        return probe

    def measure(self, model: torch.nn.Module, pad_id: int) -> ProbeReading:
        """Mean frequent-token log-prob and mean entropy of ``model`` on the probe positions."""
        logp, entropy = token_logp_and_entropy(model, self.prompt_ids, self.completion_ids, self.completion_mask, pad_id)
        frequent = self.frequent_mask.float()
        contexts = self.completion_mask.float()
        return ProbeReading(
            frequent_token_logp=float((logp * frequent).sum() / frequent.sum()),
            entropy=float((entropy * contexts).sum() / contexts.sum()),
        )

    def drift(self, model: torch.nn.Module, pad_id: int) -> tuple[ProbeReading, ProbeReading]:
        """(current reading, current - initial) for ``model``."""
        now = self.measure(model, pad_id)
        delta = ProbeReading(
            frequent_token_logp=now.frequent_token_logp - self.initial.frequent_token_logp,
            entropy=now.entropy - self.initial.entropy,
        )
        return now, delta

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompt_ids": [p.clone() for p in self.prompt_ids],
            "completion_ids": self.completion_ids.clone(),
            "completion_mask": self.completion_mask.clone(),
            "frequent_mask": self.frequent_mask.clone(),
            "frequent_tokens": self.frequent_tokens.clone(),
            "initial_frequent_token_logp": self.initial.frequent_token_logp,
            "initial_entropy": self.initial.entropy,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FrequentTokenProbe:
        expected = {
            "prompt_ids", "completion_ids", "completion_mask", "frequent_mask", "frequent_tokens",
            "initial_frequent_token_logp", "initial_entropy",
        }
        if set(state) != expected:
            raise ValueError(f"probe state must have keys {sorted(expected)}, got {sorted(state)}")
        return cls(
            prompt_ids=list(state["prompt_ids"]),
            completion_ids=state["completion_ids"],
            completion_mask=state["completion_mask"].bool(),
            frequent_mask=state["frequent_mask"].bool(),
            frequent_tokens=state["frequent_tokens"],
            initial=ProbeReading(float(state["initial_frequent_token_logp"]), float(state["initial_entropy"])),
        )


@torch.no_grad()
def policy_diagnostics(
    start: torch.nn.Module,
    final: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    top_k: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Everything above for one trained policy against the policy it started from.

    The probe is sampled from ``start`` with a generator seeded by ``seed``, so every method
    trained from the same start is read on the same positions. Returns response_length and
    response_length_drift (greedy, tokens), frequent_token_logp(_drift) and entropy(_drift).
    """
    device = next(final.parameters()).device
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    probe = FrequentTokenProbe.build(start, tokenizer, prompts, sampling, top_k, generator=generator)
    now, delta = probe.drift(final, _pad_id(tokenizer))
    length_start = greedy_response_length(start, tokenizer, prompts, max_new_tokens)
    length_final = greedy_response_length(final, tokenizer, prompts, max_new_tokens)
    return {
        "response_length": length_final,
        "response_length_drift": length_final - length_start,
        "frequent_token_logp": now.frequent_token_logp,
        "frequent_token_logp_drift": delta.frequent_token_logp,
        "entropy": now.entropy,
        "entropy_drift": delta.entropy,
    }


def _pad_id(tokenizer: Any) -> int:
    # The same fallback as the rollout engine: pad with eos when the tokenizer has no pad.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


__all__ = [
    "FrequentTokenProbe",
    "ProbeReading",
    "frequent_token_ids",
    "greedy_response_length",
    "policy_diagnostics",
    "sampled_entropy_estimate",
    "token_logp_and_entropy",
]
