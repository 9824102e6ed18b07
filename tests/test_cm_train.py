"""EDM / CD / CT training on tiny synthetic data: losses go down, schedules, resume, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from cmboost.cm.denoiser import CM_PRECOND, SIGMA_MIN, denoise
from cmboost.cm.losses import (ct_level_probs, ct_num_scales, ect_gap_levels, ect_loss, ect_stage, edm_loss,
                               karras_levels)
from cmboost.cm.losses import teacher_heun_step as heun_step
from cmboost.cm.training import Trainer, train
from cmboost.cm.train_config import TrainSettings, small_unet_config
from cmboost.errors import UserInputError

CPU = torch.device("cpu")


def synthetic(n=256, seed=0):
    """Class c: a bright horizontal bar at row 2 + 3c on a dark 16x16 image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = np.zeros((n, 1, 16, 16), np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, 2 + 3 * c:5 + 3 * c, 2:14] = 200 + rng.integers(0, 50)
    return images, labels


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def unet():
    return small_unet_config(image_size=16, in_channels=1, num_classes=4, model_channels=16, channel_mult=(1, 2),
                             attention_resolutions=(8,), num_head_channels=16)


def _eval_batch(data):
    images, labels = data
    return torch.from_numpy(images[:64]).float() / 127.5 - 1, torch.from_numpy(labels[:64])


def _train_and_compare(trainer, data, iters, num_scales=None):
    x, y = _eval_batch(data)
    before = np.mean([trainer.evaluate(x, y, seed, num_scales) for seed in range(3)])
    for _ in range(iters):
        loss = trainer.step()
        assert math.isfinite(loss)
    after = np.mean([trainer.evaluate(x, y, seed, num_scales) for seed in range(3)])
    return before, after


@pytest.fixture(scope="module")
def teacher(data, unet, tmp_path_factory):
    settings = TrainSettings(mode="edm", iters=40, unet=dict(unet), batch_size=16, lr=2e-3, warmup=5)
    trainer = Trainer(settings, *data, CPU)
    before, after = _train_and_compare(trainer, data, settings.iters)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    trainer.export(path)
    return path, before, after


def test_edm_loss_decreases(teacher):
    _, before, after = teacher
    assert after < 0.6 * before


def test_cd_loss_decreases(data, teacher):
    settings = TrainSettings(mode="cd", iters=30, unet={}, batch_size=16, lr=1e-3, warmup=5, teacher=str(teacher[0]),
                             num_scales=10, init_from_teacher=False)
    before, after = _train_and_compare(Trainer(settings, *data, CPU), data, settings.iters)
    assert after < 0.7 * before


def test_cd_starts_from_teacher(data, teacher):
    settings = TrainSettings(mode="cd", iters=1, unet={}, batch_size=4, teacher=str(teacher[0]))
    trainer = Trainer(settings, *data, CPU)
    for (name, a), b in zip(trainer.net.state_dict().items(), trainer.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert settings.unet["model_channels"] == 16  # the architecture comes from the teacher


def test_cd_refuses_a_consistency_teacher(data, unet, tmp_path):
    ct = Trainer(TrainSettings(mode="ct", iters=1, unet=dict(unet)), *data, CPU)
    ct.export(tmp_path / "ct.safetensors")
    with pytest.raises(UserInputError, match="EDM teacher"):
        Trainer(TrainSettings(mode="cd", iters=1, unet={}, teacher=str(tmp_path / "ct.safetensors")), *data, CPU)


def test_ct_loss_decreases(data, unet):
    settings = TrainSettings(mode="ct", iters=40, unet=dict(unet), batch_size=16, lr=1e-3, warmup=5,
                             start_scales=10, end_scales=40, distance="pseudo-huber")
    before, after = _train_and_compare(Trainer(settings, *data, CPU), data, settings.iters, num_scales=21)
    assert after < 0.85 * before  # pseudo-Huber ~ an L2 norm, not its square: it falls about as its sqrt


def test_ct_curriculum_and_level_distribution():
    # K = 1000, s0 = 10, s1 = 160: log2(16) + 1 = 5 stages of 200 iterations
    assert [ct_num_scales(k, 1000, 10, 160) for k in (0, 199, 200, 400, 799, 800, 999)] == [11, 11, 21, 41, 81, 161, 161]
    probs = ct_level_probs(41, -1.1, 2.0)
    assert probs.shape == (40,) and probs.sum().item() == pytest.approx(1.0)
    levels = karras_levels(41)
    assert levels[0].item() == pytest.approx(0.002) and levels[-1].item() == pytest.approx(80.0)
    mode = int(probs.argmax())
    assert levels[mode] < math.exp(-1.1) * 3 and levels[mode + 1] > math.exp(-1.1) / 3  # mass near e^P_mean


def test_ect_curriculum_shrinks_the_gap_by_q():
    # d = 100: stage 0 at the first iteration only, then ceil(k / d)
    assert [ect_stage(k, 100) for k in (0, 1, 100, 101, 200, 799, 800)] == [0, 1, 1, 2, 2, 8, 8]
    t = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    assert torch.equal(ect_gap_levels(t, 0, 2.0), torch.zeros_like(t))  # stage 0: the teacher's denoising task
    gaps = [t - ect_gap_levels(t, stage, 2.0) for stage in range(3, 9)]
    for a, b in zip(gaps, gaps[1:]):
        torch.testing.assert_close(b, a / 2)  # once r > 0, each stage halves the gap
    # n(t) = 1 + 8 sigmoid(-t): the gap is relatively widest at small t
    ratio = gaps[-1] / t
    assert bool((ratio[1:] < ratio[:-1]).all()) and ratio[0].item() == pytest.approx((1 + 8 / (1 + math.exp(0.01))) / 256)
    r = ect_gap_levels(t, 12, 2.0)
    assert bool((r < t).all()) and bool((r > 0.99 * t).all())


def test_ect_loss_is_denoising_early_and_consistency_late():
    net = Toy()
    x, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.2, 1.0, 1.5])
    # stage 1 with q 2: r = t (1 - n(t)/2) < 0 for these t, so the target is the clean image
    assert bool((ect_gap_levels(t, 1, 2.0) < SIGMA_MIN).all())
    online = denoise(net, x + t.view(-1, 1, 1, 1) * noise, t, None, CM_PRECOND)
    expected = (online - x).flatten(1).pow(2).mean(1) / t
    torch.testing.assert_close(ect_loss(net, x, None, t, noise, 1, 2.0, "l2"), expected)
    # a late stage: the target is the same network at r, with the same noise
    r = ect_gap_levels(t, 8, 2.0)
    target = denoise(net, x + r.view(-1, 1, 1, 1) * noise, r, None, CM_PRECOND)
    expected = (online - target).flatten(1).pow(2).mean(1) / (t - r)
    torch.testing.assert_close(ect_loss(net, x, None, t, noise, 8, 2.0, "l2"), expected)


def test_ect_starts_from_the_teacher_and_samples_as_ct(data, teacher, tmp_path):
    settings = TrainSettings(mode="ect", iters=30, unet={}, batch_size=16, lr=1e-3, warmup=5, teacher=str(teacher[0]),
                             ect_stages=3, distance="pseudo-huber")
    trainer = Trainer(settings, *data, CPU)
    from cmboost.cm.checkpoint import load_model, read_config
    start = load_model(teacher[0]).net.state_dict()
    for name, value in trainer.net.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert trainer.teacher is None and settings.unet["model_channels"] == 16  # weights only, architecture kept
    assert [trainer.num_scales_at(k) for k in (0, 1, 10, 11, 29)] == [0, 1, 1, 2, 3]
    before, after = _train_and_compare(trainer, data, settings.iters, num_scales=3)  # the last stage's loss
    assert after < 0.9 * before
    config = read_config(trainer.export(tmp_path / "ect.safetensors"))
    assert config["kind"] == "ct" and config["sampler"] == {"ts": [0, 24, 39], "N": 40}
    assert config["train"]["mode"] == "ect"
    with pytest.raises(UserInputError, match="--mode ect needs --teacher"):
        TrainSettings(mode="ect", iters=1, unet={})
    with pytest.raises(UserInputError, match="--ect-q"):
        TrainSettings(mode="ect", iters=1, unet={}, teacher="t", ect_q=1.0)


class Toy(torch.nn.Module):
    def forward(self, x, t, y):
        return 0.3 * x + 0.001 * t.view(-1, 1, 1, 1)


def test_edm_loss_and_heun_step_by_hand():
    x, n = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    sigma = torch.tensor([0.5, 3.0])
    got = edm_loss(Toy(), x, None, sigma, n)
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in = 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25), 1 / math.sqrt(s * s + 0.25)
        xn = x[i] + s * n[i]
        d = c_skip * xn + c_out * (0.3 * c_in * xn + 0.001 * 250 * math.log(s))
        expected = (s * s + 0.25) / (s * 0.5) ** 2 * (d - x[i]).pow(2).mean()
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-4)
    # one Heun step equals the trapezoid rule written out
    t0, t1 = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])
    den = lambda z, s: (0.25 / (s * s + 0.25)) * z + (s * 0.5 / math.sqrt(s * s + 0.25)) * (
        0.3 * z / math.sqrt(s * s + 0.25) + 0.001 * 250 * math.log(s))
    d0 = (x - den(x, 2.0)) / 2.0
    xe = x - d0
    expected = x - 0.5 * (d0 + (xe - den(xe, 1.0)) / 1.0)
    torch.testing.assert_close(heun_step(Toy(), x, t0, t1, None), expected, atol=1e-5, rtol=1e-5)


def test_resume_is_exact_and_settings_are_checked(data, unet, tmp_path):
    def settings(iters=4, lr=1e-3):
        return TrainSettings(mode="edm", iters=iters, unet=dict(unet), batch_size=4, lr=lr, warmup=2)

    train(settings(4), tmp_path / "straight", *data, CPU, save_every=2, progress=False)
    train(settings(2), tmp_path / "resumed", *data, CPU, save_every=2, progress=False)
    train(settings(4), tmp_path / "resumed", *data, CPU, save_every=2, progress=False)  # rerun, longer
    from cmboost.files.checkpoints import read_safetensors
    a, meta_a = read_safetensors(tmp_path / "straight" / "state.safetensors")
    b, meta_b = read_safetensors(tmp_path / "resumed" / "state.safetensors")
    assert meta_a["step"] == meta_b["step"] == "4"
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["iter"] == 4
    with pytest.raises(UserInputError, match="lr"):
        train(settings(6, lr=5e-4), tmp_path / "resumed", *data, CPU, progress=False)


def test_cli_train_then_sample(tmp_path, capsys):
    from PIL import Image

    from cmboost.cli import main

    images, labels = synthetic(24)
    for i, (im, c) in enumerate(zip(images, labels)):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[0]).convert("RGB").save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    common = ["--data", f"folder:{tmp_path / 'data'}", "--iters", "2", "--batch-size", "4", "--model-channels", "16",
              "--channel-mult", "1,2", "--num-head-channels", "16", "--no-progress", "--device", "cpu"]
    assert main(["train-cm", "--mode", "ct", "--run-dir", str(tmp_path / "ct"), *common]) == 0
    model = tmp_path / "ct" / "model.safetensors"
    from cmboost.cm.checkpoint import read_config
    config = read_config(model)
    assert config["kind"] == "ct" and config["sampler"]["N"] == 161 and config["iterations"] == 2
    assert main(["sample", "--model", str(model), "--num", "5", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--no-progress", "--device", "cpu"]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (5, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].max() < len(set(labels.tolist()))
    assert main(["train-cm", "--mode", "cd", "--run-dir", str(tmp_path / "cd"), *common]) == 2
    assert "--teacher" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [None, "1e-6"], ids=["to-the-end", "max-minutes"])
def test_torchrun_ddp_training(tmp_path, budget):
    """Two gloo ranks train a tiny CT model through DDP and rank 0 exports it; with a budget spent
    at once, both ranks stop after the first iteration together (neither waits for the other)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    images, labels = synthetic(16)
    for i, (im, c) in enumerate(zip(images, labels)):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[0]).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    args = ["train-cm", "--mode", "ct", "--run-dir", str(tmp_path / "run"), "--data", f"folder:{tmp_path / 'data'}",
            "--iters", "2", "--batch-size", "2", "--model-channels", "16", "--channel-mult", "1,2",
            "--num-head-channels", "16", "--no-progress", "--device", "cpu"]
    if budget:
        args += ["--max-minutes", budget]
    (tmp_path / "args.json").write_text(json.dumps(args))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(Path(__file__).with_name("_torchrun_cm_cli.py")), str(tmp_path / "args.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    from cmboost.cm.checkpoint import read_config
    assert read_config(tmp_path / "run" / "model.safetensors")["iterations"] == (1 if budget else 2)
    if budget:
        assert done.stdout.count("stopped at iteration 1/2") == 1, done.stdout  # printed by rank 0 only


def _fake_clock(minutes_per_read=1.0):
    """A clock that moves `minutes_per_read` minutes each time it is read (train reads it once at the
    start and once after each iteration): iteration k ends at minute k, whatever the machine's speed."""
    reads = iter(range(10 ** 6))
    return lambda: 60.0 * minutes_per_read * next(reads)


def test_max_minutes_stops_at_an_iteration_boundary_and_resumes_exactly(data, unet, tmp_path, capsys):
    from cmboost.files.checkpoints import read_safetensors
    from cmboost.cm.checkpoint import read_config

    def settings():
        return TrainSettings(mode="edm", iters=6, unet=dict(unet), batch_size=4, lr=1e-3, warmup=2)

    train(settings(), tmp_path / "straight", *data, CPU, save_every=100, progress=False)
    capsys.readouterr()
    run = tmp_path / "budget"
    train(settings(), run, *data, CPU, save_every=100, progress=False, max_minutes=2.5, clock=_fake_clock())
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "stopped at iteration 3/6" in out[0] and "--max-minutes 2.5" in out[0], out
    _, meta = read_safetensors(run / "state.safetensors")
    assert meta["step"] == "3" and read_config(run / "model.safetensors")["iterations"] == 3
    assert [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines()] == [3]
    # rerun with the budget: two more iterations; then without it: to the end
    train(settings(), run, *data, CPU, save_every=100, progress=False, max_minutes=2, clock=_fake_clock())
    assert "stopped at iteration 5/6" in capsys.readouterr().out
    train(settings(), run, *data, CPU, save_every=100, progress=False)
    assert "trained edm for 6 iterations" in capsys.readouterr().out
    a, meta_a = read_safetensors(tmp_path / "straight" / "state.safetensors")
    b, meta_b = read_safetensors(run / "state.safetensors")
    assert meta_a["step"] == meta_b["step"] == "6" and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines()] == [3, 5, 6]


def test_max_minutes_never_stops_a_run_before_its_first_iteration_nor_after_its_last(data, unet, tmp_path, capsys):
    from cmboost.files.checkpoints import read_safetensors

    settings = TrainSettings(mode="edm", iters=2, unet=dict(unet), batch_size=4, lr=1e-3, warmup=2)
    train(settings, tmp_path / "a", *data, CPU, progress=False, max_minutes=1e-9, clock=_fake_clock())
    assert "stopped at iteration 1/2" in capsys.readouterr().out  # always one iteration: every rerun progresses
    train(settings, tmp_path / "a", *data, CPU, progress=False, max_minutes=1, clock=_fake_clock())
    out = capsys.readouterr().out
    assert "stopped" not in out and "trained edm for 2 iterations" in out  # the last iteration ends the run
    assert read_safetensors(tmp_path / "a" / "state.safetensors")[1]["step"] == "2"


def test_cli_max_minutes(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from cmboost.cli import main
    from cmboost.cm import training
    from cmboost.cm.checkpoint import read_config

    images, labels = synthetic(12)
    for i, (im, c) in enumerate(zip(images, labels)):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[0]).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    argv = ["train-cm", "--mode", "edm", "--run-dir", str(tmp_path / "run"), "--data", f"folder:{tmp_path / 'data'}",
            "--iters", "4", "--batch-size", "2", "--model-channels", "16", "--channel-mult", "1,2",
            "--num-head-channels", "16", "--no-progress", "--device", "cpu"]
    monkeypatch.setattr(training, "wall_clock", _fake_clock())
    assert main(argv + ["--max-minutes", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "stopped at iteration 2/4" in out[0] and "rerun the same command" in out[0]
    assert read_config(tmp_path / "run" / "model.safetensors")["iterations"] == 2
    assert main(argv) == 0  # the same command without the budget resumes and finishes
    out = capsys.readouterr().out
    assert "resuming" in out and "at iteration 2/4" in out and "trained edm for 4 iterations" in out
    assert read_config(tmp_path / "run" / "model.safetensors")["iterations"] == 4
    for bad in ("0", "-1", "nan", "inf"):
        assert main(argv[:4] + [str(tmp_path / "never")] + argv[5:] + ["--max-minutes", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: --max-minutes {bad}" in err, err
    assert not (tmp_path / "never").exists()
