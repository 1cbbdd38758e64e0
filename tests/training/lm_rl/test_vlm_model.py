"""TinyVLM as a Hugging Face model: processor and model save/load round trips, the loading
function's errors, forward-pass input checks, and sampling with images through the
part-1 sampler."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText

from training.lm_rl.models import ModelLoadError, build_tiny_model
from training.lm_rl.rollout import SamplingConfig, generate, sequence_logprobs
from training.lm_rl.tasks import make_split
from training.lm_rl.vlm.models import IMAGE_TOKEN, TINY_VLM, is_vlm_checkpoint, load_vlm, save_vlm
from training.lm_rl.vlm.sampling import VisionPrompts, vlm_greedy_accuracy
from training.lm_rl.vlm.tasks import VISUAL_TASKS, render_problem

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts():
    built = load_vlm(TINY_VLM, seed=0)
    built.model.eval()
    return built


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> Path:
    return save_vlm(parts, tmp_path_factory.mktemp("vlm") / "ckpt")


def _prompts(parts, n: int = 3):
    vision = VisionPrompts.from_parts(parts)
    problems = make_split("bar_compare", "train", n, 1, seed=0)
    return vision, problems, [vision.encode_prompt(p.prompt) for p in problems]


def test_processor_round_trip_and_auto_class(parts, saved: Path) -> None:
    config = json.loads((saved / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "TinyVLMImageProcessor"
    loaded = AutoImageProcessor.from_pretrained(saved, backend="pil")
    assert type(loaded).__name__ == "TinyVLMImageProcessor"
    image = render_problem(VISUAL_TASKS["shape_count"].generate(random.Random(0), 1))
    before = parts.image_processor(image, return_tensors="pt")["pixel_values"]
    after = loaded(image, return_tensors="pt")["pixel_values"]
    assert before.shape == (1, 3, 64, 64) and torch.equal(before, after)
    # mean = std = 0.5: white maps to 1, black to -1.
    assert before.max() <= 1.0 and before.min() >= -1.0


def test_model_round_trip_gives_identical_logits(parts, saved: Path) -> None:
    vision, _, prompts = _prompts(parts)
    ids = torch.tensor([prompts[0]])
    pixels = vision.pixel_values(prompts[:1])
    with torch.no_grad():
        expected = parts.model(input_ids=ids, pixel_values=pixels).logits
        for loader in (AutoModel, AutoModelForImageTextToText):
            model = loader.from_pretrained(saved).eval()
            assert type(model).__name__ == "TinyVLMForConditionalGeneration"
            assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, expected)
    reloaded = load_vlm(str(saved))
    assert reloaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == parts.image_token_id
    assert (reloaded.image_token_id, reloaded.num_image_tokens) == (parts.image_token_id, 16)
    assert is_vlm_checkpoint(str(saved)) and is_vlm_checkpoint(TINY_VLM)


def test_load_vlm_errors_name_the_problem(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither"):
        load_vlm(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_vlm(str(tmp_path))
    text_dir = tmp_path / "text"
    model, tokenizer = build_tiny_model()
    model.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    assert not is_vlm_checkpoint(str(text_dir))
    with pytest.raises(ModelLoadError, match="image placeholder"):
        load_vlm(str(text_dir))
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (no_processor / name).write_bytes((saved / name).read_bytes())
    with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
        load_vlm(str(no_processor))


def test_forward_refuses_inconsistent_inputs(parts) -> None:
    vision, _, prompts = _prompts(parts, 2)
    prompts = [p[:60] for p in prompts]  # same length; the image placeholders come first
    ids = torch.tensor(prompts)
    pixels = vision.pixel_values(prompts)
    model = parts.model
    with torch.no_grad():
        with pytest.raises(ValueError, match="no pixel_values"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="2 sequences"):
            model(input_ids=ids, pixel_values=pixels[:1])
        with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 64, 64\)"):
            model(input_ids=ids, pixel_values=pixels[:, :, :32])
        with pytest.raises(ValueError, match="NaN"):
            model(input_ids=ids, pixel_values=torch.full_like(pixels, float("nan")))
        with pytest.raises(ValueError, match="exactly 16 image placeholder"):
            model(input_ids=ids[:, 1:], pixel_values=pixels)
    with pytest.raises(ValueError, match="reference line"):
        vision.encode_prompt("How many red shapes are there?")
    with pytest.raises(ValueError, match="image placeholder tokens"):
        vision.pixel_values([prompts[0][16:]])


def test_sampling_with_images_matches_teacher_forcing(parts) -> None:
    vision, problems, prompts = _prompts(parts, 3)
    pixels = vision.pixel_values(prompts)
    config = SamplingConfig(max_new_tokens=10, seed=3)
    rollout = generate(parts.model, parts.tokenizer, prompts, config, num_samples_per_prompt=2, pixel_values=pixels)
    assert rollout.completion_ids.shape[0] == 6
    # The placeholder is input-only: never sampled.
    assert not (rollout.completion_ids[rollout.completion_mask] == parts.image_token_id).any()
    with torch.no_grad():
        logp = sequence_logprobs(
            parts.model, rollout.prompt_ids, rollout.completion_ids, rollout.completion_mask,
            pad_id=parts.tokenizer.pad_token_id, pixel_values=pixels.repeat_interleave(2, dim=0),
        )
    assert torch.allclose(logp, rollout.logp_raw, atol=1e-4)
    # The image matters: another image changes the next-token distribution.
    with torch.no_grad():
        own = parts.model(input_ids=torch.tensor([prompts[0]]), pixel_values=pixels[:1]).logits[0, -1]
        other = parts.model(input_ids=torch.tensor([prompts[0]]), pixel_values=pixels[1:2]).logits[0, -1]
    assert not torch.allclose(own, other)
    with pytest.raises(ValueError, match="3 prompts"):
        generate(parts.model, parts.tokenizer, prompts, config, pixel_values=pixels[:2])
    # Hugging Face generate passes pixel_values at the prefill only and works as well.
    out = parts.model.generate(
        input_ids=torch.tensor([prompts[0]]), pixel_values=pixels[:1], max_new_tokens=5, do_sample=False,
        pad_token_id=parts.tokenizer.pad_token_id,
    )
    greedy = generate(parts.model, parts.tokenizer, prompts[:1], SamplingConfig(max_new_tokens=5, temperature=0.0),
                      pixel_values=pixels[:1])
    assert out[0, len(prompts[0]):].tolist() == greedy.completion_ids[0].tolist()
    metrics = vlm_greedy_accuracy(parts.model, vision, problems, max_new_tokens=4)
    assert set(metrics) == {"eval/accuracy", "eval/accuracy/bar_compare"}
