"""train-jcd: learning on Fashion-MNIST, exact resume, DDP == one process, input checks."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from _edm_teacher import random_edm_teacher
from cmboost.cli import main as cli_main
from cmboost.files.datasets import load_dataset
from cmboost.files.samples import save_samples
from cmboost.errors import UserInputError
from cmboost.jcd.model import build_joint_model, load_joint_model, save_joint_model
from cmboost.jcd.training import IndexStream, TrainConfig, gen_steps_at, rank_share, train_jcd


def degrade(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The stand-in "generated" images: a 5x5 box blur plus N(0, 0.1^2) noise, quantised."""
    blurred = F.conv2d(x, torch.ones(1, 1, 5, 5) / 25, padding=2)
    noise = torch.randn(blurred.shape, generator=torch.Generator().manual_seed(seed))
    return ((blurred + 0.1 * noise).clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module")
def fmnist_generated(tmp_path_factory):
    images, labels, _ = load_dataset("fmnist", "train", image_size=32)
    fake = degrade(torch.from_numpy(images[:2000]).float() / 255, seed=0)
    path = tmp_path_factory.mktemp("gen") / "blurred.npz"
    save_samples(path, (fake * 255).round().to(torch.uint8).numpy(), labels[:2000])
    return path


@pytest.fixture(scope="module")
def held_out():
    images, labels, _ = load_dataset("fmnist", "test", image_size=32)
    real = torch.from_numpy(images[:400]).float() / 255
    return real, degrade(real, seed=1), torch.from_numpy(labels[:400])


def realness_gap(model, held_out, kind):
    real, fake, y = held_out
    model.eval()
    with torch.no_grad():
        return float(model.realness(real, y, kind).mean() - model.realness(fake, y, kind).mean())


# Attack sizes scaled from 64x64x3 to 32x32x1 (x sqrt(1024 / 12288) ~ 0.3) and a CPU-sized lr.
FAST = dict(real_limit=5000, batch_size=32, lr=3e-3, real_eps=0.3, real_step_size=0.15,
            gen_step_size=0.03, gen_steps=3, log_every=20, device="cpu")


def test_short_run_widens_the_realness_gap(tmp_path, fmnist_generated, held_out):
    config = TrainConfig(data="fmnist", generated=[str(fmnist_generated)], run_dir=str(tmp_path / "run"),
                         iters=100, arch="resnet_small", objective="joint", **FAST)
    torch.manual_seed(config.seed)
    before = realness_gap(build_joint_model("resnet_small", 10, 1, 32), held_out, "softmax")
    path = train_jcd(config)
    model = load_joint_model(path)
    after = realness_gap(model, held_out, "softmax")
    assert abs(before) < 0.02
    assert after > before + 0.08, (before, after)
    with torch.no_grad():
        accuracy = float((model.logits(held_out[0]).argmax(1) == held_out[2]).float().mean())
    assert accuracy > 0.35  # the joint loss trains the classifier too
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60, 80, 100]
    for key in ("loss", "joint_real", "joint_gen", "acc_real", "acc_real_adv", "acc_gen", "acc_gen_adv",
                "realness_real", "realness_real_adv", "realness_gen", "realness_gen_adv", "lr", "gen_steps"):
        assert key in records[-1], key
    # the attacks do their job: attacked real looks less real, attacked generated more real
    assert sum(r["realness_real_adv"] <= r["realness_real"] for r in records) >= 4


def test_cli_ce_bce_run_widens_the_sigmoid_gap(tmp_path, fmnist_generated, held_out, capsys):
    # (bce alone, from scratch, sits on a plateau for ~100 iterations; the CE terms get it going)
    args = ["train-jcd", "--data", "fmnist", "--generated", str(fmnist_generated), "--arch", "resnet_small",
            "--objective", "ce+bce", "--iters", "60", "--run-dir", str(tmp_path / "run"), "--real-limit", "5000",
            "--batch-size", "32", "--lr", "3e-3", "--real-eps", "0.3", "--real-step-size", "0.15",
            "--gen-step-size", "0.03", "--gen-steps", "3", "--log-every", "30", "--device", "cpu"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "it 60/60" in out and "real_adv acc" in out and "bce_real" in out and "ce_gen" in out
    model = load_joint_model(tmp_path / "run" / "model.safetensors")
    torch.manual_seed(0)
    assert abs(realness_gap(build_joint_model("resnet_small", 10, 1, 32), held_out, "sigmoid")) < 0.02
    assert realness_gap(model, held_out, "sigmoid") > 0.03


# ----------------------------------------------------------------------------- tiny data

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-class folder dataset of 16x16 RGB PNGs and 20 generated images."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "data" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "data" / f"c{c}" / f"{i}.png")
    save_samples(root / "gen.npz", rng.integers(0, 256, (20, 3, 16, 16), dtype=np.uint8), rng.integers(0, 2, 20))
    return root


def tiny_args(tiny, run_dir, iters, *extra):
    return ["train-jcd", "--data", f"folder:{tiny / 'data'}", "--generated", str(tiny / "gen.npz"),
            "--arch", "resnet_small", "--objective", "ce+bce", "--iters", str(iters), "--batch-size", "8",
            "--lr", "1e-2", "--real-eps", "0.5", "--gen-steps", "2", "--gen-steps-every", "2",
            "--log-every", "1", "--ckpt-every", "2", "--device", "cpu", "--run-dir", str(run_dir), *extra]


def weights(run_dir):
    return load_file(run_dir / "model.safetensors")


def test_rerun_resumes_exactly_and_a_finished_run_is_not_retrained(tmp_path, tiny, capsys):
    assert cli_main(tiny_args(tiny, tmp_path / "straight", 4)) == 0
    assert cli_main(tiny_args(tiny, tmp_path / "split", 2)) == 0
    with open(tmp_path / "split" / "log.jsonl", "a") as fh:  # a line an interrupted run wrote after its checkpoint
        fh.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    assert cli_main(tiny_args(tiny, tmp_path / "split", 4)) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["loss"] != 0.0
    assert [r["gen_steps"] for r in log] == [2, 2, 3, 3]  # one more step every 2 iterations
    stamp = os.stat(tmp_path / "split" / "model.safetensors").st_mtime_ns
    assert cli_main(tiny_args(tiny, tmp_path / "split", 4)) == 0
    assert "already finished" in capsys.readouterr().out
    assert os.stat(tmp_path / "split" / "model.safetensors").st_mtime_ns == stamp
    # a different configuration in the same run directory is refused
    assert cli_main(tiny_args(tiny, tmp_path / "split", 4, "--real-steps", "3")) == 2
    assert "--real-steps" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, tiny, repo_root):
    # with the gradient-alignment term, whose input gradient (create_graph) runs inside DDP's one forward
    align = ["--align-teacher", str(_tiny_teacher(tmp_path / "edm.safetensors", 2)), "--align-weight", "5"]
    assert cli_main(tiny_args(tiny, tmp_path / "one", 3, *align)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(repo_root / "tests" / "_torchrun_train_jcd.py"), *tiny_args(tiny, tmp_path / "two", 3, *align)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = build_joint_model("resnet_small", 2, 3, 16).backbone.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-4), key


def test_init_weights_are_the_starting_point(tmp_path, tiny):
    torch.manual_seed(5)
    start = build_joint_model("resnet_small", 2, 3, 16)
    save_joint_model(start, tmp_path / "init.safetensors")
    assert cli_main(tiny_args(tiny, tmp_path / "run", 0, "--init", str(tmp_path / "init.safetensors"))) == 0
    trained = weights(tmp_path / "run")
    assert all(torch.equal(trained[k], v) for k, v in start.backbone.state_dict().items())
    save_joint_model(build_joint_model("resnet_small", 5, 3, 16), tmp_path / "five.safetensors")
    with pytest.raises(UserInputError, match="the model has 5 classes, --data folder:.* has 2"):
        train_jcd(TrainConfig(data=f"folder:{tiny / 'data'}", generated=[str(tiny / "gen.npz")],
                              run_dir=str(tmp_path / "r2"), iters=1, init=str(tmp_path / "five.safetensors")))


def _tiny_teacher(path, num_classes, channels=3):
    return random_edm_teacher(path, num_classes, channels, size=16)


def test_alignment_term_trains_logs_and_resumes(tmp_path, tiny, capsys):
    """--align-teacher adds the term (logged as align and align_cos), changes the weights against the same
    run without it, resumes exactly, and is part of the run's record (a rerun without it is refused)."""
    teacher = _tiny_teacher(tmp_path / "edm.safetensors", 2)
    align = ["--align-teacher", str(teacher), "--align-weight", "5", "--align-sigma", "0.25"]
    assert cli_main(tiny_args(tiny, tmp_path / "plain", 2)) == 0
    assert cli_main(tiny_args(tiny, tmp_path / "straight", 4, *align)) == 0
    assert cli_main(tiny_args(tiny, tmp_path / "split", 2, *align)) == 0
    assert cli_main(tiny_args(tiny, tmp_path / "split", 4, *align)) == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert all(-1 <= r["align_cos"] <= 1 and r["align"] > 0 for r in log)
    plain = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert "align" not in plain[0] and plain[0]["loss"] != log[0]["loss"]
    capsys.readouterr()
    assert cli_main(tiny_args(tiny, tmp_path / "split", 4)) == 2
    assert "--align-" in capsys.readouterr().err


def test_bad_alignment_teachers_give_one_line(tmp_path, tiny, capsys):
    three = _tiny_teacher(tmp_path / "three.safetensors", 3)
    gray = _tiny_teacher(tmp_path / "gray.safetensors", 2, channels=1)
    save_joint_model(build_joint_model("resnet_small", 2, 3, 16), tmp_path / "jcd.safetensors")
    cases = [(["--align-teacher", str(three)], "has 3 classes"),
             (["--align-teacher", str(gray)], "makes 1x16x16 images"),
             (["--align-teacher", str(tmp_path / "jcd.safetensors")], "--align-teacher"),
             (["--align-teacher", str(tmp_path / "missing.safetensors")], "file not found"),
             (["--align-teacher", str(three), "--align-weight", "0"], "--align-weight 0"),
             (["--align-teacher", str(three), "--align-sigma", "-1"], "--align-sigma -1")]
    for i, (extra, message) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        assert cli_main(tiny_args(tiny, run_dir, 1, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--align" in err and message in err, (message, err)
        assert not run_dir.exists()


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, tiny, capsys):
    rng = np.random.default_rng(1)
    small = tmp_path / "small.npz"
    save_samples(small, rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8), np.zeros(4, dtype=np.int64))
    gray = tmp_path / "gray.npz"
    save_samples(gray, rng.integers(0, 256, (4, 1, 16, 16), dtype=np.uint8), np.zeros(4, dtype=np.int64))
    wide = tmp_path / "wide.npz"
    save_samples(wide, rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8), np.array([0, 1, 2, 1]))
    unlabelled = tmp_path / "unlabelled.npz"
    save_samples(unlabelled, rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8))
    cases = [
        (["--generated", str(small), "--image-size", "16"], "images are 3x8x8 but --data"),
        (["--generated", str(gray)], "images are 1x16x16 but --data"),
        (["--generated", str(wide)], "label 2 out of range for the 2 classes"),
        (["--generated", str(unlabelled)], "no labels"),
        (["--generated", str(tiny / "gen.npz"), str(small)], "images are 3x8x8, but"),
        (["--generated", str(tmp_path / "missing.npz")], "missing.npz: file not found"),
        (["--generated", str(tiny / "gen.npz"), "--batch-size", "0"], "--batch-size 0"),
    ]
    base = ["train-jcd", "--data", f"folder:{tiny / 'data'}", "--arch", "resnet_small", "--iters", "1",
            "--device", "cpu"]
    for i, (extra, message) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        assert cli_main([*base, "--run-dir", str(run_dir), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cmboost train-jcd: error: "), err
        assert message in err, (message, err)
        assert not run_dir.exists()
    assert cli_main(["train-jcd", "--data", "fmnist", "--generated", str(tiny / "gen.npz"), "--iters", "1",
                     "--run-dir", str(tmp_path / "x")]) == 2
    assert "--arch: required" in capsys.readouterr().err


def test_batching_and_curriculum_are_pure_functions():
    stream = IndexStream(10, seed=3, tag=1)
    first = stream.take(0, 25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert np.array_equal(IndexStream(10, 3, 1).take(13, 7), first[13:20])
    assert not np.array_equal(IndexStream(10, 4, 1).take(0, 10), first[:10])
    assert [rank_share(8, r, 2) for r in (0, 1)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(UserInputError, match="divisible"):
        rank_share(9, 0, 2)
    config = TrainConfig(data="fmnist", run_dir="x", iters=1, arch="resnet_small", generated=["gen.npz"])
    assert [gen_steps_at(config, s) for s in (0, 999, 1000, 4500)] == [5, 5, 6, 9]
    config = dataclasses.replace(config, gen_max_steps=7)
    assert gen_steps_at(config, 4500) == 7
