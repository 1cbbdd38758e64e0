"""The image/text encoder of the HELM harness: any open_clip model, built and loaded by
open_clip's own code.

Why open_clip and not a home-made loader: HELM keys its episodic memory by CLIP embeddings
of keyframes and subgoal texts. No CLIP weights can be downloaded here, so the project
trains a small in-domain model (`training.encoder`), but a user with a pretrained CLIP
checkpoint must be able to drop it in. Both go through the same call,
``open_clip.create_model_and_transforms(model_name, pretrained=<checkpoint file>)`` plus
``open_clip.get_tokenizer(model_name)``, so whatever open_clip can load (its own training
script's ``{"epoch", "state_dict", ...}`` files, bare state dicts, DDP ``module.`` prefixes,
safetensors) loads here, and nothing is unpickled (open_clip reads with weights_only=True).

The project's own architectures are JSON configs in ``perception/clip_configs/``, registered
with ``open_clip.add_model_config`` (`register_model_configs`), so open_clip knows them by
name like its built-in ones; a user's own config file is registered the same way
(``ClipEncoder(..., config_file=...)``).

`ClipEncoder` satisfies the BC policy's `ImageEncoder` and `TextEncoder` protocols
(`training.bc.model`): uint8 (N, H, W, 3) RGB batches and lists of strings in, L2-normalised
float32 (N, D) out, in eval mode without gradients. Images are preprocessed as a batch in
torch the way open_clip's validation transform does it per PIL image (resize, centre crop,
mean/std from the model's preprocess config), which is what keeps encoding at a few
milliseconds per image. Torch's thread count is the caller's choice.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("clip_configs")
DEFAULT_MODEL = "helm-vit-tiny"
# The export layout `training.encoder` writes (and open_clip's "local-dir:" schema reads):
# the weights under a name open_clip looks for, and the model + preprocess config beside it.
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
EXPORT_DIR = "encoder"

_registered: set[str] = set()
_register_lock = threading.Lock()


class EncoderLoadError(RuntimeError):
    """A model config or checkpoint cannot be loaded; the message names the file or model."""


class EncoderInputError(ValueError):
    """Images or texts handed to the encoder have the wrong type, shape or values."""


def register_model_configs(*paths: str | os.PathLike) -> list[str]:
    """Register the project's configs (once per process) and any extra JSON config files or
    folders with open_clip; returns the model names those files define."""
    import open_clip

    targets = [CONFIG_DIR, *(Path(p) for p in paths)]
    names: list[str] = []
    with _register_lock:
        for target in targets:
            if not target.exists():
                raise EncoderLoadError(f"{target}: no such open_clip model config file or folder")
            files = sorted(target.glob("*.json")) if target.is_dir() else [target]
            for file in files:
                try:
                    config = json.loads(file.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise EncoderLoadError(f"{file}: not a readable JSON model config ({exc})") from exc
                missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or k not in config]
                if missing:
                    raise EncoderLoadError(f"{file}: an open_clip model config needs {missing} (has {sorted(config) if isinstance(config, dict) else type(config).__name__})")
                names.append(file.stem)
            key = str(target.resolve())
            if key not in _registered:
                open_clip.add_model_config(target)
                _registered.add(key)
    return names


def preprocess_cfg_of(model: torch.nn.Module) -> dict[str, Any]:
    """The image preprocessing open_clip attached to a model (size, mean, std, resize mode)."""
    import open_clip

    return dict(open_clip.get_model_preprocess_cfg(model))


def check_images(images: Any) -> NDArray[np.uint8]:
    """`images` as a (N, H, W, 3) uint8 array, or EncoderInputError saying what is wrong."""
    if not isinstance(images, np.ndarray):
        raise EncoderInputError(f"images must be a numpy array of shape (N, H, W, 3) and dtype uint8, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise EncoderInputError(f"images must have dtype uint8 (RGB 0-255), got {images.dtype}; convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1]")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise EncoderInputError(f"images must have shape (N, H, W, 3), got {images.shape}; a single image needs a leading batch axis (image[None])")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise EncoderInputError(f"images must be at least 1x1 pixels, got {images.shape[1]}x{images.shape[2]}")
    return images


def _size_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def preprocess_images(images: NDArray[np.uint8] | torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised float (N, 3, h, w) as open_clip's validation
    transform makes it: resize ("shortest": the short side to the target, then centre crop;
    "longest": the long side, then pad with fill_color; "squash": both sides), scale to
    [0, 1], subtract mean and divide by std. `cfg` is `preprocess_cfg_of(model)`."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)
    th, tw = _size_hw(cfg["size"])
    h, w = x.shape[-2:]
    if (h, w) != (th, tw):
        mode = cfg.get("interpolation", "bicubic")
        interp = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}.get(mode, "bicubic")
        resize_mode = cfg.get("resize_mode", "shortest")
        if resize_mode == "squash":
            x = F.interpolate(x, size=(th, tw), mode=interp, antialias=True, align_corners=False)
        elif resize_mode == "longest":
            scale = min(th / h, tw / w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode=interp, antialias=True, align_corners=False)
            pad_h, pad_w = th - nh, tw - nw
            fill = float(cfg.get("fill_color", 0)) / 255.0
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
        else:  # "shortest", open_clip's default
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode=interp, antialias=True, align_corners=False)
            top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
            x = x[..., top : top + th, left : left + tw]
        x = x.clamp_(0.0, 1.0)  # PIL's resampling clips to the 0-255 range too
    mean = torch.tensor(cfg["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def check_model_name(model_name: str) -> dict[str, Any]:
    """The registered open_clip config of `model_name`, or EncoderLoadError naming close ones."""
    import difflib

    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise EncoderLoadError(f"model_name must be a registered open_clip model name, got {model_name!r}")
    if ":" in model_name:
        raise EncoderLoadError(
            f"model_name {model_name!r}: hub and folder schemas are not used here (nothing can be downloaded); "
            f"give a registered config name and the checkpoint file separately"
        )
    config = open_clip.get_model_config(model_name)
    if config is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        hint = f"; did you mean {close}?" if close else ""
        raise EncoderLoadError(
            f"unknown open_clip model {model_name!r} ({len(open_clip.list_models())} registered, the project's: "
            f"{sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}){hint}; register a JSON config with config_file="
        )
    return config


class ClipEncoder:
    """An open_clip model behind the `ImageEncoder` / `TextEncoder` protocols.

    ``ClipEncoder(model_name, checkpoint)`` loads the checkpoint file through
    ``open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)``;
    ``checkpoint=None`` builds the architecture with random weights (untrained baselines).
    ``config_file`` registers a JSON architecture config first (a user's own model).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        checkpoint: str | os.PathLike | None = None,
        *,
        config_file: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 256,
    ) -> None:
        import open_clip

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        register_model_configs(*([config_file] if config_file is not None else []))
        model_config = check_model_name(model_name)
        pretrained: str | None = None
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.exists():
                raise EncoderLoadError(f"{path}: no such checkpoint file (model {model_name!r})")
            if path.is_dir():
                raise EncoderLoadError(f"{path}: is a folder; give the checkpoint file (or use load_encoder(folder) for a training run's export)")
            pretrained = str(path)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        except Exception as exc:  # open_clip raises RuntimeError, UnpicklingError, KeyError, ... for a bad file
            what = f"{pretrained}: cannot load it as an open_clip checkpoint of model {model_name!r}" if pretrained else f"cannot build open_clip model {model_name!r}"
            raise EncoderLoadError(f"{what} ({type(exc).__name__}: {' '.join(str(exc).split())[:500]})") from exc
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = model
        self.model_name = model_name
        self.checkpoint = pretrained
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.preprocess_val = preprocess  # open_clip's own per-PIL-image transform (reference)
        self.preprocess_cfg = preprocess_cfg_of(model)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.embedding_dim = int(model_config["embed_dim"])
        self.context_length = int(model_config["text_cfg"].get("context_length", 77))
        self.image_size = _size_hw(self.preprocess_cfg["size"])
        logger.info("loaded open_clip %s from %s (%d-d embeddings, %dx%d input)", model_name, pretrained or "random init", self.embedding_dim, *self.image_size)

    def __repr__(self) -> str:
        return f"ClipEncoder({self.model_name!r}, checkpoint={self.checkpoint!r})"

    @torch.inference_mode()
    def encode_images(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(N, H, W, 3) uint8 RGB -> (N, embedding_dim) float32, unit L2 norm per row."""
        images = check_images(images)
        if len(images) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            x = preprocess_images(images[start : start + self.batch_size], self.preprocess_cfg).to(self.device)
            out.append(self.model.encode_image(x, normalize=True).float().cpu())
        return self._finish(torch.cat(out), "image")

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """N strings -> (N, embedding_dim) float32, unit L2 norm per row."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise EncoderInputError(f"texts must be a list of strings, got {type(texts).__name__}" + ("; wrap a single text as [text]" if isinstance(texts, str) else ""))
        bad = [(i, type(t).__name__) for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise EncoderInputError(f"texts must all be strings; entries {bad[:5]} are not")
        if len(texts) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return self._finish(torch.cat(out), "text")

    def _finish(self, features: torch.Tensor, what: str) -> NDArray[np.float32]:
        array = features.numpy().astype(np.float32, copy=False)
        if not np.all(np.isfinite(array)):
            raise RuntimeError(f"{self!r}: non-finite {what} embeddings (damaged weights?)")
        return array


def load_encoder(path: str | os.PathLike, model_name: str | None = None, **kwargs: Any) -> ClipEncoder:
    """A `ClipEncoder` from a training run folder, its ``encoder/`` export or a checkpoint
    folder (each holds ``open_clip_config.json`` naming the model), or from a checkpoint
    file (with `model_name`, default the project's model)."""
    path = Path(path)
    if not path.exists():
        raise EncoderLoadError(f"{path}: no such encoder checkpoint, run or export folder")
    if path.is_file():
        return ClipEncoder(model_name or DEFAULT_MODEL, path, **kwargs)
    if not (path / OPEN_CLIP_CONFIG_FILE).exists() and (path / EXPORT_DIR / OPEN_CLIP_CONFIG_FILE).exists():
        path = path / EXPORT_DIR
    config_path = path / OPEN_CLIP_CONFIG_FILE
    try:
        info = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EncoderLoadError(f"{config_path}: cannot read the export's config ({exc}); expected a training run (with {EXPORT_DIR}/) or an export folder") from exc
    name = model_name or info.get("model_name")
    if not name:
        raise EncoderLoadError(f"{config_path}: no model_name; pass model_name=")
    return ClipEncoder(name, path / WEIGHTS_FILE, **kwargs)


def cosine_rank(query: NDArray[np.float32], keys: NDArray[np.float32], target: NDArray[np.int64]) -> NDArray[np.int64]:
    """0-based rank of each query's target key by cosine similarity (ties count against it:
    a key scoring equal to the target ranks ahead), for retrieval recall@k = mean(rank < k)."""
    scores = query @ keys.T  # (Q, K), unit vectors
    target_score = scores[np.arange(len(query)), target][:, None]
    ahead = scores >= target_score
    ahead[np.arange(len(query)), target] = False
    return ahead.sum(axis=1).astype(np.int64)

