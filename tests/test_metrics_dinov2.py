"""The DINOv2 ViT wrapper for FD_DINOv2, with random weights (the real ViT-L/14 file could not be
downloaded here): preprocessing against PIL's bicubic (dgm-eval's resize), the position-embedding
resize against an independent bicubic, attention against the textbook formula, the weights-file
contract (hub layout, one-line errors) and batch independence."""

import numpy as np
import PIL.Image
import pytest
import torch

from cmboost.errors import UserInputError
from cmboost.metrics.dinov2 import (DINOV2_FILE, DINOV2_IDENTITY, IMAGENET_MEAN, IMAGENET_STD, ViTConfig,
                                    config_from_state_dict, preprocess, random_dinov2)
from cmboost.metrics.features import DinoV2Features, load_feature_extractor

SMALL = ViTConfig(dim=128, depth=2, patch=14, grid=37, mlp_hidden=512)


def _smooth_images(n=2, size=64):
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([np.stack([127 + 100 * np.sin(xx / (5 + c) + yy / (7 + k)) for c in range(3)])
                     for k in range(n)]).astype(np.uint8)


def _keys_cubic_matrix(in_size: int, out_size: int, scale: float, a: float = -0.75) -> torch.Tensor:
    """[out, in] bicubic (Keys, a = -0.75) sampling at src = (dst + 0.5) / scale - 0.5, edges clamped."""
    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0

    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        src = (i + 0.5) / scale - 0.5
        base = int(np.floor(src))
        for j in range(base - 1, base + 3):
            matrix[i, min(max(j, 0), in_size - 1)] += kernel(src - j)
    return matrix


def test_preprocessing_is_bicubic_to_224_then_imagenet_normalisation():
    images = _smooth_images()
    x = preprocess(torch.from_numpy(images))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    pil = np.stack([np.asarray(PIL.Image.fromarray(im.transpose(1, 2, 0), "RGB").resize(
        (224, 224), PIL.Image.Resampling.BICUBIC)) for im in images]).transpose(0, 3, 1, 2)
    diff = ((pixels * 255).clamp(0, 255).round() - torch.from_numpy(pil).float()).abs()
    assert float(diff.max()) <= 1.0 and float(diff.mean()) < 0.3  # dgm-eval's PIL resize, to rounding
    grey = preprocess(torch.from_numpy(images[:, :1]))
    torch.testing.assert_close(grey, preprocess(torch.from_numpy(images[:, :1].repeat(3, axis=1))))


def test_position_embeddings_are_resized_with_dinov2s_offset_scale_factor():
    model = random_dinov2(SMALL, seed=1)
    grid = model.pos_embed[0, 1:].detach().double().reshape(37, 37, -1)
    resize = _keys_cubic_matrix(37, 16, (16 + 0.1) / 37)
    expected = torch.einsum("ia,jb,abc->ijc", resize, resize, grid).reshape(256, -1)
    ours = model.position_embedding(16, 16)[0]
    assert ours.shape == (257, SMALL.dim)  # CLS + 16x16 patches at 224 px
    torch.testing.assert_close(ours[0].double(), model.pos_embed[0, 0].detach().double())
    torch.testing.assert_close(ours[1:].double(), expected, rtol=1e-5, atol=1e-6)
    # an output-size resize (no offset) samples elsewhere: the offset is not a no-op
    plain = _keys_cubic_matrix(37, 16, 16 / 37)
    assert not torch.allclose(ours[1:].double(), torch.einsum("ia,jb,abc->ijc", plain, plain, grid).reshape(256, -1),
                              atol=1e-4)


def test_attention_block_is_the_textbook_formula():
    model = random_dinov2(SMALL, seed=2).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, SMALL.dim, generator=torch.Generator().manual_seed(0))
    qkv = attn.qkv(x).reshape(2, 9, 3, SMALL.heads, 64).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / 8.0, dim=-1)  # sqrt(64) = 8
    expected = attn.proj((weights @ qkv[2]).transpose(1, 2).reshape(2, 9, SMALL.dim))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    block = model.blocks[0]
    mid = x + block.ls1.gamma * attn(block.norm1(x))
    expected_block = mid + block.ls2.gamma * block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm2(mid))))
    torch.testing.assert_close(block(x), expected_block, rtol=1e-5, atol=1e-5)


def test_vitl14_shape_is_read_from_its_state_dict():
    shapes = {"cls_token": (1, 1, 1024), "pos_embed": (1, 1370, 1024), "mask_token": (1, 1024),
              "patch_embed.proj.weight": (1024, 3, 14, 14), "blocks.0.mlp.fc1.weight": (4096, 1024)}
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    state.update({f"blocks.{i}.norm1.weight": torch.empty(1024, device="meta") for i in range(24)})
    config = config_from_state_dict(state, "x.pth")
    assert config == ViTConfig() and config.is_vitl14 and config.heads == 16 and config.grid == 37
    with pytest.raises(UserInputError, match="x.pth: a DINOv2 'with registers'"):
        config_from_state_dict({**state, "register_tokens": torch.empty(1, 4, 1024, device="meta")}, "x.pth")
    with pytest.raises(UserInputError, match="y.pth: not a DINOv2 backbone"):
        config_from_state_dict({"conv.weight": torch.zeros(1)}, "y.pth")


def test_weights_from_the_hub_cache_load_and_give_batch_independent_features(tmp_path, monkeypatch):
    model = random_dinov2(SMALL, seed=3)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(model.state_dict(), hub / DINOV2_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CMBOOST_WEIGHTS", raising=False)
    monkeypatch.setenv("CMBOOST_OFFLINE", "1")
    extractor = load_feature_extractor("dinov2", device="cpu")
    assert isinstance(extractor, DinoV2Features) and extractor.pool_dim == 128
    assert extractor.identity != DINOV2_IDENTITY and "128x2" in extractor.identity  # not the real ViT-L
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8))
    out = extractor(images)
    assert out["pool"].shape == (5, 128) and out["logits"] is None and out["spatial"] is None
    torch.testing.assert_close(out["pool"], model.eval()(preprocess(images)))
    torch.testing.assert_close(extractor(images[2:4])["pool"], out["pool"][2:4], rtol=1e-5, atol=1e-5)
    with pytest.raises(UserInputError, match="s.npz: images have 2 channels"):
        extractor.check_images((2, 64, 64), "s.npz")


def test_missing_or_wrong_weights_are_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CMBOOST_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("CMBOOST_OFFLINE", "1")
    with pytest.raises(UserInputError) as err:
        load_feature_extractor("dinov2", device="cpu")
    message = str(err.value)
    assert "\n" not in message and DINOV2_FILE in message and "--dinov2-weights" in message
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in message
    (tmp_path / "w").mkdir()
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "w" / DINOV2_FILE)
    with pytest.raises(UserInputError, match="not a DINOv2 backbone"):
        load_feature_extractor("dinov2", device="cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserInputError, match="junk.pth: not a weights-only"):
        DinoV2Features.from_weights(tmp_path / "junk.pth")
    # an Inception .pth named by $CMBOOST_WEIGHTS is not taken for DINOv2: its folder is searched
    monkeypatch.setenv("CMBOOST_WEIGHTS", str(tmp_path / "w" / "weights-inception-2015-12-05-6726825d.pth"))
    with pytest.raises(UserInputError, match="not a DINOv2 backbone"):  # found w/dinov2_vitl14_pretrain.pth
        load_feature_extractor("dinov2", device="cpu")
