"""TinyLM, its character tokenizer and load_policy_model behave like any Hugging Face causal LM."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig

from training.lm_rl.modeling_tiny import TinyLMConfig, TinyLMForCausalLM
from training.lm_rl.models import ModelLoadError, load_policy_model
from training.lm_rl.tasks import TASKS
from training.lm_rl.tokenizer import build_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> TinyLMForCausalLM:
    torch.manual_seed(0)
    config = TinyLMConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128
    )
    return TinyLMForCausalLM(config).eval()


def _manual_greedy(model: TinyLMForCausalLM, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    sequence = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(sequence, use_cache=False).logits  # (1, T, V), full recompute
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence


def test_tokenizer_round_trips_every_task_prompt_and_trace(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(0)
    for family in TASKS.values():
        for difficulty in (1, 2, 4):
            for _ in range(20):
                problem = family.generate(rng, difficulty)
                for text in (problem.prompt, family.trace(problem)):
                    for tok in (tokenizer, reloaded):
                        ids = tok(text, add_special_tokens=False)["input_ids"]
                        assert tok.unk_token_id not in ids
                        assert len(ids) == len(text)  # one token per character
                        assert tok.decode(ids) == text


def test_tokenizer_special_tokens_and_left_padding(tokenizer):
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token} == {
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    }
    batch = tokenizer(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert tokenizer.decode(tokenizer("a\u20acb")["input_ids"]) == "a<unk>b"


def test_config_aliases_and_validation():
    config = TinyLMConfig(num_layers=3, num_heads=2, hidden_size=32)
    assert (config.num_hidden_layers, config.num_attention_heads) == (3, 2)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        TinyLMConfig(hidden_size=30, num_heads=4)


def test_save_and_load_through_auto_class_gives_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, TinyLMForCausalLM)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    input_ids = torch.randint(4, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_generate_with_cache_matches_uncached_greedy(model):
    input_ids = torch.randint(4, model.config.vocab_size, (1, 7))
    generated = model.generate(
        input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert generated.tolist() == _manual_greedy(model, input_ids, 12).tolist()


def test_left_padded_batch_continues_like_unpadded(model):
    short = torch.randint(4, model.config.vocab_size, (1, 5))
    long = torch.randint(4, model.config.vocab_size, (1, 9))
    pad = torch.zeros(1, 4, dtype=torch.long)
    input_ids = torch.cat([torch.cat([pad, short], dim=1), long])  # (2, 9), row 0 left-padded
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    batched = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert batched[0, 9:].tolist() == _manual_greedy(model, short, 10)[0, 5:].tolist()
    assert batched[1, 9:].tolist() == _manual_greedy(model, long, 10)[0, 9:].tolist()


def test_manual_cache_step_matches_full_forward(model):
    input_ids = torch.randint(4, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        prefix = model(input_ids[:, :5], use_cache=True)
        step = model(input_ids[:, 5:], cache=prefix.cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 5:], rtol=1e-4, atol=1e-5)


def test_loss_decreases_when_overfitting_one_batch(tokenizer):
    torch.manual_seed(0)
    config = TinyLMConfig(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4)
    model = TinyLMForCausalLM(config).train()
    input_ids = torch.randint(4, config.vocab_size, (4, 16))
    labels = input_ids.clone()
    labels[:, :4] = -100  # masked positions carry no loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_load_policy_model_tiny_is_seeded_and_round_trips(tmp_path):
    model_a, tokenizer = load_policy_model("tiny", seed=3)
    model_b, _ = load_policy_model("tiny", seed=3)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert tokenizer.padding_side == "left"
    model_a.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_policy_model(str(tmp_path))
    assert isinstance(reloaded, TinyLMForCausalLM)
    assert len(reloaded_tokenizer) == len(tokenizer)


def test_load_policy_model_rejects_non_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="neither 'tiny' nor a local checkpoint directory"):
        load_policy_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_policy_model(str(tmp_path))
    bert_dir = tmp_path / "bert"
    BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    ).save_pretrained(bert_dir)
    with pytest.raises(ModelLoadError, match="not a decoder-only causal LM"):
        load_policy_model(str(bert_dir))
    assert issubclass(ModelLoadError, ValueError)
