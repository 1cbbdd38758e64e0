"""perception.encoder: open_clip models loaded through open_clip's own code path, batch
preprocessing equal to open_clip's transform, the two encoder protocols, clear errors."""
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from perception.encoder import (
    DEFAULT_MODEL,
    ClipEncoder,
    EncoderInputError,
    EncoderLoadError,
    cosine_rank,
    load_encoder,
    preprocess_images,
    register_model_configs,
)

torch.set_num_threads(1)

# A user's own model of a standard open_clip architecture family (the ModifiedResNet of the
# RN50 configs, with a text transformer), shrunk so the test stays fast.
USER_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _images(n=3, size=96, seed=0):
    """Smooth random RGB images (a low-resolution field upsampled), like renders."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in low])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The project's model with seeded random weights, saved as open_clip's training script saves."""
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(DEFAULT_MODEL)
    path = tmp_path_factory.mktemp("ckpt") / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "test", "state_dict": model.state_dict()}, path)
    return path, model.eval()


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return ClipEncoder(DEFAULT_MODEL, tiny_checkpoint[0])


def test_checkpoint_loads_through_open_clip_and_matches_the_model(encoder, tiny_checkpoint):
    _, model = tiny_checkpoint
    images = _images()
    # Reference: open_clip's own per-image PIL transform and the in-memory model.
    with torch.no_grad():
        x = torch.stack([encoder.preprocess_val(Image.fromarray(im)) for im in images])
        expected = model.encode_image(x, normalize=True).numpy()
        tokens = open_clip.get_tokenizer(DEFAULT_MODEL)(["pick up the red cube", "the drawer is open"])
        expected_text = model.encode_text(tokens, normalize=True).numpy()
    np.testing.assert_allclose(encoder.encode_images(images), expected, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(["pick up the red cube", "the drawer is open"]), expected_text, atol=1e-5)


def test_embeddings_shape_dtype_norm_and_batching(encoder):
    images = _images(5)
    out = encoder.encode_images(images)
    assert out.shape == (5, encoder.embedding_dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Different images give different embeddings; batch size does not change the result.
    assert not np.allclose(out[0], out[1])
    small = ClipEncoder(DEFAULT_MODEL, encoder.checkpoint, batch_size=2)
    np.testing.assert_allclose(small.encode_images(images), out, atol=1e-5)
    texts = encoder.encode_texts(["a", "the red cube is in the bowl", "b"])
    assert texts.shape == (3, encoder.embedding_dim) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_images(np.zeros((0, 96, 96, 3), np.uint8)).shape == (0, encoder.embedding_dim)
    assert encoder.encode_texts([]).shape == (0, encoder.embedding_dim)
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training


def test_other_image_sizes_are_resized_as_open_clip_does(encoder):
    images = _images(2, size=128, seed=1)[:, :, 16:112]  # 128 x 96: short side 96, centre crop
    ours = preprocess_images(images, encoder.preprocess_cfg)
    reference = torch.stack([encoder.preprocess_val(Image.fromarray(np.ascontiguousarray(im))) for im in images])
    assert ours.shape == reference.shape == (2, 3, 96, 96)
    # Torch's and PIL's bicubic kernels differ slightly; on smooth images by a few grey levels.
    assert float((ours - reference).abs().mean()) < 0.01
    assert float((ours - reference).abs().max()) < 0.1


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 96, 96, 3), np.float32), "dtype uint8"),
        (np.zeros((96, 96, 3), np.uint8), "leading batch axis"),
        (np.zeros((2, 96, 96, 4), np.uint8), r"\(N, H, W, 3\)"),
        (np.zeros((2, 0, 96, 3), np.uint8), "at least 1x1"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_images_are_refused_clearly(encoder, bad, message):
    with pytest.raises(EncoderInputError, match=message):
        encoder.encode_images(bad)


def test_bad_texts_are_refused_clearly(encoder):
    with pytest.raises(EncoderInputError, match=r"wrap a single text"):
        encoder.encode_texts("pick up the red cube")
    with pytest.raises(EncoderInputError, match=r"entries \[\(1, 'int'\)\]"):
        encoder.encode_texts(["ok", 3])


def test_user_checkpoint_of_a_standard_architecture_loads_through_the_same_path(tmp_path):
    config_file = tmp_path / "user-rn-tiny.json"
    config_file.write_text(json.dumps(USER_CONFIG))
    names = register_model_configs(config_file)
    assert names[-1] == "user-rn-tiny" and DEFAULT_MODEL in names
    torch.manual_seed(1)
    model = open_clip.create_model("user-rn-tiny").eval()
    assert type(model.visual).__name__ == "ModifiedResNet"
    # As a user would save it, here after DistributedDataParallel training ("module." prefix).
    path = tmp_path / "my_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    user = ClipEncoder("user-rn-tiny", path, config_file=config_file)
    images = _images(2, size=96)
    with torch.no_grad():
        x = torch.stack([user.preprocess_val(Image.fromarray(im)) for im in images])  # 96 -> 64
        expected = model.encode_image(x, normalize=True).numpy()
    got = user.encode_images(images)
    assert got.shape == (2, 32)
    # Same weights; only the resampling kernel (torch vs PIL bicubic) differs.
    assert float(np.abs(got - expected).max()) < 0.05
    assert np.all(np.sum(got * expected, axis=1) > 0.99)
    # A bare state dict (no wrapper) loads too.
    bare = tmp_path / "bare.bin"
    torch.save(model.state_dict(), bare)
    np.testing.assert_allclose(ClipEncoder("user-rn-tiny", bare).encode_images(images), got, atol=1e-6)


def test_load_errors_name_the_file_or_model(tmp_path, tiny_checkpoint):
    missing = tmp_path / "nope.pt"
    with pytest.raises(EncoderLoadError, match=f"{missing}: no such checkpoint file"):
        ClipEncoder(DEFAULT_MODEL, missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a torch file" * 10)
    with pytest.raises(EncoderLoadError, match=f"{corrupt}: cannot load it as an open_clip checkpoint"):
        ClipEncoder(DEFAULT_MODEL, corrupt)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint[0].read_bytes()[:5000])
    with pytest.raises(EncoderLoadError, match=str(truncated)):
        ClipEncoder(DEFAULT_MODEL, truncated)
    with pytest.raises(EncoderLoadError, match="unknown open_clip model 'helm-vit-tiyn'.*did you mean.*helm-vit-tiny"):
        ClipEncoder("helm-vit-tiyn", tiny_checkpoint[0])
    with pytest.raises(EncoderLoadError, match="nothing can be downloaded"):
        ClipEncoder("hf-hub:someone/clip")
    # Weights of another architecture: the state dict does not fit.
    config_file = tmp_path / "user-rn-tiny.json"
    config_file.write_text(json.dumps(USER_CONFIG))
    with pytest.raises(EncoderLoadError, match=f"{tiny_checkpoint[0]}: cannot load it as an open_clip checkpoint of model 'user-rn-tiny'"):
        ClipEncoder("user-rn-tiny", tiny_checkpoint[0], config_file=config_file)
    with pytest.raises(EncoderLoadError, match="is a folder"):
        ClipEncoder(DEFAULT_MODEL, tmp_path)
    with pytest.raises(EncoderLoadError, match="no such encoder checkpoint"):
        load_encoder(tmp_path / "no-run")
    with pytest.raises(EncoderLoadError, match="open_clip_config.json: cannot read"):
        load_encoder(tmp_path)
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"embed_dim": 8}')
    with pytest.raises(EncoderLoadError, match=r"bad.json: an open_clip model config needs \['vision_cfg', 'text_cfg'\]"):
        register_model_configs(bad_config)


def test_load_encoder_reads_a_checkpoint_file_with_the_default_model(tiny_checkpoint, encoder):
    loaded = load_encoder(tiny_checkpoint[0])
    assert loaded.model_name == DEFAULT_MODEL
    images = _images(2)
    np.testing.assert_allclose(loaded.encode_images(images), encoder.encode_images(images), atol=1e-6)


def test_cosine_rank_counts_ties_against_the_target():
    keys = np.eye(3, dtype=np.float32)
    query = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    assert cosine_rank(query, keys, np.array([0, 0, 2])).tolist() == [0, 1, 0]
    collapsed = np.tile(keys[:1], (3, 1))  # every key the same: nothing is retrieved first
    assert cosine_rank(query, collapsed, np.array([0, 1, 2])).tolist() == [2, 2, 2]
