"""The joint model: its scores, the small ResNet, our checkpoint format and every imported format."""

import argparse
import math

import pytest
import torch

from cmboost.errors import OutputExistsError, UserInputError
from cmboost.jcd.model import (IMAGENET_MEAN, IMAGENET_STD, JointModel, _infer_arch, build_joint_model,
                         load_joint_model, log_realness_from_logits, read_metadata, save_joint_model)


def small(num_classes=10, in_channels=1, image_size=32, seed=0):
    torch.manual_seed(seed)
    return build_joint_model("resnet_small", num_classes, in_channels, image_size).eval()


def test_scores_follow_their_definitions():
    model = small()
    x = torch.rand(5, 1, 32, 32)
    y = torch.tensor([0, 3, 9, 1, 1])
    with torch.no_grad():
        f = model.logits(x)
        assert f.shape == (5, 10)
        assert torch.equal(f, model(x))
        # normalisation inside: the backbone sees (x - 0.5) / 0.5
        assert torch.allclose(f, model.backbone((x - 0.5) / 0.5))
        fy = f.gather(1, y[:, None]).squeeze(1)
        assert torch.allclose(model.log_prob(x, y), torch.log_softmax(f, 1).gather(1, y[:, None]).squeeze(1), atol=1e-6)
        assert torch.allclose(model.realness(x, y, "sigmoid"), torch.sigmoid(fy), atol=1e-6)
        assert torch.allclose(model.realness(x, y, "softmax"), torch.softmax(f, 1).gather(1, y[:, None]).squeeze(1),
                              atol=1e-6)
        assert torch.allclose(model.energy(x, y), -fy)
        assert torch.allclose(model.energy(x), -torch.logsumexp(f, 1))
        assert torch.allclose(log_realness_from_logits(model(x), y, "sigmoid"), torch.log(torch.sigmoid(fy)), atol=1e-5)
    with pytest.raises(UserInputError, match="realness kind"):
        model.realness(x, y, "tanh")


def test_log_realness_is_stable_for_large_logits():
    from cmboost.jcd.model import log_not_prob_from_logits, log_realness_from_logits

    logits = torch.tensor([[80.0, -80.0, 0.0]])
    y = torch.tensor([1])
    assert torch.isclose(log_realness_from_logits(logits, y, "sigmoid"), torch.tensor([-80.0]))
    assert torch.isfinite(log_realness_from_logits(logits, y, "softmax")).all()
    # log(1 - p) with p ~ 1 - 2e-35: the naive form gives -inf
    value = log_not_prob_from_logits(logits, torch.tensor([0]))
    assert math.isclose(float(value), math.log(math.exp(-80.0) + math.exp(-160.0)) - 0.0, rel_tol=1e-5)


@pytest.mark.parametrize("in_channels,size", [(1, 28), (1, 32), (3, 32)])
def test_small_resnet_shapes_and_size(in_channels, size):
    model = small(num_classes=7, in_channels=in_channels, image_size=size)
    assert sum(p.numel() for p in model.parameters()) <= 1_000_000
    out = model(torch.rand(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert (model.arch, model.num_classes, model.in_channels, model.image_size) == ("resnet_small", 7, in_channels, size)


def test_small_resnet_is_per_example():
    """GroupNorm: an example's logits do not depend on the batch it sits in, in train mode too."""
    model = small().train()
    x = torch.rand(6, 1, 32, 32)
    assert torch.allclose(model(x)[2:3], model(x[2:3]), atol=1e-5)


def test_build_rejects_bad_arguments():
    with pytest.raises(UserInputError, match="--arch 'vgg'"):
        build_joint_model("vgg", 10)
    with pytest.raises(UserInputError, match="in_channels"):
        build_joint_model("resnet_small", 10, in_channels=2)


def test_own_format_round_trip(tmp_path):
    model = small(num_classes=4, in_channels=3)
    path = save_joint_model(model, tmp_path / "m.safetensors", extra={"note": "hello"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    meta = read_metadata(path)
    assert meta["config"]["arch"] == "resnet_small" and meta["extra"] == {"note": "hello"}
    loaded = load_joint_model(path)
    assert isinstance(loaded, JointModel) and not loaded.training
    assert (loaded.num_classes, loaded.in_channels, loaded.image_size) == (4, 3, 32)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(OutputExistsError, match="already exists"):
        save_joint_model(model, path)
    save_joint_model(small(num_classes=4, in_channels=3, seed=1), path, overwrite=True)
    with torch.no_grad():
        assert not torch.equal(load_joint_model(path)(x), model(x))


def test_own_format_with_wrong_arch_is_refused(tmp_path):
    path = save_joint_model(small(), tmp_path / "m.safetensors")
    with pytest.raises(UserInputError, match="holds a resnet_small model, not --arch resnet50"):
        load_joint_model(path, arch="resnet50")


@pytest.fixture(scope="module")
def resnet50_state():
    torch.manual_seed(0)
    model = build_joint_model("resnet50", num_classes=10, image_size=64).eval()
    return model, {k: v.clone() for k, v in model.backbone.state_dict().items()}


def _check_same(loaded, reference, x):
    assert loaded.arch == "resnet50" and loaded.num_classes == 10
    for key in ("conv1.weight", "layer4.2.bn3.running_var", "fc.bias"):
        assert torch.equal(loaded.backbone.state_dict()[key], reference[1][key])
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference[0](x), atol=1e-5)


def test_imports_every_checkpoint_format(tmp_path, resnet50_state):
    _, state = resnet50_state
    x = torch.rand(1, 3, 64, 64)
    released = {f"model.{k}": v for k, v in state.items()}
    released["dummy"] = torch.zeros(1)
    robust = {f"module.model.{k}": v for k, v in state.items()}
    robust.update({f"module.attacker.model.{k}": v for k, v in state.items()})
    robust["module.normalizer.new_mean"] = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    robust["module.normalizer.new_std"] = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    robust["module.attacker.normalize.new_mean"] = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    files = {
        "released.pt": released,
        "robustness_model.pt": {"model": robust, "epoch": 90, "optimizer": {"state": {}, "param_groups": []}},
        "robustness_state_dict.pth": {"state_dict": robust, "epoch": 90},
        "torchvision.pth": state,
    }
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
        loaded = load_joint_model(tmp_path / name)  # arch inferred from the keys
        _check_same(loaded, resnet50_state, x)
        assert not loaded.training
    # the robustness normaliser's statistics are taken over
    loaded = load_joint_model(tmp_path / "robustness_model.pt", arch="resnet50")
    assert torch.allclose(loaded.mean.flatten(), torch.tensor(IMAGENET_MEAN))


def test_checkpoint_that_does_not_fit_names_arch_and_keys(tmp_path, resnet50_state):
    _, state = resnet50_state
    broken = {k: v for k, v in state.items() if k != "fc.bias"}
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserInputError) as err:
        load_joint_model(tmp_path / "broken.pth", arch="resnet50")
    message = str(err.value)
    assert "\n" not in message
    assert "arch resnet50" in message and "missing keys fc.bias" in message and "unexpected keys extra.weight" in message
    torch.save(small(num_classes=10).backbone.state_dict(), tmp_path / "small.pth")
    with pytest.raises(UserInputError, match=r"does not fit arch resnet_small: shape mismatch fc.weight \(10, 64\)"):
        load_joint_model(tmp_path / "small.pth", num_classes=5)


def test_arch_inference_from_keys():
    assert _infer_arch({"layer1.0.conv3.weight": 0, "layer1.0.conv1.weight": torch.zeros(128, 64, 1, 1)}) == \
        "wide_resnet50_2"
    assert _infer_arch({"layer1.0.conv3.weight": 0, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}) == "resnet50"
    assert _infer_arch(small().backbone.state_dict()) == "resnet_small"
    assert _infer_arch({"features.0.weight": 0}) is None


def test_pickled_objects_are_refused_not_executed(tmp_path):
    payload = {"model": small().backbone.state_dict(), "args": argparse.Namespace(lr=0.1)}
    torch.save(payload, tmp_path / "objects.pt")
    with pytest.raises(UserInputError, match=r"weights_only=True"):
        load_joint_model(tmp_path / "objects.pt")


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_joint_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="junk.pt"):
        load_joint_model(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserInputError, match="junk.safetensors"):
        load_joint_model(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(UserInputError, match="no state_dict of tensors"):
        load_joint_model(tmp_path / "empty.pt")


def test_resnet_small_width_round_trips_through_the_weights(tmp_path):
    from cmboost.jcd.model import build_joint_model, load_joint_model, save_joint_model

    wide = build_joint_model("resnet_small", 10, 1, 32, width=24)
    path = save_joint_model(wide, tmp_path / "wide.safetensors")
    loaded = load_joint_model(path)
    assert loaded.backbone.conv1.out_channels == 24
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.logits(x), wide.eval().logits(x))
    with pytest.raises(UserInputError, match="--width"):
        build_joint_model("resnet50", 10, 3, 64, width=24)
