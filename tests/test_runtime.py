import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmboost.errors import UserInputError
from cmboost.runtime import (DistInfo, autocast, batches, gather, randn_per_sample, resolve_device,
                             resolve_precision, sample_generators, sample_seed, shard)


def test_device_and_precision_defaults():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision(None, torch.device("cuda", 0)) == "bf16"
    with pytest.raises(UserInputError, match="--precision"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(UserInputError, match="--device"):
        resolve_device("nonsense")
    with autocast(torch.device("cpu"), "fp32"):
        assert torch.ones(2).dtype == torch.float32


def test_per_sample_noise_does_not_depend_on_batching():
    whole = randn_per_sample(sample_generators(7, range(10)), (3, 4))
    parts = torch.cat([randn_per_sample(sample_generators(7, chunk), (3, 4)) for chunk in batches(range(10), 3)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])
    other_seed = randn_per_sample(sample_generators(8, range(10)), (3, 4))
    assert not torch.equal(whole, other_seed)
    assert sample_seed(7, 3) == sample_seed(7, 3) != sample_seed(7, 4)


def test_shard_and_gather_without_a_process_group():
    items = list(range(11))
    shares = [shard(items, DistInfo(rank, 3, rank)) for rank in range(3)]
    assert sorted(sum(shares, [])) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert gather(items, DistInfo()) == items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(tmp_path, repo_root):
    script = repo_root / "tests" / "_torchrun_shard.py"
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"gathered{nproc}.npy"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", str(script), str(out), "13"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[nproc] = np.load(out)
    assert outputs[1].shape == (13, 3)
    np.testing.assert_array_equal(outputs[1], outputs[2])
