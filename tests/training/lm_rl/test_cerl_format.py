"""Committed-state format: parsing, keep/erase contexts (char and subword tokenizers), SFT examples."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from training.lm_rl import committed
from training.lm_rl.committed import (
    FORMAT_TAGS,
    THINK_CLOSE,
    THINK_OPEN,
    build_contexts,
    committed_sft_examples,
    ensure_format_tokens,
    followup_text,
    parse_committed,
    render_completion,
    tag_ids,
    thought_span,
)
from training.lm_rl.modeling_tiny import TinyLMConfig, TinyLMForCausalLM
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tasks import get_task, make_split
from training.lm_rl.tasks.base import ANSWER_PREFIX
from training.lm_rl.tokenizer import build_tokenizer

torch.set_num_threads(1)

WELL_FORMED = "<think>\n45 + 23 = 68\n68 * 2 = 136\n</think>\n<state>s1=68; ans=136</state>\nAnswer: 136"


def test_answer_prefix_matches_the_task_contract() -> None:
    assert committed.ANSWER_PREFIX == ANSWER_PREFIX


def test_parse_committed_splits_the_parts() -> None:
    parts = parse_committed(WELL_FORMED)
    assert parts is not None
    assert parts.thoughts == "\n45 + 23 = 68\n68 * 2 = 136\n"
    assert parts.state == {"s1": "68", "ans": "136"}
    assert parts.answer == "136"
    assert parts.committed == "<state>s1=68; ans=136</state>\nAnswer: 136"
    assert render_completion(["45 + 23 = 68", "68 * 2 = 136"], [("s1", 68), ("ans", 136)], 136) == WELL_FORMED


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Answer: 136",  # no thoughts, no state
        "<think>\n68\n</think>\nAnswer: 136",  # no state
        "<think>\n68\n<state>ans=136</state>\nAnswer: 136",  # thoughts never closed
        "<think>\n68\n</think>\n<state>ans=136</state>",  # no answer line
        "<think>\n68\n</think>\n<state>ans 136</state>\nAnswer: 136",  # state item not key=value
        "Sure! <think>\n68\n</think>\n<state>ans=136</state>\nAnswer: 136",  # text before the thoughts
        "<think>x</think>\nAnswer: 1\n<state>ans=1</state>",  # answer before the state
        None,
    ],
)
def test_malformed_completions_parse_to_none(text: object) -> None:
    assert parse_committed(text) is None  # type: ignore[arg-type]


def _check_contexts(tokenizer, completion_text: str) -> None:
    prompt = encode_prompt(tokenizer, "Compute (45 + 23) * 2.")
    completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    followup = tokenizer(followup_text("What was the value after step 1?"), add_special_tokens=False)["input_ids"]
    contexts = build_contexts(prompt, completion, followup, tokenizer)
    assert contexts is not None
    start, end = contexts.offset + contexts.span.start, contexts.offset + contexts.span.end
    # keep and erase differ by exactly the thoughts span: removing it from keep gives erase.
    assert contexts.keep[:start] + contexts.keep[end:] == contexts.erase
    assert len(contexts.keep) - len(contexts.erase) == contexts.span.end - contexts.span.start
    assert tokenizer.decode(contexts.keep[start:end]) == "<think>\n45 + 23 = 68\n68 * 2 = 136\n</think>\n"
    assert contexts.keep[: len(prompt)] == prompt and contexts.keep[-len(followup):] == followup
    # The eos that ended the sample is not carried into the middle of a context.
    assert tokenizer.eos_token_id not in contexts.keep[len(prompt):]
    erased = tokenizer.decode(contexts.erase[len(prompt):])
    assert erased == "<state>s1=68; ans=136</state>\nAnswer: 136\nFollow-up: What was the value after step 1?\n"


def test_keep_and_erase_differ_exactly_by_the_thoughts_char_tokenizer() -> None:
    tokenizer = build_tokenizer()
    assert ensure_format_tokens(tokenizer) == []  # char level: nothing to add
    _check_contexts(tokenizer, WELL_FORMED)


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained here on task text (merges split the tags)."""
    family = get_task("math_followup")
    corpus = [family.long_trace(p) + " " + p.prompt for p in make_split("math_followup", "train", 200, 2)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def test_subword_tokenizer_gets_the_tags_as_single_tokens_and_the_model_is_resized() -> None:
    tokenizer = _bpe_tokenizer()
    assert any(len(tag_ids(tokenizer, tag)) > 1 for tag in FORMAT_TAGS)
    model = TinyLMForCausalLM(TinyLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64))
    added = ensure_format_tokens(tokenizer, model)
    assert added and set(added) <= set(FORMAT_TAGS)
    assert all(len(tag_ids(tokenizer, tag)) == 1 for tag in FORMAT_TAGS)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    # Non-special on purpose: the rollout decodes with skip_special_tokens=True.
    ids = tokenizer(WELL_FORMED, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == WELL_FORMED
    assert ensure_format_tokens(tokenizer, model) == []  # idempotent
    _check_contexts(tokenizer, WELL_FORMED)


def test_thought_span_needs_both_tags() -> None:
    tokenizer = build_tokenizer()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert thought_span(ids("Answer: 3"), tokenizer) is None
    assert thought_span(ids("<think>\n1\n<state>a=1</state>"), tokenizer) is None
    assert thought_span(ids("</think><think>"), tokenizer) is None  # close before open
    span = thought_span(ids("<think>x</think>"), tokenizer)
    assert span is not None and (span.start, span.end) == (0, len(THINK_OPEN) + 1 + len(THINK_CLOSE))
    assert build_contexts([1], ids("Answer: 3"), [2], tokenizer) is None


def test_sft_examples_teach_the_followup_on_erase_only_with_a_sufficient_state() -> None:
    tokenizer = build_tokenizer()
    problem = make_split("tool_use", "train", 1, 2)[0]
    short = committed_sft_examples(tokenizer, problem, long_state=False)
    long = committed_sft_examples(tokenizer, problem, long_state=True)
    assert len(short) == 2 and len(long) == 3  # completion + keep (+ erase)
    ids, labels = short[0]
    labelled = tokenizer.decode([t for t in labels if t != -100])
    # Tool results are environment text: never a label.
    assert "<result>" not in labelled and "<call>lookup:" in labelled
    assert tokenizer.decode(ids).count("<result>") == problem.difficulty + 1
    answer = f"Answer: {problem.meta['followup_answer']}"
    for ids, labels in long[1:]:
        assert tokenizer.decode([t for t in labels if t != -100]) == answer + "<eos>"
    prompt_length = len(encode_prompt(tokenizer, problem.prompt))
    assert "<think>" not in tokenizer.decode(long[2][0][prompt_length:])  # the erase context has no thoughts
    assert "<think>" in tokenizer.decode(long[1][0][prompt_length:])
    with pytest.raises(ValueError, match="follow-up"):
        committed_sft_examples(tokenizer, make_split("arithmetic", "train", 1, 1)[0], long_state=True)
