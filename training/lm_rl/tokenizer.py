"""Character-level tokenizer for the procedural LM tasks, as a Hugging Face fast tokenizer.

Why characters: the task prompts and traces (training/lm_rl/tasks) are short ASCII strings of
digits, operators, variable names and fixed instructions, so one token per character keeps the
vocabulary tiny (~100 ids), makes every digit its own token (which small models need to learn
carry arithmetic) and round-trips any text over the alphabet exactly. Built with the
`tokenizers` library and wrapped as `PreTrainedTokenizerFast`, so it saves with
`save_pretrained`, loads with `AutoTokenizer.from_pretrained(dir)`, and the LM-RL pipelines
treat it exactly like the tokenizer of any pretrained causal LM.

Vocabulary: the four special tokens (pad, bos, eos, unk; ids 0-3), then newline, tab and the
95 printable ASCII characters. A character outside that alphabet maps to unk.
"""
from __future__ import annotations

import logging

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Newline and tab, then printable ASCII in code-point order (space .. '~'); carriage return
# and form feeds are left out because no task emits them.
ALPHABET: tuple[str, ...] = ("\n", "\t") + tuple(chr(c) for c in range(32, 127))


def build_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer over `ALPHABET` with pad/bos/eos/unk specials.

    Padding side is left: batched generation appends new tokens on the right, so prompts must
    end flush at the same column.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    # A BPE model with no merges is a pure character lookup; the Split pre-tokenizer with an
    # empty pattern cuts the text into single characters (spaces and newlines kept as tokens),
    # and the Fuse decoder concatenates them back without inserting separators.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=model_max_length,
        # Cleanup would delete the spaces before punctuation that prompts contain ("a - b").
        clean_up_tokenization_spaces=False,
    )
    logger.debug("built character tokenizer with %d ids", len(tokenizer))
    return tokenizer
