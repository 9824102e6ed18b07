"""Feature networks: the Inception port (random weights; the real ones cannot be downloaded here),
the TF1 resize, the weights-file contract, and the shipped Fashion-MNIST domain net."""

import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from cmboost.files.datasets import fashion_mnist, pad_to
from cmboost.errors import UserInputError
from cmboost.metrics.domain_net import DomainNetConfig, load_domain_net, save_domain_net
from cmboost.metrics.domain_training import TrainSettings, train_domain_net, classify_accuracy
from cmboost.metrics.features import (INCEPTION_FILE, DomainFeatures, InceptionFeatures, load_feature_extractor,
                                      resolve_inception_weights, tf1_resize)


@pytest.fixture(scope="module")
def inception():
    torch.set_num_threads(1)
    return InceptionFeatures.random(seed=3, channels_last=False)


@pytest.fixture(scope="module")
def fmnist_test():
    images, labels = fashion_mnist("test")
    return images[:, None], labels


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- Inception

@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 28, 20)])
def test_tf1_resize_matches_torch_fidelity(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 255
    ours = tf1_resize(x, 299)
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < 1e-3  # of 255


def test_inception_forward_matches_torch_fidelity_and_exposes_mixed_6_conv(inception):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    captured = {}
    hook = inception.port.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("conv", output.detach().clone()))
    try:
        pool_ref, logits_ref = inception.port(images)  # torch-fidelity's own forward: "2048", "logits_unbiased"
    finally:
        hook.remove()
    ours = inception(images)
    assert ours["pool"].shape == (2, 2048) and ours["logits"].shape == (2, 1008)
    assert _rel(ours["pool"], pool_ref) < 1e-4
    assert _rel(ours["logits"], logits_ref) < 1e-4
    spatial_ref = captured["conv"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's HWC flattening
    assert ours["spatial"].shape == (2, 17 * 17 * 7)
    assert _rel(ours["spatial"], spatial_ref) < 1e-4
    # grey images are repeated to three channels
    grey = inception(images[:, :1])
    assert _rel(grey["pool"], inception(images[:, :1].repeat(1, 3, 1, 1))["pool"]) < 1e-6


def test_inception_rejects_wrong_channels(inception):
    with pytest.raises(UserInputError, match="s.npz: images have 4 channels"):
        inception.check_images((4, 64, 64), "s.npz")


def test_missing_inception_weights_is_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CMBOOST_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CMBOOST_OFFLINE", "1")
    with pytest.raises(UserInputError) as err:
        resolve_inception_weights(None)
    message = str(err.value)
    assert INCEPTION_FILE in message and "\n" not in message
    assert str(tmp_path / "weights") in message and "--inception-weights" in message
    with pytest.raises(UserInputError, match="no such file"):
        resolve_inception_weights(tmp_path / "nowhere.pth")


def test_inception_weights_found_in_folder_and_wrong_file_rejected(tmp_path, monkeypatch):
    folder = tmp_path / "w"
    folder.mkdir()
    torch.save({"not": torch.zeros(1)}, folder / INCEPTION_FILE)
    monkeypatch.setenv("CMBOOST_WEIGHTS", str(folder))
    assert resolve_inception_weights(None) == folder / INCEPTION_FILE
    with pytest.raises(UserInputError, match="does not fit"):
        InceptionFeatures.from_weights(None, allow_download=False)
    (folder / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserInputError, match="junk.pth: not a weights-only"):
        InceptionFeatures.from_weights(folder / "junk.pth")


# ----------------------------------------------------------------------------- domain net

def test_shipped_fmnist_net_is_trained_and_documented(fmnist_test):
    net, meta = load_domain_net("fmnist")
    assert "train-features --data fmnist" in meta["command"]
    assert float(meta["test_accuracy"]) > 0.88
    images, labels = fmnist_test
    assert classify_accuracy(net, images[:1000], labels[:1000]) > 0.88
    assert net.config.image_size == 32 and net.config.feature_dim == 256


def test_domain_features_shapes_padding_and_bad_input(fmnist_test):
    extractor = load_feature_extractor("fmnist", device="cpu")
    assert isinstance(extractor, DomainFeatures)
    assert extractor.spatial_dim is None and "no spatial" in extractor.spatial_reason
    images = torch.from_numpy(fmnist_test[0][:8])
    out28 = extractor(images)
    out32 = extractor(torch.from_numpy(pad_to(fmnist_test[0][:8], 32)))
    assert out28["pool"].shape == (8, 256) and out28["logits"].shape == (8, 10) and out28["spatial"] is None
    torch.testing.assert_close(out28["pool"], out32["pool"])
    with pytest.raises(UserInputError, match=r"samples.npz: images are 3x32x32 .* takes 1x28x28 or 1x32x32"):
        extractor.check_images((3, 32, 32), "samples.npz")
    with pytest.raises(UserInputError, match="1x64x64"):
        extractor.check_images((1, 64, 64), "samples.npz")
    # a batch's features do not depend on what else is in the batch (eval-mode BatchNorm)
    torch.testing.assert_close(extractor(images[:3])["pool"], out28["pool"][:3], rtol=1e-5, atol=1e-5)


def _tiny_config():
    return DomainNetConfig(widths=(4, 8, 8, 8), feature_dim=16, dropout=0.2)


def test_domain_training_resumes_exactly_after_an_interrupt(tmp_path, fmnist_test, train_interrupted_and_resumed):
    images, labels = fmnist_test[0][:96], fmnist_test[1][:96]
    settings = TrainSettings(epochs=2, batch_size=32, warmup_steps=2, seed=5)
    resumed, state = train_interrupted_and_resumed(images, labels, _tiny_config(), settings)
    with pytest.raises(UserInputError, match="other settings"):
        train_domain_net(images, labels, _tiny_config(), TrainSettings(epochs=3, batch_size=32, seed=5),
                         job_folder=state, log=None)
    # saved nets round-trip and refuse to overwrite
    path = save_domain_net(tmp_path / "net.safetensors", resumed, {"note": "test"})
    loaded, meta = load_domain_net(path)
    assert meta["note"] == "test"
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(loaded(x)[0], resumed.eval()(x)[0])
    with pytest.raises(UserInputError, match="already exists"):
        save_domain_net(path, resumed)
