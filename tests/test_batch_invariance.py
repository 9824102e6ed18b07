"""Same seed, same bytes: --batch-size never changes an image, for every boost method and for 1- and
2-step sampling (the shipped Fashion-MNIST networks, default hyperparameters, blocks of 16 so that
100 images make several blocks).

Before compute blocks, a batch of 1 took other conv kernels than a batch of 7 or 32, and PGD's
normalised steps turned their last-bit differences into hundreds of changed pixels."""

from pathlib import Path

import numpy as np
import pytest

from cmboost.jobs import job as jobs
from cmboost.jobs import parts
from cmboost.cli import main
from cmboost.errors import UserInputError

ASSETS = Path(__file__).resolve().parent.parent / "cmboost" / "assets" / "fmnist"
NUM = 100  # seven blocks, the last one short; at 40 images the code before blocks happened to agree
BLOCK = "16"
BATCH_SIZES = (1, 7, 32)


def _bytes(path):
    with np.load(path) as archive:
        return archive["arr_0"].tobytes(), archive["arr_1"].tobytes()


def _sample(out, steps, batch_size, *extra):
    schedule = ["--ts", "0,22,39", "--N", "40"] if steps == 2 else []
    kind = "cd" if steps == 2 else "ct"
    return main(["sample", "--model", str(ASSETS / f"{kind}.safetensors"), "--num", str(NUM), "--steps", str(steps),
                 *schedule, "--seed", "3", "--batch-size", str(batch_size), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--block-size", BLOCK, *extra])


@pytest.fixture(scope="module")
def ct_samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "ct1.npz"
    assert _sample(path, 1, 256) == 0
    return path


@pytest.mark.parametrize("steps", [1, 2])
def test_sampling_gives_the_same_bytes_for_any_batch_size(tmp_path, steps):
    outputs = []
    for batch_size in BATCH_SIZES:
        out = tmp_path / f"b{batch_size}.npz"
        assert _sample(out, steps, batch_size) == 0
        outputs.append(_bytes(out))
    assert all(o == outputs[0] for o in outputs[1:])


BOOSTS = {"pgd": [], "pgd-early-stop": ["--threshold", "0.5"], "sgld": [], "bigroc": []}


@pytest.mark.parametrize("method", list(BOOSTS))
def test_boosting_gives_the_same_bytes_for_any_batch_size(tmp_path, ct_samples, method):
    outputs = []
    for batch_size in BATCH_SIZES:
        out = tmp_path / f"b{batch_size}.npz"
        assert main(["boost", str(ct_samples), "--model", str(ASSETS / "jcd-joint.safetensors"), "--out", str(out),
                     "--method", method.split("-")[0], *BOOSTS[method], "--batch-size", str(batch_size),
                     "--block-size", BLOCK, "--device", "cpu", "--no-grid"]) == 0
        outputs.append(_bytes(out))
    assert outputs[0][0] != _bytes(ct_samples)[0]  # it did boost
    assert all(o == outputs[0] for o in outputs[1:])


def test_work_is_done_in_whole_fixed_blocks_whatever_the_batch_size(tmp_path):
    seen = []

    def work(indices):
        seen.append(list(indices))
        return np.zeros((len(indices), 1, 2, 2), np.uint8), None

    for batch_size in (1, 5, 9, 100):
        seen.clear()
        parts.run_parts(tmp_path / f"b{batch_size}.npz", 11, batch_size, work, {"what": "test"}, progress=False,
                       block_size=4)
        assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_the_block_size_is_recorded_and_cannot_change_on_resume(tmp_path):
    class Killed(Exception):
        pass

    def work(indices):
        if indices[0] >= 4:
            raise Killed
        return np.full((len(indices), 1, 2, 2), indices[0], np.uint8), None

    out = tmp_path / "out.npz"
    with pytest.raises(Killed):
        parts.run_parts(out, 8, 4, work, {"what": "test"}, progress=False, block_size=4)
    with pytest.raises(UserInputError, match="block_size was 4, now 2"):
        parts.run_parts(out, 8, 4, work, {"what": "test"}, progress=False, block_size=2)


@pytest.mark.parametrize("verb", ["sample", "boost"])
def test_a_bad_block_size_is_one_line_naming_the_flag(tmp_path, ct_samples, capsys, verb):
    out = tmp_path / "o.npz"
    if verb == "sample":
        code = _sample(out, 1, 8, "--block-size", "0")
    else:
        code = main(["boost", str(ct_samples), "--model", str(ASSETS / "jcd-joint.safetensors"), "--out", str(out),
                     "--block-size", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--block-size 0" in err and err.count("\n") == 1
    assert not out.exists() and not jobs.job_dir(out).exists()


def test_deterministic_kernels_hold_only_for_the_job():
    import torch

    from cmboost.runtime import deterministic_kernels

    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    try:
        cudnn.benchmark, cudnn.deterministic = True, False  # what a user's training script may have set
        with deterministic_kernels(torch.device("cuda")):  # only flags: runs without a GPU
            assert (cudnn.benchmark, cudnn.deterministic) == (False, True)
        assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
        with deterministic_kernels(torch.device("cpu")):
            assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
    finally:
        cudnn.benchmark, cudnn.deterministic = saved
