"""The GPU code paths, which only a CUDA machine runs: bf16/fp16 autocast against fp32, torch.compile
against eager, channels-last against contiguous, the fp16 GradScaler in train-jcd, a 1-process NCCL
torchrun (DDP, SyncBatchNorm, sharded sampling and boosting), and the same bytes for any batch size on
CUDA. Marked `cuda` (`pytest -m cuda`; benchmarks/gpu_check.sh runs them) and skipped without a GPU.

What the tests measure (pixel differences, early-stop fractions, weight differences) is also written,
one JSON object a line, to $CMBOOST_CUDA_FIGURES when that is set, so that gpu_check.json holds the
figures next to the pass/fail.

CMBOOST_CUDA_TESTS_ON_CPU=1 runs the same tests on the CPU (CPU autocast for bf16/fp16; the NCCL ones
still skip): a check of the tests' own logic on a machine without a GPU, not a test of the GPU paths.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ON_CPU = os.environ.get("CMBOOST_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")]
DEVICE = "cpu" if ON_CPU else "cuda"  # the one place the device is chosen: these are the GPU-only paths
needs_nccl = pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "cmboost" / "assets" / "fmnist"
NUM_IMAGES = 256


def record(name: str, **figures) -> None:
    """Appends one test's figures to $CMBOOST_CUDA_FIGURES (JSON lines) and prints them."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get("CMBOOST_CUDA_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bytes(path):
    with np.load(path) as archive:
        return archive["arr_0"].tobytes(), archive["arr_1"].tobytes()


# ----------------------------------------------------------------------------- shared inputs

@pytest.fixture(scope="module")
def device():
    return torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE)


@pytest.fixture(scope="module")
def joint(device):
    """The shipped joint network, channels-last (as `cmboost boost` puts it on a GPU)."""
    from cmboost.jcd.model import load_joint_model

    return load_joint_model(ASSETS / "jcd-joint.safetensors").to(device).to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def samples(device):
    """NUM_IMAGES 1-step samples of the shipped CT model, drawn in fp32: float images in [0, 1], labels."""
    from cmboost.cm.checkpoint import load_model
    from cmboost.cm.sample import choose_sampler, sample_batch

    loaded = load_model(ASSETS / "ct.safetensors")
    loaded.net.to(device).eval()
    x, y = sample_batch(loaded, choose_sampler(loaded, 1), range(NUM_IMAGES), 11, device, "fp32")
    return ((x + 1) / 2).clamp(0, 1).to(device), y.to(device)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    """100 CT samples on disk (CPU, fp32) for the CLI tests."""
    from cmboost.cli import main

    path = tmp_path_factory.mktemp("cuda-samples") / "ct1.npz"
    assert main(["sample", "--model", str(ASSETS / "ct.safetensors"), "--num", "100", "--steps", "1", "--seed", "3",
                 "--out", str(path), "--device", "cpu", "--no-progress"]) == 0
    return path


def _realness(model, x, y):
    from cmboost.boosting.methods import realness

    with torch.no_grad():
        return realness(model.logits(x), y, "softmax").float()


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the uint8 levels written to files, as int16 for differences."""
    from cmboost.files.samples import to_uint8

    return torch.from_numpy(to_uint8(x.float().cpu()).astype(np.int16))


# ----------------------------------------------------------------------------- precision

METHODS = {"pgd": {}, "sgld": {}, "bigroc": {}}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_low_precision_boost_stays_close_to_fp32(joint, samples, method, precision):
    """Same images, same hyperparameters: the bf16/fp16 result is finite, in range, moves the images about
    as far and raises their realness about as much as fp32 does; the pixel differences are recorded."""
    from cmboost.boosting.methods import boost

    x, y = samples
    ref = boost(joint, x, y, method, precision="fp32", channels_last=True, **METHODS[method])
    low = boost(joint, x, y, method, precision=precision, channels_last=True, **METHODS[method])
    assert torch.isfinite(low).all() and low.min() >= 0 and low.max() <= 1
    moved = (ref - x).abs().mean().item()
    diff = (low - ref).abs()
    levels = (_pixels(low) - _pixels(ref)).abs()
    gain_ref = (_realness(joint, ref, y) - _realness(joint, x, y)).mean().item()
    gain_low = (_realness(joint, low, y) - _realness(joint, x, y)).mean().item()
    record(f"boost-{method}-{precision}", mean_abs_diff=diff.mean().item(), max_abs_diff=diff.max().item(),
           max_level_diff=int(levels.max()), changed_pixels=float((levels > 0).float().mean()),
           mean_move_fp32=moved, realness_gain_fp32=gain_ref, realness_gain_low=gain_low)
    assert moved > 0
    # A last-bit change can grow along the normalised steps, but the low-precision path must follow
    # the fp32 one: differences well under the distance the images move, the same realness gain.
    assert diff.mean().item() <= 0.35 * moved
    assert abs(gain_low - gain_ref) <= 0.25 * abs(gain_ref) + 0.01


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_pgd_early_stop_still_fires_in_low_precision(joint, samples, precision, monkeypatch):
    """The threshold is the median realness the fp32 run reaches: under every precision a share of the
    images stops before the last step, about the same share as in fp32."""
    import cmboost.boosting.methods as boost_module

    steps_taken = []

    class RecordingPGD(boost_module.PGD):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            steps_taken.append(self.last_steps.clone())
            return out

    x, y = samples
    plain = boost_module.boost(joint, x, y, "pgd", precision="fp32", channels_last=True)
    threshold = float(_realness(joint, plain, y).median())
    monkeypatch.setattr(boost_module, "PGD", RecordingPGD)
    fractions = {}
    for p in dict.fromkeys(["fp32", precision]):
        boost_module.boost(joint, x, y, "pgd", precision=p, channels_last=True, threshold=threshold)
        fractions[p] = float((steps_taken[-1] < 10).float().mean())
    record(f"early-stop-{precision}", threshold=threshold, stopped_early=fractions[precision],
           stopped_early_fp32=fractions["fp32"], mean_steps=float(steps_taken[-1].float().mean()))
    assert 0.05 <= fractions[precision] <= 0.95
    assert abs(fractions[precision] - fractions["fp32"]) <= 0.15


# ----------------------------------------------------------------------------- memory format

def test_channels_last_matches_contiguous(joint, samples):
    import copy

    from cmboost.boosting.methods import boost

    x, y = samples
    flat = copy.deepcopy(joint).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        a, b = joint.logits(x[:64]), flat.logits(x[:64].contiguous())
    logit_diff = (a - b).abs().max().item()
    out_cl = boost(joint, x, y, "pgd", precision="fp32", channels_last=True)
    out_flat = boost(flat, x, y, "pgd", precision="fp32", channels_last=False)
    moved = (out_flat - x).abs().mean().item()
    diff = (out_cl - out_flat).abs()
    record("channels-last-vs-contiguous", logit_max_diff=logit_diff, mean_abs_diff=diff.mean().item(),
           max_abs_diff=diff.max().item(), max_level_diff=int((_pixels(out_cl) - _pixels(out_flat)).abs().max()),
           mean_move=moved)
    assert logit_diff <= 1e-2 * max(1.0, a.abs().max().item())
    assert diff.mean().item() <= 0.1 * moved


# ----------------------------------------------------------------------------- training with AMP

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-class folder dataset of 16x16 RGB PNGs and 20 generated images (as tests/test_train_jcd.py)."""
    from PIL import Image

    from cmboost.files.samples import save_samples

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "data" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "data" / f"c{c}" / f"{i}.png")
    save_samples(root / "gen.npz", rng.integers(0, 256, (20, 3, 16, 16), dtype=np.uint8), rng.integers(0, 2, 20))
    return root


def jcd_args(tiny, run_dir, iters, *extra):
    return ["train-jcd", "--data", f"folder:{tiny / 'data'}", "--generated", str(tiny / "gen.npz"),
            "--objective", "ce+bce", "--iters", str(iters), "--batch-size", "8", "--lr", "1e-3",
            "--real-eps", "0.5", "--gen-steps", "2", "--log-every", "1", "--ckpt-every", "10",
            "--device", DEVICE, "--seed", "5", "--run-dir", str(run_dir), *extra]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_train_jcd_twenty_iterations_with_amp(tmp_path, tiny, precision):
    """fp16 goes through the GradScaler (its state is saved for resume); bf16 needs none. Every logged
    loss is finite and the weights move away from the seeded start."""
    from safetensors.torch import load_file

    from cmboost.cli import main
    from cmboost.jcd.model import build_joint_model
    from cmboost.jcd.training import STATE_FILE, _load_state

    run = tmp_path / "run"
    assert main(jcd_args(tiny, run, 20, "--arch", "resnet_small", "--precision", precision)) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert all(np.isfinite(losses))
    torch.manual_seed(5)
    start = build_joint_model("resnet_small", 2, 3, 16).backbone.state_dict()
    trained = load_file(run / "model.safetensors")
    moved = max((trained[k].float() - start[k].float()).abs().max().item() for k in start if k in trained)
    state = _load_state(run / STATE_FILE)
    scale = float(state["scaler"]["scale"]) if "scaler" in state else None
    record(f"train-jcd-amp-{precision}", first_loss=losses[0], last_loss=losses[-1], max_weight_move=moved,
           grad_scale=scale)
    assert moved > 0
    assert all(torch.isfinite(v).all() for v in trained.values())
    if precision == "fp16":
        assert scale is not None and np.isfinite(scale) and scale > 0
    else:
        assert scale is None


# ----------------------------------------------------------------------------- batch invariance on the device

NUM = 100
BLOCK = "16"  # seven blocks, the last one short
BATCH_SIZES = (7, 32, 100)


@pytest.mark.parametrize("steps", [1, 2])
def test_sampling_gives_the_same_bytes_for_any_batch_size(tmp_path, steps):
    from cmboost.cli import main

    schedule = ["--ts", "0,22,39", "--N", "40"] if steps == 2 else []
    kind = "cd" if steps == 2 else "ct"
    outputs = []
    for batch_size in BATCH_SIZES:
        out = tmp_path / f"b{batch_size}.npz"
        assert main(["sample", "--model", str(ASSETS / f"{kind}.safetensors"), "--num", str(NUM), "--steps", str(steps),
                     *schedule, "--seed", "3", "--batch-size", str(batch_size), "--out", str(out), "--device", DEVICE,
                     "--no-progress", "--block-size", BLOCK]) == 0
        outputs.append(_bytes(out))
    record(f"sample-batch-invariance-{steps}step", same_bytes=all(o == outputs[0] for o in outputs[1:]))
    assert all(o == outputs[0] for o in outputs[1:])


BOOSTS = {"pgd": [], "pgd-early-stop": ["--threshold", "0.5"], "sgld": [], "bigroc": []}


@pytest.mark.parametrize("method", list(BOOSTS))
def test_boosting_gives_the_same_bytes_for_any_batch_size(tmp_path, sample_file, method):
    from cmboost.cli import main

    outputs = []
    for batch_size in BATCH_SIZES:
        out = tmp_path / f"b{batch_size}.npz"
        assert main(["boost", str(sample_file), "--model", str(ASSETS / "jcd-joint.safetensors"), "--out", str(out),
                     "--method", method.split("-")[0], *BOOSTS[method], "--batch-size", str(batch_size),
                     "--block-size", BLOCK, "--device", DEVICE, "--no-grid"]) == 0
        outputs.append(_bytes(out))
    record(f"boost-batch-invariance-{method}", same_bytes=all(o == outputs[0] for o in outputs[1:]))
    assert outputs[0][0] != _bytes(sample_file)[0]  # it did boost
    assert all(o == outputs[0] for o in outputs[1:])


# ----------------------------------------------------------------------------- NCCL, one process

def _torchrun(args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    (tmp_path / f"{name}.json").write_text(json.dumps(args))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
           str(ROOT / "tests" / "_torchrun_cuda.py"), str(tmp_path / f"{name}.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                       os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@needs_nccl
def test_torchrun_nccl_train_jcd_with_sync_batchnorm(tmp_path, tiny):
    """resnet50 has BatchNorm: under the NCCL group it becomes SyncBatchNorm inside DDP, and three fp32
    iterations end where the plain single-process run ends (up to cuDNN's non-deterministic training kernels)."""
    from safetensors.torch import load_file

    from cmboost.cli import main

    extra = ["--arch", "resnet50", "--precision", "fp32"]
    assert main(jcd_args(tiny, tmp_path / "plain", 3, *extra)) == 0
    done = _torchrun(jcd_args(tiny, tmp_path / "ddp", 3, *extra), tmp_path, "jcd")
    assert "backend nccl" in done.stdout
    layers = int(done.stdout.rsplit("SyncBatchNorm layers ", 1)[1].split()[0])
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    record("torchrun-nccl-train-jcd", sync_batchnorm_layers=layers, max_weight_diff_vs_plain=worst)
    assert layers > 0
    assert worst <= 1e-2


@needs_nccl
@pytest.mark.parametrize("verb", ["sample", "boost"])
def test_torchrun_nccl_gives_the_bytes_of_one_process(tmp_path, sample_file, verb):
    from cmboost.cli import main

    def args(out):
        if verb == "sample":
            return ["sample", "--model", str(ASSETS / "ct.safetensors"), "--num", str(NUM), "--steps", "1", "--seed",
                    "3", "--batch-size", "32", "--block-size", BLOCK, "--out", str(out), "--device", DEVICE,
                    "--no-progress"]
        return ["boost", str(sample_file), "--model", str(ASSETS / "jcd-joint.safetensors"), "--out", str(out),
                "--batch-size", "32", "--block-size", BLOCK, "--device", DEVICE, "--no-grid"]

    assert main(args(tmp_path / "plain.npz")) == 0
    done = _torchrun(args(tmp_path / "nccl.npz"), tmp_path, verb)
    assert "backend nccl" in done.stdout
    same = (tmp_path / "plain.npz").read_bytes() == (tmp_path / "nccl.npz").read_bytes()
    record(f"torchrun-nccl-{verb}", same_bytes=same)
    assert same


# ----------------------------------------------------------------------------- torch.compile (last: it compiles)

def test_compile_matches_eager(joint, samples):
    """`cmboost boost --compile` compiles the backbone: logits and a PGD run match eager."""
    import copy

    from cmboost.boosting.methods import boost

    x, y = samples
    compiled = copy.deepcopy(joint)
    compiled.backbone = torch.compile(compiled.backbone)
    with torch.no_grad():
        a, b = joint.logits(x[:64]), compiled.logits(x[:64])
    logit_diff = (a - b).abs().max().item()
    eager = boost(joint, x, y, "pgd", precision="bf16", channels_last=True)
    fast = boost(compiled, x, y, "pgd", precision="bf16", channels_last=True)
    moved = (eager - x).abs().mean().item()
    diff = (fast - eager).abs()
    record("compile-vs-eager", logit_max_diff=logit_diff, mean_abs_diff=diff.mean().item(),
           max_abs_diff=diff.max().item(), mean_move=moved)
    assert torch.isfinite(fast).all()
    # bf16: the compiled graph keeps some intermediates in fp32 that eager rounds to bf16
    assert logit_diff <= 5e-2 * max(1.0, a.abs().max().item())
    assert diff.mean().item() <= 0.35 * moved
