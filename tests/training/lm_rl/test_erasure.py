"""Erasure Dependence Protocol: its statistics on hand-made verdicts, the whole protocol on a
model that learned to keep the follow-up's value only in its thoughts, the CLI on TinyLM and
Hugging Face checkpoints, and its errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from runtime.stats import wilson_interval
from training.lm_rl.committed import committed_sft_examples
from training.lm_rl.erasure import erasure_statistics, evaluate_erasure, probe_followups, run_erasure_eval
from training.lm_rl.models import build_tiny_model
from training.lm_rl.sft import encode_prompt, save_atomically
from training.lm_rl.tasks import make_split

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[3]


def test_statistics_on_a_hand_made_case() -> None:
    keep = [True, True, True, False, False]
    erased = [True, False, False, True, False]
    stats = erasure_statistics(keep, erased)
    assert stats["n"] == 5
    assert stats["acc_keep"] == pytest.approx(3 / 5) and stats["acc_erased"] == pytest.approx(2 / 5)
    assert stats["flip_rate"] == pytest.approx(2 / 3)  # 2 of the 3 kept-correct become wrong
    assert stats["reverse_flip_rate"] == pytest.approx(1 / 2)  # 1 of the 2 kept-wrong becomes right
    assert (stats["count_flips"], stats["count_reverse_flips"]) == (2, 1)
    assert stats["ci95_acc_erased"] == list(wilson_interval(2, 5))
    assert stats["ci95_flip_rate"] == list(wilson_interval(2, 3))
    for key in ("acc_keep", "acc_erased", "flip_rate", "reverse_flip_rate"):
        lo, hi = stats[f"ci95_{key}"]
        assert 0.0 <= lo <= stats[key] <= hi <= 1.0


def test_statistics_with_empty_denominators_report_zero_not_nan() -> None:
    stats = erasure_statistics([False, False], [False, True])
    assert stats["flip_rate"] == 0.0 and stats["count_keep_correct"] == 0
    assert stats["ci95_flip_rate"] == [0.0, 1.0]  # nothing measured: the whole range
    assert erasure_statistics([], [])["acc_keep"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        erasure_statistics([True], [True, False])


def test_protocol_measures_dependence_on_thoughts(memorise) -> None:
    # The model commits only the answer; the follow-up's value (step 1) lives in its thoughts.
    problem = make_split("math_followup", "test", 1, 2, seed=0)[0]
    assert problem.meta["followup_answer"] != problem.answer
    model, tokenizer = memorise(lambda tokenizer: committed_sft_examples(tokenizer, problem, long_state=False))
    stats = evaluate_erasure(model, tokenizer, [problem])
    assert stats["acc_answer"] == 1.0 and stats["malformed_rate"] == 0.0
    assert stats["acc_keep"] == 1.0  # it reads the value from its thoughts ...
    assert stats["acc_erased"] == 0.0  # ... which erasure removes
    assert stats["flip_rate"] == 1.0
    example = stats["examples"][0]
    assert example["keep"] == f"Answer: {problem.meta['followup_answer']}"
    assert example["erase"] != example["keep"]


def test_probes_treat_malformed_completions_as_wrong_without_crashing() -> None:
    model, tokenizer = build_tiny_model(seed=0)
    problems = make_split("science_qa", "test", 3, 1)
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    texts = ["Answer: kif", "<think>\nunfinished", ""]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    result = probe_followups(model, tokenizer, prompts, completions, texts, problems)
    assert result.wellformed == [False] * 3 and result.keep_correct == [False] * 3
    assert result.erase_correct == [False] * 3 and result.generated_tokens == 0
    with pytest.raises(ValueError, match="follow-up"):
        probe_followups(model, tokenizer, prompts[:1], completions[:1], texts[:1],
                        make_split("arithmetic", "test", 1, 1))
    with pytest.raises(ValueError, match="one entry per sample"):
        probe_followups(model, tokenizer, prompts, completions[:2], texts, problems)


def test_run_on_a_tiny_checkpoint_writes_json_and_plot(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model(seed=0)
    save_atomically(model, tokenizer, tmp_path / "model")
    summary = run_erasure_eval(str(tmp_path / "model"), tmp_path / "out", ["logic", "tool_use"], problems=2,
                               max_new_tokens=12)
    saved = json.loads((tmp_path / "out" / "erasure.json").read_text())
    assert set(saved["domains"]) == {"logic", "tool_use"} == set(summary["domains"])
    for stats in saved["domains"].values():
        assert stats["n"] == 2
        for key in ("acc_keep", "acc_erased", "flip_rate", "reverse_flip_rate", "acc_answer", "malformed_rate"):
            assert 0.0 <= stats[key] <= 1.0
    assert (tmp_path / "out" / "erasure.png").stat().st_size > 0


def test_hugging_face_causal_lm_directory(tmp_path: Path) -> None:
    # A Llama-architecture checkpoint with a real byte-level BPE tokenizer trained here on task
    # text: the format tags are not single tokens, so the protocol adds them.
    corpus = [p.prompt for p in make_split("math_followup", "train", 100, 2)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    summary = run_erasure_eval(str(tmp_path / "llama"), tmp_path / "out", ["math"], problems=2, max_new_tokens=8)
    assert summary["domains"]["math"]["n"] == 2
    assert (tmp_path / "out" / "erasure.json").is_file()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", "eval", "erasure", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_refuses_bad_input_with_a_clear_error(tmp_path: Path) -> None:
    result = _cli("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "local checkpoint directory" in result.stderr
    model, tokenizer = build_tiny_model(seed=0)
    save_atomically(model, tokenizer, tmp_path / "model")
    result = _cli("--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"), "--domains", "math,poetry")
    assert result.returncode == 2 and "poetry" in result.stderr and "science_qa" in result.stderr
    assert not (tmp_path / "o" / "erasure.json").exists()
    for bad in ({"problems": 0}, {"difficulty": 0}, {"followup_tokens": 0}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            run_erasure_eval(str(tmp_path / "model"), tmp_path / "o", ["math"], **{"problems": 1, **bad})
