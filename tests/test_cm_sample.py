"""`cmboost sample`: file format, seeding, batch-size invariance, resume, sharding, input errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cmboost.cm.sample as sample_mod
from cmboost.cli import main
from cmboost.cm.checkpoint import load_model, save_model
from cmboost.cm.denoiser import CM_PRECOND
from cmboost.cm.unet import UNetModel
from cmboost.errors import UserInputError

UNET = dict(image_size=8, in_channels=3, model_channels=8, out_channels=3, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=[1, 2], num_classes=6, num_head_channels=8,
            use_scale_shift_norm=True, resblock_updown=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    net = UNetModel(**UNET)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("model") / "cd-tiny.safetensors"
    save_model(path, net, "cd", UNET, CM_PRECOND, (0, 22, 39), 40)
    return path


def _sample(model, out, *extra):
    return main(["sample", "--model", str(model), "--num", "7", "--out", str(out), "--no-progress",
                 "--device", "cpu", "--seed", "3", "--block-size", "2", *extra])


def _load(path):
    with np.load(path) as f:
        return f["arr_0"], f["arr_1"]


def test_roundtrip_checkpoint(model):
    loaded = load_model(model)
    assert loaded.kind == "cd" and loaded.ts == (0, 22, 39) and loaded.num_levels == 40
    assert loaded.num_classes == 6 and loaded.source == "cmboost"


def test_sample_file_and_batch_size_invariance(model, tmp_path):
    assert _sample(model, tmp_path / "a.npz", "--steps", "2", "--batch-size", "7") == 0
    assert _sample(model, tmp_path / "b.npz", "--steps", "2", "--batch-size", "3") == 0
    a, la = _load(tmp_path / "a.npz")
    b, lb = _load(tmp_path / "b.npz")
    assert a.shape == (7, 8, 8, 3) and a.dtype == np.uint8 and la.dtype == np.int64
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # equal up to a rare rounding flip
    assert not (tmp_path / "a.npz.job").exists()
    assert _sample(model, tmp_path / "c.npz", "--steps", "1") == 0
    c, lc = _load(tmp_path / "c.npz")
    np.testing.assert_array_equal(lc, la)  # labels depend on (seed, index) only
    assert not np.array_equal(c, a)


def test_resume_after_interruption(model, tmp_path, monkeypatch):
    assert _sample(model, tmp_path / "full.npz", "--steps", "2", "--batch-size", "2") == 0
    real, calls = sample_mod.sample_batch, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_mod, "sample_batch", flaky)
    out = tmp_path / "resumed.npz"
    assert _sample(model, out, "--steps", "2", "--batch-size", "2") == 130
    assert not out.exists() and len(list((tmp_path / "resumed.npz.job").glob("part-*.npz"))) == 2
    monkeypatch.setattr(sample_mod, "sample_batch", real)
    # different settings must not mix with the unfinished parts
    assert _sample(model, out, "--steps", "1", "--batch-size", "2") == 2
    assert _sample(model, out, "--steps", "2", "--batch-size", "3") == 0  # batch size may change
    np.testing.assert_array_equal(_load(out)[1], _load(tmp_path / "full.npz")[1])
    np.testing.assert_array_equal(_load(out)[0], _load(tmp_path / "full.npz")[0])  # fixed blocks: same bytes


def test_class_labels_flag(model, tmp_path):
    assert _sample(model, tmp_path / "l.npz", "--class-labels", "2,5") == 0
    assert set(_load(tmp_path / "l.npz")[1].tolist()) <= {2, 5}
    assert _sample(model, tmp_path / "m.npz", "--class-labels", "9") == 2


def test_input_errors(model, tmp_path, capsys):
    assert _sample(tmp_path / "cd_imagenet64_l2.pt", tmp_path / "x.npz") == 2
    err = capsys.readouterr().err
    assert "openai/consistency_models" in err and err.count("\n") == 1
    (tmp_path / "exists.npz").write_bytes(b"keep")
    assert _sample(model, tmp_path / "exists.npz") == 2
    assert (tmp_path / "exists.npz").read_bytes() == b"keep"
    assert _sample(model, tmp_path / "y.npz", "--steps", "3") == 2
    assert "--ts and --N" in capsys.readouterr().err
    assert _sample(model, tmp_path / "y.npz", "--ts", "0,50", "--N", "40") == 2
    assert _sample(model, tmp_path / "y.npz", "--ts", "0,22,39", "--N", "40", "--steps", "2") == 0
    assert not list(tmp_path.glob("*.job"))


class NotWeights:
    """Anything but tensors: weights_only loading must refuse to unpickle it."""


def test_openai_pt_loading_is_weights_only(tmp_path):
    bad = tmp_path / "cd_imagenet64_l2.pt"
    torch.save({"x": NotWeights()}, bad)
    with pytest.raises(UserInputError, match="weights_only"):
        load_model(bad)
    wrong = tmp_path / "ct_imagenet64.pt"
    torch.save({"time_embed.0.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(UserInputError, match="missing"):
        load_model(wrong)
    from cmboost.cm.checkpoint import openai_kind_from_name
    assert [openai_kind_from_name(Path(n)) for n in ("cd_imagenet64_lpips.pt", "ct_imagenet64.pt", "x.pt")] == \
        ["cd", "ct", None]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_one(model, tmp_path):
    assert _sample(model, tmp_path / "one.npz", "--steps", "2", "--batch-size", "2") == 0
    # torchrun's own parser would take "--num" for its "--numa-binding": pass the verb's args via a file
    args = ["sample", "--model", str(model), "--num", "7", "--out", str(tmp_path / "two.npz"), "--no-progress",
            "--device", "cpu", "--seed", "3", "--steps", "2", "--batch-size", "2", "--block-size", "2"]
    (tmp_path / "args.json").write_text(json.dumps(args))
    script = Path(__file__).with_name("_torchrun_cm_cli.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), str(tmp_path / "args.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(_load(tmp_path / "two.npz")[1], _load(tmp_path / "one.npz")[1])
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()  # blocks dealt to both ranks


def test_openai_state_dict_roundtrip(model, tmp_path):
    """A bare state_dict saved with torch.save (OpenAI's format) loads with weights_only and the same outputs."""
    from cmboost.cm.checkpoint import load_openai

    ours = load_model(model)
    path = tmp_path / "ct_tiny.pt"
    torch.save(ours.net.state_dict(), path)
    theirs = load_openai(path, unet_config=UNET)
    assert theirs.kind == "ct" and theirs.ts == (0, 106, 200) and theirs.num_levels == 201
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 700.0]), torch.tensor([1, 5])
    with torch.no_grad():
        torch.testing.assert_close(theirs.net(x, t, y), ours.net(x, t, y))
