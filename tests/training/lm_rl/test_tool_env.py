"""Tool environment: the safe calculator, the lookup tool, error results, the multi-turn sampler."""
from __future__ import annotations

import pytest
import torch

from training.lm_rl.committed import RESULT_CLOSE, RESULT_OPEN, tool_result_mask
from training.lm_rl.models import build_tiny_model
from training.lm_rl.rollout import SamplingConfig
from training.lm_rl.sft import encode_prompt
from training.lm_rl.tasks import get_task, make_split
from training.lm_rl.tool_env import (
    Calculator,
    KeyValueLookup,
    ToolEnv,
    ToolError,
    generate_with_tools,
    max_forced_tokens,
    tool_rollout_context,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("3*(4+5)", "27"), ("2**10", "1024"), ("-7 + 2", "-5"), ("7/2", "3.5"), ("8/2", "4"), ("7//2", "3"),
     ("7 % 3", "1"), ("1/3", "0.333333"), ("2.5*2", "5")],
)
def test_calculator_computes_arithmetic(expression: str, expected: str) -> None:
    assert Calculator()(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "not allowed"),
        ("open('/etc/passwd')", "not allowed"),
        ("x + 1", "not allowed"),
        ("(1).__class__", "not allowed"),
        ("'a' * 3", "only numbers"),
        ("lambda: 1", "not allowed"),
        ("[1, 2]", "not allowed"),
        ("1 if 1 else 2", "not allowed"),
        ("True + 1", "only numbers"),
        ("1 < 2", "not allowed"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("10**12 * 10", "too large"),
        ("999999999999 + 2", "too large"),
        ("9**9**9", "exponent"),
        ("2**-1", "exponent"),
        ("2**0.5", "exponent"),
        ("1e308*10", "too large"),
        ("3*(4+", "cannot parse"),
        ("", "empty"),
        ("1+" * 150 + "1", "longer than"),
        ("+".join(["1"] * 40), "parts"),
    ],
)
def test_calculator_refuses_everything_else(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        Calculator()(expression)


def test_lookup_normalises_keys_and_refuses_unknown_ones() -> None:
    lookup = KeyValueLookup({"s1 pen": 7, "S2  Cup": "12"})
    assert lookup(" s1   PEN ") == "7" and lookup("s2 cup") == "12"
    with pytest.raises(ToolError, match="unknown key"):
        lookup("s1 pon")
    with pytest.raises(ToolError, match="empty key"):
        lookup("   ")


class _BrokenTool:
    def __call__(self, argument: str) -> str:
        raise RuntimeError("bug inside a tool")


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ("calc: 2+3", "5"),
        ("lookup: s1 pen", "7"),
        ("calc: 1/0", "error: division by zero"),
        ("calc: 10**12*100", "error: number too large"),
        ("calc: import os", "error: cannot parse"),
        ("lookup: nothing here", "error: unknown key"),
        ("search: cats", "error: unknown tool 'search'"),
        ("no colon at all", "error: malformed call"),
        (": 2+3", "error: malformed call"),
        ("broken: x", "error: tool failed (RuntimeError)"),
    ],
)
def test_env_answers_every_call_with_a_result_string(call: str, expected: str) -> None:
    env = ToolEnv({"calc": Calculator(), "lookup": KeyValueLookup({"s1 pen": 7}), "broken": _BrokenTool()})
    assert env.execute(call).startswith(expected)


def test_env_respond_reads_only_the_current_call_and_caps_results() -> None:
    env = ToolEnv({"calc": Calculator(), "echo": lambda arg: arg * 100})
    earlier = "<call>calc: 1+1</call><result>2</result>\n"
    assert env.respond(earlier + "<call>calc: 2*3</call>") == f"{RESULT_OPEN}6{RESULT_CLOSE}"
    # A close tag with no open tag after the previous result is malformed, not the old call again.
    assert "malformed" in env.respond(earlier + "oops</call>")
    long = env.respond("<call>echo: ab</call>")
    assert len(long) == len(RESULT_OPEN) + 64 + len(RESULT_CLOSE)
    with pytest.raises(ValueError, match="identifier"):
        ToolEnv({"not a name": Calculator()})


def _tool_episode(text_after_prompt: str, prompt: str):
    """Examples of one episode: the tool results are in the context but not the labels (the
    environment writes them)."""

    def examples(tokenizer):
        prompt_ids = encode_prompt(tokenizer, prompt)
        completion = tokenizer(text_after_prompt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        environment = tool_result_mask(completion, tokenizer)
        labels = [-100 if env else token for token, env in zip(completion, environment)]
        return [(prompt_ids + completion, [-100] * len(prompt_ids) + labels)]

    return examples


@pytest.fixture(scope="module")
def scripted(memorise) -> tuple[torch.nn.Module, object, str]:
    # The memorised episode holds a division by zero, a malformed call and a good call, and
    # every result the environment will append; what follows each result is the model's own.
    text = ("<call>calc: 1/0</call><result>error: division by zero</result>\n"
            "<call>x</call><result>error: malformed call, expected 'NAME: ARGUMENT'</result>\n"
            "<call>calc: 2+3</call><result>5</result>\nAnswer: 5")
    model, tokenizer = memorise(_tool_episode(text, "Q"), steps=400)
    return model, tokenizer, text


def test_multi_turn_sampler_appends_forced_results_and_never_raises(scripted) -> None:
    model, tokenizer, text = scripted
    env = ToolEnv({"calc": Calculator()})
    rollout = generate_with_tools(model, tokenizer, [encode_prompt(tokenizer, "Q")],
                                  SamplingConfig(max_new_tokens=200, temperature=0.0), env, max_turns=4)
    assert rollout.texts[0] == text
    assert rollout.finish_reason == ["eos"]
    ids = rollout.completion_ids[0][rollout.completion_mask[0]].tolist()
    forced = rollout.forced_mask[0][rollout.completion_mask[0]].tolist()
    forced_text = tokenizer.decode([t for t, f in zip(ids, forced) if f])
    # Exactly the three results are forced (environment tokens, no loss on them).
    assert forced_text == ("<result>error: division by zero</result>"
                           "<result>error: malformed call, expected 'NAME: ARGUMENT'</result><result>5</result>")
    assert rollout.num_generated_tokens == sum(1 for f in forced if not f)
    assert torch.isfinite(rollout.logp_raw[0][rollout.completion_mask[0]]).all()


def test_turn_limit_stops_results(scripted) -> None:
    model, tokenizer, _ = scripted
    env = ToolEnv({"calc": Calculator()})
    rollout = generate_with_tools(model, tokenizer, [encode_prompt(tokenizer, "Q")],
                                  SamplingConfig(max_new_tokens=200, temperature=0.0), env, max_turns=1)
    # One call answered; after that '</call>' no longer stops sampling and nothing is forced
    # (the memorised model then writes result-like text itself, as sampled tokens).
    assert int(rollout.forced_mask.sum()) == len("<result>error: division by zero</result>")
    with pytest.raises(ValueError, match="max_turns"):
        generate_with_tools(model, tokenizer, [[1]], SamplingConfig(max_new_tokens=4), env, max_turns=-1)


def test_sampling_budget_counts_sampled_tokens_only(scripted) -> None:
    model, tokenizer, _ = scripted
    env = ToolEnv({"calc": Calculator()})
    rollout = generate_with_tools(model, tokenizer, [encode_prompt(tokenizer, "Q")] * 2,
                                  SamplingConfig(max_new_tokens=30, temperature=0.0), env, max_turns=4,
                                  num_samples_per_prompt=2)
    sampled = (rollout.completion_mask & ~rollout.forced_mask).sum(dim=1)
    assert sampled.tolist() == [30] * 4 and rollout.finish_reason == ["length"] * 4
    assert rollout.group_ids.tolist() == [0, 0, 1, 1]


def test_tool_rollout_context_samples_multi_turn_groups() -> None:
    family = get_task("tool_use")
    model, tokenizer = build_tiny_model(seed=1)
    ctx = tool_rollout_context(
        family.tool_env, family.max_turns, model=model, tokenizer=tokenizer,
        sampling=SamplingConfig(max_new_tokens=16), generator=torch.Generator().manual_seed(0), group_size=3,
        score=lambda texts, problems: (torch.zeros(len(texts)), torch.zeros(len(texts))),
        encode_prompt=lambda text: encode_prompt(tokenizer, text),
    )
    problem = make_split("tool_use", "train", 1, 1)[0]
    rollout = ctx.sample([ctx.encode_prompt(problem.prompt)], 3)
    assert rollout.completion_ids.shape[0] == 3
    assert max_forced_tokens(family) >= int(rollout.forced_mask.sum(dim=1).max())
    assert max_forced_tokens(get_task("arithmetic")) == 0
