"""cmboost.files.checkpoints: the one header schema, deterministic writes, old headers, digests, safe torch.load."""

import argparse
import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from cmboost.files.checkpoints import (FORMAT_KEY, VERSION_KEY, check_fits, read_checkpoint, read_safetensors,
                                 save_checkpoint, torch_load, weights_digest)
from cmboost.cm.checkpoint import load_model, read_config, save_model
from cmboost.demo.assets import ASSETS
from cmboost.errors import OutputExistsError, UserInputError
from cmboost.jcd.model import build_joint_model, load_joint_model, read_metadata, save_joint_model
from cmboost.metrics.domain_net import SHIPPED, load_domain_net, save_domain_net

OLD_JCD, OLD_CM = ASSETS / "jcd-joint.safetensors", ASSETS / "ct.safetensors"


def _tensors():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4), "b": torch.randn(4, dtype=torch.bfloat16), "n": torch.tensor(7),
            "mask": torch.tensor([True, False]), "t": torch.randn(4, 3).t()}


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_same_data_gives_the_same_bytes(tmp_path):
    tensors = _tensors()
    config, info = {"b": 1, "a": [0.5, 2]}, {"command": "x", "when": 3}
    first = save_checkpoint(tmp_path / "a.safetensors", tensors, "jcd", 2, config, info)
    reordered = dict(reversed(list(tensors.items())))
    second = save_checkpoint(tmp_path / "b.safetensors", reordered, "jcd", 2, dict(reversed(list(config.items()))),
                             info)
    assert first.read_bytes() == second.read_bytes()
    model = build_joint_model("resnet_small", 4, 1, 32)
    save_joint_model(model, tmp_path / "m1.safetensors", extra={"k": 1, "a": "b"})
    save_joint_model(model, tmp_path / "m2.safetensors", extra={"a": "b", "k": 1})
    assert (tmp_path / "m1.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()


def test_header_round_trip_any_dtype_and_refuses_overwrite(tmp_path):
    tensors = _tensors()
    path = save_checkpoint(tmp_path / "c.safetensors", tensors, "cm", 2, {"kind": "ct"}, {"iterations": 5})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left
    checkpoint = read_checkpoint(path, "cm", 2)
    assert (checkpoint.format, checkpoint.version) == ("cm", 2)
    assert checkpoint.config == {"kind": "ct"} and checkpoint.info == {"iterations": 5}
    plain = load_file(path)  # an ordinary safetensors file for any other reader
    for name, tensor in tensors.items():
        for loaded in (checkpoint.tensors[name], plain[name]):
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name
    metadata = read_safetensors(path)[1]
    assert metadata[FORMAT_KEY] == "cm" and metadata[VERSION_KEY] == "2"
    with pytest.raises(OutputExistsError, match="c.safetensors: already exists; pass --overwrite"):
        save_checkpoint(path, tensors, "cm", 2, {})
    save_checkpoint(path, {"x": torch.zeros(1)}, "cm", 2, {}, overwrite=True)
    assert list(read_checkpoint(path, "cm", 2).tensors) == ["x"]


def test_wrong_format_newer_version_and_damaged_header_are_one_line(tmp_path):
    path = save_checkpoint(tmp_path / "net.safetensors", {"x": torch.zeros(1)}, "cm", 3, {})
    with pytest.raises(UserInputError) as err:
        read_checkpoint(path, "cm", 2)
    assert "net.safetensors" in _one_line(err) and "upgrade cmboost" in str(err.value)
    with pytest.raises(UserInputError, match=r"net.safetensors: holds a consistency model \(cm\), not a joint"):
        load_joint_model(path)
    save_file({"x": torch.zeros(1)}, tmp_path / "bad.safetensors", metadata={FORMAT_KEY: "jcd", VERSION_KEY: "2",
                                                                             "cmboost.config": "{oops"})
    with pytest.raises(UserInputError, match=r"bad.safetensors: damaged cmboost header \(cmboost.config"):
        read_checkpoint(tmp_path / "bad.safetensors", "jcd", 2)
    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(UserInputError, match="foreign.safetensors: not a cmboost domain feature net checkpoint"):
        load_domain_net(tmp_path / "foreign.safetensors")
    assert read_metadata(tmp_path / "foreign.safetensors") == {}


def test_digest_is_unchanged_for_numpy_dtypes_and_works_for_bf16():
    net, _ = load_domain_net("fmnist")
    assert weights_digest(net) == "b92ac005830d632d"  # recorded in tuned-*.json and the reports
    assert weights_digest(load_domain_net("fmnist-allconv")[0]) == "629ecf95655f0008"
    assert weights_digest(net.to(memory_format=torch.channels_last)) == weights_digest(net.state_dict())
    state = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    old = hashlib.sha256()  # the numpy-based digest the recorded identities were computed with
    for name, tensor in sorted(state.items()):
        old.update(name.encode())
        old.update(tensor.numpy().tobytes())
    assert weights_digest(state) == old.hexdigest()[:16]
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert len(weights_digest(half)) == 16 and weights_digest(half) != weights_digest(state)
    assert weights_digest(half) == weights_digest({k: v.clone() for k, v in half.items()})


def test_old_jcd_header_still_loads(tmp_path):
    assert read_safetensors(OLD_JCD)[1]["format"] == "cmboost.jcd/1"
    checkpoint = read_checkpoint(OLD_JCD, "jcd", 2)
    assert checkpoint.version == 1 and checkpoint.config["arch"] == "resnet_small" and "train_jcd" in checkpoint.info
    assert read_metadata(OLD_JCD)["extra"]["realness_kind"] in ("sigmoid", "softmax")
    model = load_joint_model(OLD_JCD)
    again = load_joint_model(save_joint_model(model, tmp_path / "new.safetensors", extra=checkpoint.info))
    assert read_checkpoint(tmp_path / "new.safetensors", "jcd", 2).version == 2
    assert weights_digest(again) == weights_digest(model)


def test_old_cm_header_still_loads(tmp_path):
    assert "cmboost" in read_safetensors(OLD_CM)[1]
    old = load_model(OLD_CM)
    assert old.kind == "ct" and old.ts is not None and "iterations" in read_config(OLD_CM)
    config = read_config(OLD_CM)
    extra = {k: v for k, v in config.items() if k not in ("kind", "unet", "precond", "sampler", "image_size",
                                                           "in_channels", "num_classes")}
    path = save_model(tmp_path / "ct.safetensors", old.net, old.kind, config["unet"], old.precond, old.ts,
                      old.num_levels, extra)
    new = load_model(path)
    assert read_config(path) == config and (new.ts, new.num_levels) == (old.ts, old.num_levels)
    assert weights_digest(new.net) == weights_digest(old.net)


def test_old_domain_net_header_still_loads(tmp_path):
    assert read_safetensors(SHIPPED["fmnist"])[1]["format"] == "cmboost.domain_net/1"
    net, info = load_domain_net("fmnist")
    assert "train-features" in info["command"] and "format" not in info and "config" not in info
    path = save_domain_net(tmp_path / "net.safetensors", net, info)
    again, info_again = load_domain_net(path)
    assert info_again == info and again.config == net.config and weights_digest(again) == weights_digest(net)


def test_torch_load_failures_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "folder.pt").mkdir()
    torch.save({"a": torch.zeros(2)}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "objects.pt")
    expected = {"missing.pt": "file not found", "empty.pt": "empty file", "junk.pt": "not a weights-only",
                "folder.pt": "not a file", "cut.pt": "not a weights-only",
                "objects.pt": "refused by torch.load\\(weights_only=True\\).*argparse.Namespace"}
    for name, problem in expected.items():
        with pytest.raises(UserInputError, match=f"^{tmp_path / name}: {problem}.*; delete it$") as err:
            torch_load(tmp_path / name, fix="delete it")
        _one_line(err)
    assert torch.equal(torch_load(tmp_path / "good.pt")["a"], torch.zeros(2))
    with pytest.raises(UserInputError, match="empty.pt: empty file"):
        load_joint_model(tmp_path / "empty.pt")
    with pytest.raises(UserInputError, match="empty.pt: empty file"):
        load_model(tmp_path / "empty.pt")


def test_key_mismatch_message():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "c": torch.zeros(1)}
    check_fits(expected, dict(expected), "f.pt", "the net")
    with pytest.raises(UserInputError) as err:
        check_fits(expected, {"a": torch.zeros(2), "b": torch.zeros(4, 3), "z": torch.zeros(1)}, "f.pt", "the net")
    assert _one_line(err) == ("f.pt: does not fit the net: missing keys c; unexpected keys z; "
                              "shape mismatch b (4, 3) (file) vs (3, 4)")
