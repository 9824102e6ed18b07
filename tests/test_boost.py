import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cmboost.boosting import methods as boost_mod
from cmboost.boosting.boost import BoostRun, boost as boost_verb
from cmboost.boosting.methods import boost, joint_score, make_hyper, realness
from cmboost.cli import main as cli_main
from cmboost.files.datasets import fashion_mnist, pad_to
from cmboost.files.samples import load_samples, save_samples, to_float
from cmboost.errors import UserInputError
from cmboost.jcd.model import load_joint_model, save_joint_model


class TinyJoint(torch.nn.Module):
    """A linear joint network on 1x8x8 images: small enough for hand computations."""

    def __init__(self, num_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(64, num_classes)
        self.num_classes, self.in_channels, self.image_size = num_classes, 1, 8

    def logits(self, x):
        return self.fc(x.flatten(1))


def random_images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("method", ["pgd", "sgld", "bigroc"])
def test_zero_steps_is_identity(method):
    x, y = random_images()
    assert torch.equal(boost(TinyJoint(), x, y, method, steps=0), x)


def test_pgd_stays_in_the_ball_and_bounds_and_raises_the_score():
    model = TinyJoint()
    x, y = random_images(16)
    out = boost(model, x, y, "pgd", eps=0.5, steps=5, objective="both", realness_kind="sigmoid")
    assert (out - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        before = joint_score(model.logits(x), y, "both", "sigmoid")
        after = joint_score(model.logits(out), y, "both", "sigmoid")
    assert (after > before).all()


def test_pgd_early_stopped_examples_do_not_move():
    model = TinyJoint()
    x, y = random_images(16)
    with torch.no_grad():
        start = realness(model.logits(x), y, "softmax")
    threshold = start.median().item()
    out = boost(model, x, y, "pgd", eps=1.0, steps=5, realness_kind="softmax", threshold=threshold)
    already_real = start >= threshold
    assert already_real.any() and (~already_real).any()
    assert torch.equal(out[already_real], x[already_real])
    assert not torch.equal(out[~already_real], x[~already_real])


def test_unknown_or_bad_hyperparameters_are_errors():
    with pytest.raises(UserInputError, match="has no hyperparameter gamma"):
        make_hyper("pgd", gamma=1.0)
    with pytest.raises(UserInputError, match="--objective"):
        make_hyper("pgd", objective="fid")
    with pytest.raises(UserInputError, match="--method"):
        make_hyper("magic")


def test_sgld_without_noise_matches_a_hand_written_reference():
    model = TinyJoint()
    x, y = random_images(5)
    steps, step = 4, 0.05
    out = boost(model, x, y, "sgld", steps=steps, step=step, noise=0.0)
    expected = x.clone()
    for _ in range(steps):  # f_y(x) = W_y . x + b_y, so grad_x f_y = W_y
        expected = expected + step * model.fc.weight[y].detach().view(-1, 1, 8, 8)
    torch.testing.assert_close(out, expected.clamp(0, 1))


def test_sgld_noise_is_per_sample_and_batch_invariant():
    model = TinyJoint()
    x, y = random_images(6)
    whole = boost(model, x, y, "sgld", steps=3, noise=0.01, seed=5)
    halves = torch.cat([boost(model, x[:4], y[:4], "sgld", steps=3, noise=0.01, seed=5, indices=range(4)),
                        boost(model, x[4:], y[4:], "sgld", steps=3, noise=0.01, seed=5, indices=range(4, 6))])
    torch.testing.assert_close(whole, halves, rtol=0, atol=1e-6)


def test_model_state_is_restored():
    model = TinyJoint().train()
    x, y = random_images()
    boost(model, x, y, "pgd", steps=2)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def trained_tiny():
    """A linear classifier trained briefly on Fashion-MNIST (center 8x8 crop, 3 classes)."""
    images, labels = fashion_mnist("train")
    keep = labels < 3
    x = to_float(images[keep][:3000, None, 10:18, 10:18])
    y = torch.as_tensor(labels[keep][:3000])
    model = TinyJoint(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x[:64], y[:64]


def test_pgd_raises_the_objective_on_a_trained_model(trained_tiny):
    model, x, y = trained_tiny
    out = boost(model, x, y, "pgd", eps=1.0, steps=8, objective="both", realness_kind="softmax")
    with torch.no_grad():
        gain = joint_score(model.logits(out), y, "both", "softmax") - joint_score(model.logits(x), y, "both", "softmax")
    assert gain.mean() > 0.1 and (gain >= -1e-6).all()


def test_bf16_matches_fp32_within_stated_tolerance(trained_tiny):
    """bf16 autocast moves each image by a different but close path: mean |diff| <= 2/255, max <= 0.1."""
    model, x, y = trained_tiny
    full = boost(model, x, y, "pgd", eps=1.0, steps=8)
    half = boost(model, x, y, "pgd", eps=1.0, steps=8, precision="bf16")
    diff = (full - half).abs()
    assert diff.mean() <= 2 / 255 and diff.max() <= 0.1


# ----------------------------------------------------------------------------- the file job and the CLI

@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory):
    from cmboost.jcd.model import build_joint_model, save_joint_model

    torch.manual_seed(0)
    model = build_joint_model("resnet_small", num_classes=10, in_channels=1, image_size=32)
    path = tmp_path_factory.mktemp("model") / "jcd.safetensors"
    save_joint_model(model, path)
    return path


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    images, labels = fashion_mnist("test")
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    save_samples(path, pad_to(images[:10, None], 32), labels[:10])
    return path


def boost_args(samples, model, out, *extra):
    return ["boost", str(samples), "--model", str(model), "--out", str(out), "--method", "pgd", "--steps", "3",
            "--eps", "2", "--batch-size", "4", "--block-size", "4", "--device", "cpu", *extra]


def test_cli_boost_writes_labels_and_grid_and_refuses_overwrite(tmp_path, small_model_file, sample_file, capsys):
    out = tmp_path / "boosted.npz"
    assert cli_main(boost_args(sample_file, small_model_file, out)) == 0
    images, labels = load_samples(out)
    before, before_labels = load_samples(sample_file)
    assert images.shape == before.shape and np.array_equal(labels, before_labels)
    assert not np.array_equal(images, before)
    assert (tmp_path / "boosted.grid.png").is_file()
    assert not (tmp_path / "boosted.npz.job").exists()
    assert cli_main(boost_args(sample_file, small_model_file, out)) == 2
    assert "already exists" in capsys.readouterr().err
    out.unlink()  # a leftover grid is refused before any boosting, not after
    assert cli_main(boost_args(sample_file, small_model_file, out)) == 2
    assert "boosted.grid.png: already exists" in capsys.readouterr().err and not out.exists()


def test_cli_boost_dry_run_and_input_checks(tmp_path, small_model_file, capsys):
    ok = tmp_path / "ok.npz"
    save_samples(ok, np.zeros((2, 1, 32, 32), np.uint8), np.array([1, 2]))
    assert cli_main(boost_args(ok, small_model_file, tmp_path / "o.npz", "--dry-run")) == 0
    assert '"method": "pgd"' in capsys.readouterr().out and not (tmp_path / "o.npz").exists()
    cases = {
        "labels.npz": (np.zeros((2, 1, 32, 32), np.uint8), np.array([1, 10]), "label 10 out of range"),
        "size.npz": (np.zeros((2, 1, 28, 28), np.uint8), np.array([1, 2]), "28x28, the model takes 32x32"),
        "rgb.npz": (np.zeros((2, 3, 32, 32), np.uint8), np.array([1, 2]), "3 channels, the model takes 1"),
    }
    for name, (images, labels, message) in cases.items():
        save_samples(tmp_path / name, images, labels)
        assert cli_main(boost_args(tmp_path / name, small_model_file, tmp_path / "o.npz")) == 2
        err = capsys.readouterr().err
        assert message in err and name in err and err.count("\n") == 1
    assert cli_main(boost_args(ok, small_model_file, tmp_path / "o.npz", "--sgld-noise", "0.1")) == 2
    assert "--sgld-noise does not apply to --method pgd" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_resume_after_a_crash_is_bit_identical(tmp_path, small_model_file, sample_file, monkeypatch):
    def run(out, model=small_model_file, hyper={"eps": 2.0, "steps": 3}):
        return boost_verb(BoostRun(samples=str(sample_file), model=str(model), out=str(tmp_path / out), method="pgd",
                              hyper=hyper, batch_size=4, block_size=4, device="cpu", progress=False))

    reference = run("ref.npz")
    calls = {"n": 0}
    real = boost_mod.boost_with

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr("cmboost.boosting.boost.boost_with", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("out.npz")
    assert not (tmp_path / "out.npz").exists()
    assert len(list((tmp_path / "out.npz.job").glob("part-*.npz"))) == 2
    monkeypatch.setattr("cmboost.boosting.boost.boost_with", real)
    with pytest.raises(UserInputError, match="another configuration"):
        run("out.npz", hyper={"eps": 1.0, "steps": 3})
    other = load_joint_model(small_model_file)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    save_joint_model(other, tmp_path / "other.safetensors")
    with pytest.raises(UserInputError, match="another configuration"):  # same settings, other weights
        run("out.npz", model=tmp_path / "other.safetensors")
    run("out.npz")
    assert (tmp_path / "out.npz").read_bytes() == reference.read_bytes()


def test_kill_9_then_rerun_gives_the_same_file(tmp_path, small_model_file, sample_file):
    args = boost_args(sample_file, small_model_file, tmp_path / "k.npz", "--batch-size", "1", "--block-size", "1", "--steps", "6",
                      "--no-grid")
    cmd = [sys.executable, "-m", "cmboost", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "k.npz.job"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k.npz").exists(), "the job finished before it could be killed"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    uninterrupted = boost_args(sample_file, small_model_file, tmp_path / "u.npz", "--batch-size", "1",
                               "--block-size", "1", "--steps", "6", "--no-grid")
    assert cli_main(uninterrupted) == 0
    assert (tmp_path / "k.npz").read_bytes() == (tmp_path / "u.npz").read_bytes()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_file_as_one(tmp_path, small_model_file, sample_file, repo_root):
    single = tmp_path / "one.npz"
    assert cli_main(boost_args(sample_file, small_model_file, single, "--no-grid")) == 0
    double = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(repo_root / "tests" / "_torchrun_boost.py"), *boost_args(sample_file, small_model_file, double, "--no-grid")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert single.read_bytes() == double.read_bytes()


def test_cli_pgd_reads_the_realness_kind_the_network_was_trained_with(tmp_path, sample_file, capsys):
    from cmboost.jcd.model import build_joint_model, save_joint_model

    path = tmp_path / "bce.safetensors"
    save_joint_model(build_joint_model("resnet_small", 10, 1, 32), path, extra={"realness_kind": "sigmoid"})
    assert cli_main(boost_args(sample_file, path, tmp_path / "o.npz", "--dry-run")) == 0
    assert '"realness_kind": "sigmoid"' in capsys.readouterr().out
    assert cli_main(boost_args(sample_file, path, tmp_path / "o.npz", "--dry-run", "--realness", "softmax")) == 0
    assert '"realness_kind": "softmax"' in capsys.readouterr().out


def test_cli_pgd_boosts_at_the_radius_the_network_was_trained_robust_at(tmp_path, sample_file, capsys):
    from cmboost.jcd.model import build_joint_model, save_joint_model

    def eps_of(model, *extra):
        args = ["boost", str(sample_file), "--model", str(model), "--out", str(tmp_path / "o.npz"), "--method", "pgd",
                "--device", "cpu", "--dry-run", *extra]
        assert cli_main(args) == 0
        return json.loads(capsys.readouterr().out)["hyper"]["eps"]

    net = build_joint_model("resnet_small", 10, 1, 32)
    robust, linf, plain = (tmp_path / f"{n}.safetensors" for n in ("robust", "linf", "plain"))
    save_joint_model(net, robust, extra={"train_jcd": {"attack_norm": "l2", "real_eps": 1.5}})
    save_joint_model(net, linf, extra={"train_jcd": {"attack_norm": "linf", "real_eps": 0.03}})
    save_joint_model(net, plain)
    assert eps_of(robust) == 1.5
    assert eps_of(robust, "--eps", "2") == 2.0        # a flag given overrides the recorded radius
    assert eps_of(linf) == eps_of(plain) == 3.0       # no L2 radius recorded: PGDBoost's default
