"""The DINOv2 ViT wrapper for FD_DINOv2, with random weights (the real ViT-L/14 file could not be
downloaded here): preprocessing against PIL's bicubic (dgm-eval's resize), the position-embedding
resize against an independent bicubic, attention against the textbook formula, the weights-file
contract (hub layout, one-line errors) and batch independence. timm's ViT against the pre-timm
hand-written one (tests/_reference_dinov2.py), side by side with one state dict loaded into both:
same CLS features to float32 rounding (and with the real file too, where it is found)."""

import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch

import _reference_dinov2 as reference
from cmboost.errors import UserInputError
from cmboost.metrics.dinov2 import (DINOV2_FILE, DINOV2_IDENTITY, DINOV2_URL, IMAGENET_MEAN, IMAGENET_STD, ViTConfig,
                                    build_dinov2, config_from_state_dict, load_dinov2, preprocess, random_dinov2,
                                    resize_pos_embed)
from cmboost.metrics.features import DinoV2Features, load_feature_extractor, resolve_weights

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
    pos_embed = torch.randn(1, 37 * 37 + 1, SMALL.dim, generator=torch.Generator().manual_seed(1)) * 0.02
    grid = pos_embed[0, 1:].double().reshape(37, 37, -1)
    resize = _keys_cubic_matrix(37, 16, (16 + 0.1) / 37)
    expected = torch.einsum("ia,jb,abc->ijc", resize, resize, grid).reshape(256, -1)
    ours = resize_pos_embed(pos_embed, 16, 16)[0]
    assert ours.shape == (257, SMALL.dim)  # CLS + 16x16 patches at 224 px
    assert random_dinov2(SMALL, seed=1).pos_embed.shape == (1, 257, SMALL.dim)  # timm's ViT is built for 224 px
    torch.testing.assert_close(ours[0].double(), pos_embed[0, 0].double())
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


# ----------------------------------------------------------------------------- timm against the reference


def _reference_config(config: ViTConfig) -> reference.ViTConfig:
    return reference.ViTConfig(**dataclasses.asdict(config))


def _test_images() -> list[torch.Tensor]:
    """Deterministic batches: smooth RGB 64x64, seeded-noise grey 28x28, seeded-noise RGB 40x40."""
    generator = torch.Generator().manual_seed(5)
    return [torch.from_numpy(_smooth_images(2)), torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8,
            generator=generator), torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=generator)]


def _assert_same_features(extractor: DinoV2Features, ref_model, normalise=None):
    """CLS features of the timm extractor and of the reference model, computed here, equal to float32 rounding."""
    for images in _test_images():
        x = reference.preprocess(images)
        with torch.no_grad():
            theirs = ref_model.eval()(normalise(x) if normalise else x)
        scale = float(theirs.abs().max())
        torch.testing.assert_close(extractor(images)["pool"], theirs, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(reference model, its state dict saved the released way): random weights with layer scales, norms
    and biases far from their init, so that every block counts, under DINOv2's `backbone.` prefix."""
    model = reference.random_dinov2(_reference_config(SMALL), seed=4)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma") or (param.ndim == 1 and "norm" in name and name.endswith("weight")):
                param.copy_(0.5 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("dinov2") / DINOV2_FILE
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items()}, path)
    return model, path


def test_timm_features_equal_the_reference_with_one_state_dict(released):
    ref_model, path = released
    extractor = DinoV2Features.from_weights(path)
    assert extractor.identity == "dinov2-vit-128x2-p14-g37"
    _assert_same_features(extractor, ref_model)


def test_random_weights_equal_the_references(released):
    """random_dinov2 draws what it drew before timm: the same weights, so the same features."""
    ours = random_dinov2(SMALL, seed=3)
    theirs = reference.random_dinov2(_reference_config(SMALL), seed=3)
    expected = dict(theirs.state_dict(), pos_embed=theirs.position_embedding(16, 16))
    expected.pop("mask_token")
    assert ours.state_dict().keys() == expected.keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key
    _assert_same_features(DinoV2Features(ours, "t"), theirs)


def test_the_comparison_fails_on_timms_position_resize_or_a_wrong_normalisation(released):
    """The same check, made to fail: timm's own position-embedding resize (antialiased, to a size) and
    a normalisation without the ImageNet std each give a large difference."""
    ref_model, path = released
    extractor = DinoV2Features.from_weights(path)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with pytest.raises(AssertionError, match="Mismatched elements"):
        _assert_same_features(extractor, ref_model, normalise=lambda x: x * std)
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        extractor.model.pos_embed.copy_(resample_abs_pos_embed(ref_model.pos_embed.detach(), (16, 16)))
    with pytest.raises(AssertionError, match="Mismatched elements"):
        _assert_same_features(extractor, ref_model)


def test_missing_timm_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(UserInputError) as err:
        build_dinov2(SMALL)
    assert "\n" not in str(err.value) and "pip install 'cmboost[judges]'" in str(err.value)


def test_timm_features_equal_the_reference_with_the_real_file(monkeypatch):
    """Only where dinov2_vitl14_pretrain.pth is found ($CMBOOST_WEIGHTS or torch's hub cache): ViT-L/14."""
    monkeypatch.setenv("CMBOOST_OFFLINE", "1")
    try:
        path = resolve_weights(DINOV2_FILE, DINOV2_URL, "--dinov2-weights", "DINOv2", allow_download=False)
    except UserInputError:
        pytest.skip(f"{DINOV2_FILE} not found")
    ref_model = reference.DinoViT()
    state = {k.removeprefix("backbone."): v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    ref_model.load_state_dict(state, strict=True)
    extractor = DinoV2Features(load_dinov2(path), DINOV2_IDENTITY)
    images = _test_images()[1]
    with torch.no_grad():
        theirs = ref_model.eval()(reference.preprocess(images))
    torch.testing.assert_close(extractor(images)["pool"], theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
