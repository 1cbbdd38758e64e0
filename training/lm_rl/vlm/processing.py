"""The image processor of TinyVLM, a ``transformers`` image processor on the PIL backend.

It resizes to the model's square input size (bilinear), rescales to [0, 1] and normalises to
[-1, 1] (mean = std = 0.5 per channel), channels first: ``processor(images,
return_tensors="pt")["pixel_values"]`` is (B, 3, H, W) float32. ``save_pretrained`` writes
``preprocessor_config.json`` and ``AutoImageProcessor.from_pretrained(dir)`` reads it back
(the class is registered for TinyVLMConfig), so a checkpoint directory holds the whole model
side: weights, config, tokenizer and processor, as any Hugging Face VLM directory does.
"""
from __future__ import annotations

import logging

from transformers import AutoImageProcessor
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling

from training.lm_rl.vlm.modeling_vlm import TinyVLMConfig
from training.lm_rl.vlm.tasks import IMAGE_SIZE

logger = logging.getLogger(__name__)


class TinyVLMImageProcessor(PilBackend):
    """Resize to ``size`` (default 64x64), rescale by 1/255, normalise with mean = std = 0.5."""

    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]


AutoImageProcessor.register(TinyVLMConfig, image_processor_classes={"pil": TinyVLMImageProcessor}, exist_ok=True)
