"""Tests for the rollout engine on a tiny random Llama and a character-level tokenizer."""
from __future__ import annotations

import copy
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from training.lm_rl.rollout import Rollout, SamplingConfig, generate, sequence_logprobs

torch.set_num_threads(1)

PAD, EOS = 0, 1
CHARS = string.ascii_lowercase + string.digits + " .,+=\n" + string.ascii_uppercase[:19]  # 61 + 3 special = 64


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2}
    for char in CHARS:
        vocab[char] = len(vocab)
    # BPE without merges over the raw string is a character-level tokenizer.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )
    assert len(tokenizer) == config.vocab_size
    return LlamaForCausalLM(config).eval()


PROMPTS = ["12+3=", "a", "hello world.", "7 7"]


def _check_consistent(rollout: Rollout, pad_id: int = PAD) -> None:
    assert rollout.completion_ids.dtype == torch.long
    assert rollout.completion_mask.dtype == torch.bool and rollout.forced_mask.dtype == torch.bool
    assert not (rollout.forced_mask & ~rollout.completion_mask).any()
    assert (rollout.completion_ids[~rollout.completion_mask] == pad_id).all()
    assert (rollout.logp[~rollout.completion_mask] == 0).all()
    # The mask is a prefix of each row: no gaps.
    lengths = rollout.completion_mask.sum(-1)
    positions = torch.arange(rollout.completion_mask.shape[1])
    assert torch.equal(rollout.completion_mask, positions[None, :] < lengths[:, None])


def test_greedy_matches_hf_generate_on_left_padded_batch(model, tokenizer) -> None:
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    rollout = generate(model, tokenizer, PROMPTS, config)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    expected = model.generate(
        **batch, max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=EOS
    )[:, batch["input_ids"].shape[1]:]
    assert torch.equal(rollout.completion_ids, expected)
    assert (rollout.logp[rollout.completion_mask] == 0).all()
    _check_consistent(rollout)
    assert rollout.num_generated_tokens == int(rollout.completion_mask.sum())
    assert rollout.tokens_per_s > 0


def test_same_seed_same_samples_different_seed_different(model, tokenizer) -> None:
    first = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=16, seed=3), num_samples_per_prompt=2)
    again = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=16, seed=3), num_samples_per_prompt=2)
    other = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=16, seed=4), num_samples_per_prompt=2)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logp, again.logp)
    assert first.texts == again.texts
    assert not torch.equal(first.completion_ids, other.completion_ids[:, : first.completion_ids.shape[1]])
    explicit = generate(
        model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=16), num_samples_per_prompt=2,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(first.completion_ids, explicit.completion_ids)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_sequence_logprobs_matches_recorded_logp_raw(model, tokenizer, temperature, top_p) -> None:
    config = SamplingConfig(max_new_tokens=20, temperature=temperature, top_p=top_p, seed=1)
    rollout = generate(model, tokenizer, PROMPTS, config, num_samples_per_prompt=3)
    recomputed = sequence_logprobs(model, rollout.prompt_ids, rollout.completion_ids, rollout.completion_mask)
    assert recomputed.shape == rollout.completion_ids.shape
    torch.testing.assert_close(recomputed, rollout.logp_raw, atol=1e-5, rtol=0)
    _check_consistent(rollout)


def test_sequence_logprobs_carries_gradient(model, tokenizer) -> None:
    rollout = generate(model, tokenizer, PROMPTS[:2], SamplingConfig(max_new_tokens=4, seed=0))
    logp = sequence_logprobs(model, rollout.prompt_ids, rollout.completion_ids, rollout.completion_mask)
    logp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_tempered_nucleus_logp_is_log_prob_under_filtered_distribution(model, tokenizer) -> None:
    temperature, top_p = 0.7, 0.6
    config = SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=top_p, seed=5)
    rollout = generate(model, tokenizer, ["12+3="], config, num_samples_per_prompt=64)
    prompt = rollout.prompt_ids[0][None, :]
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].float()
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    kept = order[keep]
    filtered = torch.zeros_like(probs)
    filtered[kept] = probs[kept] / probs[kept].sum()
    tokens = rollout.completion_ids[:, 0]
    assert torch.isin(tokens, kept).all()
    torch.testing.assert_close(rollout.logp[:, 0], filtered[tokens].log(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.logp_raw[:, 0], torch.log_softmax(logits, -1)[tokens], atol=1e-5, rtol=0)


def test_tiny_top_p_is_argmax_with_logp_zero(model, tokenizer) -> None:
    nucleus = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, top_p=1e-6, seed=2))
    greedy = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0))
    assert torch.equal(nucleus.completion_ids, greedy.completion_ids)
    assert (nucleus.logp == 0).all()


def test_stop_string_cuts_text_and_mask(model, tokenizer) -> None:
    prompt = "hello world."
    free = generate(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=30, temperature=0.0))
    text = free.texts[0]
    ids = free.completion_ids[0].tolist()
    # char_end[k]: length of the text decoded from tokens 0..k (special tokens decode to "").
    char_end = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    # A two-character stop string completed by token k, first occurring there.
    k = next(
        k for k in range(3, len(ids))
        if ids[k] > 2 and char_end[k] >= 2 and text.find(text[char_end[k] - 2:char_end[k]]) == char_end[k] - 2
    )
    end = char_end[k]
    stop = text[end - 2:end]
    config = SamplingConfig(max_new_tokens=30, temperature=0.0, stop_strings=(stop,))
    stopped = generate(model, tokenizer, [prompt], config)
    assert stopped.finish_reason == ["stop"]
    assert stopped.texts[0] == text[:end]
    assert int(stopped.completion_mask.sum()) == k + 1  # the stop-completing token is included
    assert stopped.completion_ids[0, : k + 1].tolist() == ids[: k + 1]
    _check_consistent(stopped)


def test_eos_ends_sequence_and_pads_after(model, tokenizer) -> None:
    greedy = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0))
    # Declare row 0's fourth greedy token an end-of-sequence token of the model.
    eos_model = copy.deepcopy(model)
    stop_token = int(greedy.completion_ids[0, 3])
    eos_model.generation_config.eos_token_id = [EOS, stop_token]
    ended = generate(eos_model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0))
    first = int((greedy.completion_ids[0] == stop_token).nonzero()[0])
    assert ended.finish_reason[0] == "eos"
    assert int(ended.completion_mask[0].sum()) == first + 1
    assert int(ended.completion_ids[0, first]) == stop_token
    assert (ended.completion_ids[0, first + 1:] == PAD).all()
    _check_consistent(ended)


def test_forced_prefixes_appear_verbatim_and_are_flagged(model, tokenizer) -> None:
    prompts = ["12+3=", "a"]
    prefixes = [tokenizer("15")["input_ids"], [], tokenizer("xyz ")["input_ids"], tokenizer("q")["input_ids"]]
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    rollout = generate(model, tokenizer, prompts, config, num_samples_per_prompt=2, prefixes=prefixes)
    _check_consistent(rollout)
    for row, prefix in enumerate(prefixes):
        n = len(prefix)
        assert rollout.completion_ids[row, :n].tolist() == prefix
        assert rollout.forced_mask[row].tolist() == [True] * n + [False] * (rollout.forced_mask.shape[1] - n)
        assert rollout.texts[row].startswith(tokenizer.decode(prefix))
        assert torch.equal(rollout.logp[row, :n], rollout.logp_raw[row, :n])
        # Greedy continuation of a forced prefix equals greedy decoding of prompt + prefix.
        prompt_ids = tokenizer(prompts[row // 2])["input_ids"]
        direct = generate(model, tokenizer, [prompt_ids + prefix], config)
        length = int(direct.completion_mask.sum())
        assert rollout.completion_ids[row, n:n + length].tolist() == direct.completion_ids[0, :length].tolist()
    assert rollout.num_generated_tokens == int((rollout.completion_mask & ~rollout.forced_mask).sum())
    recomputed = sequence_logprobs(model, rollout.prompt_ids, rollout.completion_ids, rollout.completion_mask)
    torch.testing.assert_close(recomputed, rollout.logp_raw, atol=1e-5, rtol=0)


def test_num_samples_per_prompt_groups_and_shared_prefill(model, tokenizer) -> None:
    config = SamplingConfig(max_new_tokens=8, temperature=0.0)
    single = generate(model, tokenizer, PROMPTS, config)
    grouped = generate(model, tokenizer, PROMPTS, config, num_samples_per_prompt=3)
    assert grouped.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(grouped.prompt_ids) == 12 and torch.equal(grouped.prompt_ids[4], single.prompt_ids[1])
    assert torch.equal(grouped.completion_ids, single.completion_ids.repeat_interleave(3, dim=0))
    assert grouped.texts == [t for t in single.texts for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -0.1}, "temperature"),
        ({"max_new_tokens": 4, "temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 4, "stop_strings": "\n"}, "stop_strings"),
        ({"max_new_tokens": 4, "stop_strings": ("",)}, "stop_strings"),
        ({"max_new_tokens": 4, "seed": "0"}, "seed"),
    ],
)
def test_bad_config_raises_naming_field(kwargs, field) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        SamplingConfig(**kwargs)


def test_bad_generate_arguments_raise(model, tokenizer) -> None:
    config = SamplingConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="prefixes"):
        generate(model, tokenizer, PROMPTS, config, prefixes=[[3]])
    with pytest.raises(ValueError, match="num_samples_per_prompt"):
        generate(model, tokenizer, PROMPTS, config, num_samples_per_prompt=0)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(model, tokenizer, [[3], []], config)
