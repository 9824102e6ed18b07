"""The domain feature net's architecture families: "vgg" (the shipped "fmnist" judge), "allconv"
(the shipped "fmnist-allconv" judge, an all-convolutional net of another family and seed), "resnet",
and the tuning committee's "shallow" and "mixer", which share no design with the reporting judges."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from cmboost.cli import main
from cmboost.files.datasets import fashion_mnist
from cmboost.errors import UserInputError
from cmboost.files.checkpoints import read_safetensors, weights_digest
from cmboost.metrics.domain_net import SHIPPED, DomainNet, DomainNetConfig, load_domain_net, save_domain_net
from cmboost.metrics.domain_training import TrainSettings, config_for_data, train_domain_net
from cmboost.metrics.features import load_feature_extractor

VGG_IDENTITY = "domain-net-b92ac005830d632d"
@pytest.fixture(scope="module")
def fmnist_test():
    images, labels = fashion_mnist("test")
    return images[:, None], labels


def _tiny_allconv():
    return DomainNetConfig(arch="allconv", widths=(4, 8, 8, 8), feature_dim=16, dropout=0.2)


def test_allconv_forward_shapes_and_no_pooling_or_residuals():
    net = DomainNet(DomainNetConfig(arch="allconv")).eval()
    features, logits = net(torch.rand(3, 1, 32, 32))
    assert features.shape == (3, 256) and logits.shape == (3, 10)
    kinds = {type(m) for m in net.modules()}
    assert nn.MaxPool2d not in kinds and nn.ReLU not in kinds and nn.GELU in kinds
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (5, 5) for m in net.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in net.modules()) == 2
    # another image size (a multiple of 16) and channel count: global average pooling takes any size
    other = DomainNet(DomainNetConfig(arch="allconv", in_channels=3, image_size=64, pad_from=None, num_classes=7))
    features, logits = other.eval()(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 256) and logits.shape == (2, 7)


def test_old_config_without_arch_loads_as_vgg_with_the_same_identity():
    tensors, metadata = read_safetensors(SHIPPED["fmnist"])
    assert "arch" not in json.loads(metadata["config"])  # written before the field existed
    config = DomainNetConfig.from_json(metadata["config"], "shipped")
    assert config.arch == "vgg" and config == DomainNetConfig.from_json(
        json.dumps({**json.loads(metadata["config"]), "arch": "vgg"}), "shipped")
    net, _ = load_domain_net("fmnist")
    assert net.config.arch == "vgg"
    assert f"domain-net-{weights_digest(net)}" == VGG_IDENTITY
    assert load_feature_extractor("fmnist", device="cpu").identity == VGG_IDENTITY


def test_bad_arch_is_a_one_line_error(tmp_path):
    with pytest.raises(UserInputError) as err:
        DomainNetConfig(arch="densenet")
    assert "'densenet'" in str(err.value) and "vgg, allconv, resnet, shallow, mixer" in str(err.value) and "\n" not in str(err.value)
    bad = json.dumps({**json.loads(DomainNetConfig().to_json()), "arch": "densenet"})
    with pytest.raises(UserInputError, match=r"^net.safetensors: domain net arch 'densenet'") as err:
        DomainNetConfig.from_json(bad, "net.safetensors")
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="arch 'densenet'"):
        config_for_data(np.zeros((4, 1, 28, 28), np.uint8), 10, "fmnist", arch="densenet")
    with pytest.raises(SystemExit):
        main(["train-features", "--data", "fmnist", "--arch", "densenet", "--out", str(tmp_path / "x.safetensors")])


def test_resnet_arch_has_residual_blocks_and_any_size():
    net = DomainNet(DomainNetConfig(arch="resnet")).eval()
    features, logits = net(torch.rand(3, 1, 32, 32))
    assert features.shape == (3, 256) and logits.shape == (3, 10)
    kinds = {type(m).__name__ for m in net.modules()}
    assert "_BasicBlock" in kinds and "BatchNorm2d" in kinds and "GroupNorm" not in kinds


def test_shallow_arch_is_three_wide_convs_with_groupnorm_and_average_pooling():
    net = DomainNet(DomainNetConfig(arch="shallow")).eval()
    features, logits = net(torch.rand(3, 1, 32, 32))
    assert features.shape == (3, 256) and logits.shape == (3, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5), (3, 3)]
    kinds = {type(m) for m in net.body.modules()}
    # nothing the reporting judges are made of: no BatchNorm, max pooling, stride or residual block
    assert nn.GroupNorm in kinds and nn.ELU in kinds and nn.AvgPool2d in kinds
    assert not kinds & {nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU, nn.GELU, nn.SiLU}
    assert all(c.stride == (1, 1) for c in convs)
    other = DomainNet(DomainNetConfig(arch="shallow", in_channels=3, image_size=64, pad_from=None)).eval()
    assert other(torch.rand(2, 3, 64, 64))[0].shape == (2, 256)


def test_mixer_arch_mixes_patches_with_mlps_only():
    net = DomainNet(DomainNetConfig(arch="mixer")).eval()
    features, logits = net(torch.rand(3, 1, 32, 32))
    assert features.shape == (3, 256) and logits.shape == (3, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == convs[0].stride == (4, 4)  # the patch embedding only
    assert sum(type(m).__name__ == "_MixerBlock" for m in net.modules()) == 4
    assert not {type(m) for m in net.body.modules()} & {nn.BatchNorm2d, nn.GroupNorm, nn.MaxPool2d}
    # the token MLP mixes across patches: changing one patch changes every patch's features after a block
    x = torch.rand(1, 1, 32, 32)
    y = x.clone()
    y[..., :4, :4] += 0.5
    tokens = lambda v: net.body.blocks[0](net.body.embed(v).flatten(2).transpose(1, 2))  # noqa: E731
    with torch.no_grad():
        moved = (tokens(x) - tokens(y)).abs().amax(-1)
    assert bool((moved[0, 1:] > 0).all())
    other = DomainNet(DomainNetConfig(arch="mixer", in_channels=3, image_size=64, pad_from=None)).eval()
    assert other(torch.rand(2, 3, 64, 64))[0].shape == (2, 256)


def test_adversarial_training_moves_the_weights_differently_and_is_recorded(tmp_path, fmnist_test):
    images, labels = fmnist_test[0][:64], fmnist_test[1][:64]
    config = DomainNetConfig(arch="allconv", widths=(4, 8, 8, 8), feature_dim=16)
    plain = train_domain_net(images, labels, config, TrainSettings(epochs=1, batch_size=32, seed=3), log=None)
    robust = train_domain_net(images, labels, config, TrainSettings(epochs=1, batch_size=32, seed=3, adv_eps=1.0,
                                                                    adv_steps=2), log=None)
    differ = [k for k, v in plain.state_dict().items() if not torch.equal(v, robust.state_dict()[k])]
    assert differ
    with pytest.raises(UserInputError, match="--adv-eps -1.0: must be >= 0"):
        TrainSettings(adv_eps=-1.0)
    out = tmp_path / "r.safetensors"
    assert main(["train-features", "--data", "fmnist", "--limit", "64", "--epochs", "1", "--batch-size", "32",
                 "--arch", "resnet", "--adv-eps", "0.5", "--adv-steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    _, meta = load_domain_net(out)
    assert "--adv-eps 0.5 --adv-steps 1" in meta["command"] and json.loads(meta["settings"])["adv_eps"] == 0.5


def test_allconv_training_resumes_exactly_and_round_trips(tmp_path, fmnist_test, train_interrupted_and_resumed):
    images, labels = fmnist_test[0][:96], fmnist_test[1][:96]
    settings = TrainSettings(epochs=2, batch_size=32, warmup_steps=2, seed=11)
    resumed, state = train_interrupted_and_resumed(images, labels, _tiny_allconv(), settings)
    # a vgg state is not resumed as allconv (the config, arch included, is in the fingerprint)
    vgg = DomainNetConfig(widths=(4, 8, 8, 8), feature_dim=16, dropout=0.2)
    with pytest.raises(UserInputError, match="other settings"):
        train_domain_net(images, labels, vgg, settings, job_folder=state, log=None)
    path = save_domain_net(tmp_path / "net.safetensors", resumed)
    loaded, _ = load_domain_net(path)
    assert loaded.config.arch == "allconv"
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(loaded(x)[0], resumed.eval()(x)[0])


def test_cli_train_features_records_arch_and_seed(tmp_path, fmnist_test):
    from PIL import Image

    images, labels = fmnist_test
    for i in range(48):
        folder = tmp_path / "data" / f"class{labels[i] % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0]).save(folder / f"{i:04d}.png")
    out = tmp_path / "net.safetensors"
    assert main(["train-features", "--data", f"folder:{tmp_path / 'data'}", "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--arch", "allconv", "--seed", "7", "--device", "cpu"]) == 0
    net, meta = load_domain_net(out)
    assert net.config.arch == "allconv" and meta["arch"] == "allconv" and meta["seed"] == "7"
    assert "--arch allconv" in meta["command"] and "--seed 7" in meta["command"]
    assert json.loads(meta["settings"])["seed"] == 7
