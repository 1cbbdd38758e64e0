"""SFT warm start: completion-only labels, loss goes down, atomic checkpoint loads back."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.lm_rl.models import load_policy_model
from training.lm_rl.sft import (
    IGNORE_INDEX,
    collate_right_padded,
    encode_prompt,
    encode_sft_example,
    pad_left,
    sft_warm_start,
)
from training.lm_rl.tasks import get_task, make_split
from training.lm_rl.tokenizer import build_tokenizer

torch.set_num_threads(1)


def test_sft_example_masks_the_prompt_and_ends_with_eos():
    _, tokenizer = load_policy_model("tiny")
    problem = make_split("arithmetic", "train", 1, difficulty=2)[0]
    input_ids, labels = encode_sft_example(tokenizer, problem)
    prompt_ids = encode_prompt(tokenizer, problem.prompt)
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    completion = labels[len(prompt_ids) :]
    assert completion[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion[:-1]) == get_task("arithmetic").trace(problem)


def test_padding_helpers():
    input_ids, labels = collate_right_padded([([5, 6, 7], [-100, 6, 7]), ([8], [8])], 0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    prompts, mask = pad_left([[5, 6, 7], [8]], 0)
    assert prompts.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sft_smoke_run_lowers_loss_and_saves_loadable_checkpoint(tmp_path):
    model, tokenizer = load_policy_model("tiny", seed=0)
    out_dir = tmp_path / "warm"
    metrics = sft_warm_start(
        model,
        tokenizer,
        ["arithmetic"],
        1,
        steps=40,
        batch_size=16,
        lr=3e-3,
        seed=0,
        out_dir=out_dir,
        progress=False,
        eval_problems=4,
        max_new_tokens=32,
    )
    assert metrics["train/loss_final"] < 0.5 * metrics["train/loss_first"]
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert "eval/accuracy/arithmetic" in metrics
    assert metrics["train/tokens_per_s"] > 0
    reloaded, _ = load_policy_model(str(out_dir))
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)
    # Saving again over an existing checkpoint swaps it in place and leaves no temp dirs.
    sft_warm_start(
        model, tokenizer, ["arithmetic"], 1, steps=2, batch_size=2, lr=1e-4, seed=1,
        out_dir=out_dir, progress=False, eval_problems=1, max_new_tokens=4,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm"]


def test_any_local_causal_lm_takes_the_same_path(tmp_path):
    """A Llama-architecture checkpoint (as SmolLM2 is) loads and warm-starts like TinyLM."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_policy_model(str(tmp_path))
    assert isinstance(model, LlamaForCausalLM)
    metrics = sft_warm_start(
        model, loaded_tokenizer, ["countdown", "logic_chain"], [1, 2], steps=3, batch_size=4,
        lr=1e-3, seed=0, progress=False, eval_problems=4, max_new_tokens=8,
    )
    assert set(metrics) >= {"eval/accuracy/countdown", "eval/accuracy/logic_chain"}
