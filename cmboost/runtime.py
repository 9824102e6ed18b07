"""Device, precision, distributed and seeding choices, made in one place.

Every other module asks here instead of deciding on its own, so that the CPU path always
works and the GPU path is one flag away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from typing import Iterator, Sequence

import numpy as np
import torch

from cmboost.errors import UserInputError
from cmboost.records import SEED_LIMIT

PRECISIONS = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------- device & precision

def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" picks cuda when present, else cpu. Under torchrun each rank takes its LOCAL_RANK GPU."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserInputError(f"--device {name!r}: not a device name ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def resolve_precision(name: str | None, device: torch.device) -> str:
    """bf16 autocast on GPU, fp32 on CPU (CPU bf16 autocast is slower than fp32 on most machines)."""
    if name in (None, "", "auto"):
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise UserInputError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)} or auto")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for `precision`; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- threads

# Linear algebra on feature statistics (eigen-decompositions, Cholesky factors, covariances, Gram
# matrices, k-NN distances) runs on one thread. Its operations are small, and OpenMP's and
# OpenBLAS's workers spin-wait for each other between them: on this 2-core CPU an eigvalsh of a
# 256x256 matrix took 2.4 ms on two threads idle but 235 ms beside one busy process, against 4 ms on
# one thread; only large Gram matrices gain from a second thread, and those are computed once per
# reference. benchmarks/scoring_speed.py measures both choices side by side. Convolutions keep
# torch's thread count; that their workers sleep rather than spin between operations is set where the
# package is first imported (cmboost.OPENMP_WAIT_POLICY), before torch starts its OpenMP pool.
STATISTICS_THREADS = 1

_blas_controller = None


def _blas_threads():
    """threadpoolctl's controller of every BLAS library loaded now (numpy's and scipy's OpenBLAS),
    made once, after scipy's LAPACK is loaded."""
    global _blas_controller
    if _blas_controller is None:
        import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS, so that the controller sees it)
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    return _blas_controller


_statistics_depth = 0  # statistics_threads() contexts open now: an inner one changes nothing


@contextlib.contextmanager
def statistics_threads(threads: int | None = None) -> Iterator[None]:
    """For the duration, torch's CPU operations and the BLAS libraries (numpy's, scipy's) use
    `threads` threads (default STATISTICS_THREADS, read at the call, so that a benchmark can set
    the alternative); the caller's settings are restored after. Nested uses cost nothing."""
    global _statistics_depth
    if _statistics_depth:
        yield
        return
    threads = STATISTICS_THREADS if threads is None else int(threads)
    saved = torch.get_num_threads()
    _statistics_depth += 1
    try:
        if saved != threads:
            torch.set_num_threads(threads)
        with _blas_threads().limit(limits=threads, user_api="blas"):
            yield
    finally:
        _statistics_depth -= 1
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


def on_statistics_threads(function):
    """Decorator: `function` runs under statistics_threads()."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with statistics_threads():
            return function(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- memory

def memory_limit() -> int | None:
    """The most memory this process could ever hold, in bytes: physical memory plus swap, or the
    cgroup's limit when lower; None when it cannot be read (not Linux)."""
    limit = None
    try:
        with open("/proc/meminfo") as fh:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:]}
        limit = fields.get("MemTotal", 0) + fields.get("SwapTotal", 0) or None
    except (OSError, ValueError, IndexError):
        pass
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(name) as fh:
                cap = int(fh.read().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        limit = cap if limit is None else min(limit, cap)
    return limit


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"


def check_allocatable(nbytes: int, what: str) -> None:
    """Refuses, before anything is allocated, a job whose arrays (`nbytes` in all) could never fit in
    this machine's memory; `what` names the flag and the values that ask for them."""
    limit = memory_limit()
    if limit is not None and nbytes > limit:
        raise UserInputError(f"{what}: needs {_size(nbytes)} of memory, more than this machine can ever hold "
                             f"({_size(limit)} with swap)")


# ----------------------------------------------------------------------------- compute blocks

# Kernels pick their algorithm, and so their rounding, by batch shape (oneDNN on CPU, cuDNN on
# GPU), and PGD's normalised steps can amplify a last-bit difference into visible pixels. So
# jobs never let --batch-size decide what the network sees together: image i is always computed
# in block i // block_size with the same neighbours, whatever the batch size or process count.
# 256 was the batch size before blocks, so memory and speed stay as they were. On a 2-core CPU a
# block of 16 boosts at 0.39x the speed of 256 and samples at 1.7x (benchmarks/block_size_speed.py).
BLOCK_SIZE = 256


# Images per forward call of a network that only infers (sampling, feature extraction) on a CPU: the
# activations of a few dozen small images stay in a core's cache, those of a 256-image block do not.
# Measured on this project's 2-core Xeon (benchmarks/cpu_chunk_speed.py), per 250 32x32 images: the
# CM UNet 1.69 s as one call, 1.01 s in chunks of 50; EfficientNet-Lite0 at 64 px 0.39 s and 0.23 s;
# the outputs were bit-identical. The chunks are fixed slices of the caller's block, so which images
# the network sees together still never depends on the batch size or process count. Boosting is not
# chunked: its backward passes run fastest on whole blocks (benchmarks/block_size_speed.py).
CPU_CHUNK = 50


def in_cpu_chunks(forward, device: torch.device, *inputs):
    """forward(*inputs), computed over slices of CPU_CHUNK rows on a CPU and in one call elsewhere.
    Inputs are tensors sharing dim 0 (or None); the output, a tensor or a dict of tensors (or None),
    is concatenated back in order."""
    rows = next(x for x in inputs if x is not None).shape[0]
    if torch.device(device).type != "cpu" or rows <= CPU_CHUNK:
        return forward(*inputs)
    parts = [forward(*(None if x is None else x[start:start + CPU_CHUNK] for x in inputs))
             for start in range(0, rows, CPU_CHUNK)]
    if isinstance(parts[0], dict):
        return {key: None if value is None else torch.cat([part[key] for part in parts])
                for key, value in parts[0].items()}
    return torch.cat(parts)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """For the duration, cuDNN picks one deterministic algorithm per shape instead of timing
    several (whose winner can change from run to run); the caller's settings are restored after.
    A no-op on CPU, where a given shape always takes the same kernel."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


# ----------------------------------------------------------------------------- distributed

@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is rank 0 of 1."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserInputError("RANK/WORLD_SIZE/LOCAL_RANK must be integers") from None
    return DistInfo(rank, world, local)


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group when launched by torchrun: nccl on GPU, gloo on CPU. Idempotent."""
    info = dist_info()
    if info.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return info


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def on_every_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when `flag` holds on every rank (one all-reduce under torchrun), so that every rank
    takes the same branch: a rank that stopped alone would leave the others waiting forever."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item() > 0)


def all_finite(tensors) -> bool:
    """Every value of every floating-point tensor is finite (one host sync per device, not per tensor)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    return all(bool(torch.stack(group).all()) for group in flags.values())


def print0(*args, file=None, **kwargs) -> None:
    """print() on rank 0 only."""
    if dist_info().is_main:
        print(*args, file=file if file is not None else sys.stdout, **kwargs)


def shard(items: Sequence, info: DistInfo | None = None) -> list:
    """This rank's share of `items`: a strided split, so shares differ in length by at most one."""
    info = info or dist_info()
    return list(items[info.rank :: info.world_size])


def gather(local_items: list, info: DistInfo | None = None) -> list:
    """Inverse of `shard`: every rank gets the full list, in the original order."""
    info = info or dist_info()
    if not info.enabled:
        return list(local_items)
    parts: list = [None] * info.world_size
    torch.distributed.all_gather_object(parts, list(local_items))
    total = sum(len(p) for p in parts)
    out: list = [None] * total
    for rank, part in enumerate(parts):
        out[rank :: info.world_size] = part
    return out


# ----------------------------------------------------------------------------- seeding

def seed_sequence(seed: int, *words: int) -> np.random.SeedSequence:
    """The numpy SeedSequence of run `seed` and stream `words` (a sample index, an epoch, ...).

    A seed below 2^32 gives the entropy [seed, *words] it always had, so existing streams, and the
    numbers made from them, stay. A larger one puts its bits above 32 in the spawn key, which no
    seed below 2^32 has (and which numpy keeps apart from the entropy), so distinct seeds give
    distinct streams; seeds outside [0, 2^63) are refused, as every --seed is."""
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise UserInputError(f"--seed {seed}: must be in [0, 2^63)")
    high = seed >> 32
    return np.random.SeedSequence([seed & 0xFFFFFFFF, *(int(w) for w in words)], spawn_key=(high,) if high else ())


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded `seed`, well mixed so neighbours are unrelated."""
    state = seed_sequence(seed, index).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample; the stream depends only on (seed, index)."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int],
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stacks one N(0, I) draw of `shape` from each sample's generator. Drawn on CPU so every device agrees."""
    draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(device=device, dtype=dtype)


def batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive chunks of `indices`."""
    if batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: must be at least 1")
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]
