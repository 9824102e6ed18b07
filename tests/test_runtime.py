import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmboost.errors import UserInputError
from cmboost.runtime import (CPU_CHUNK, DistInfo, autocast, batches, gather, in_cpu_chunks, randn_per_sample,
                             resolve_device, resolve_precision, sample_generators, sample_seed, shard)


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


def test_cpu_chunks_are_fixed_slices_in_order():
    rows = 2 * CPU_CHUNK + 7
    x, y = torch.randn(rows, 3), torch.arange(rows)
    seen = []

    def forward(x_, y_, none):
        assert none is None
        seen.append(y_.tolist())
        return {"double": 2 * x_, "label": y_ + 1, "absent": None}

    out = in_cpu_chunks(forward, torch.device("cpu"), x, y, None)
    # slices of CPU_CHUNK rows from the block's start, then the rest; outputs back in row order
    assert seen == [list(range(s, min(s + CPU_CHUNK, rows))) for s in range(0, rows, CPU_CHUNK)]
    assert torch.equal(out["double"], 2 * x) and torch.equal(out["label"], y + 1) and out["absent"] is None
    assert torch.equal(in_cpu_chunks(lambda a: a * 3, "cpu", x), x * 3)  # a plain tensor output


def test_cpu_chunks_only_on_a_cpu():
    calls = []
    x = torch.zeros(3 * CPU_CHUNK, 2)
    in_cpu_chunks(lambda a: calls.append(len(a)) or a, torch.device("cuda", 0), x)  # never touches the GPU
    in_cpu_chunks(lambda a: calls.append(len(a)) or a, "cpu", x[:CPU_CHUNK])
    assert calls == [3 * CPU_CHUNK, CPU_CHUNK]


def test_chunked_networks_match_one_call():
    """A conv net and a linear head give the same outputs in chunks as in one call (to float32 rounding:
    a kernel may block a matmul differently by batch size)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 32 * 32, 10)).eval()
    x = torch.rand(CPU_CHUNK * 2 + 3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(in_cpu_chunks(net, "cpu", x), net(x), rtol=1e-5, atol=1e-5)


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


def test_openmp_workers_sleep_unless_the_user_chose_or_torch_came_first():
    """Importing cmboost before torch sets OMP_WAIT_POLICY=PASSIVE; a user's own setting (or
    GOMP_SPINCOUNT) is kept; after torch was imported, the variable would come too late and is not set."""
    import os
    import subprocess
    import sys

    import cmboost

    def policy(code: str, **extra) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        done = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                              env={**env, **extra}, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert policy("import cmboost") == cmboost.OPENMP_WAIT_POLICY == "PASSIVE"
    assert policy("import cmboost", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert policy("import cmboost", GOMP_SPINCOUNT="1000") == "None"
    assert policy("import torch; import cmboost") == "None"
