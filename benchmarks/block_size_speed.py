"""What fixed compute blocks cost: `boost` and `sample` throughput by --block-size, side by side in one run.

The network sees `--block-size` images at once (image i in block i // size), which is what makes
the bytes independent of --batch-size and of the number of processes. Small blocks use less memory
but may use the device less well. This prints images/s for each block size and the ratio to the
largest, for the shipped Fashion-MNIST networks (PGD with default settings, CT 1-step sampling).

CPU:  OMP_NUM_THREADS=2 python benchmarks/block_size_speed.py                 # about a minute
GPU:  python benchmarks/block_size_speed.py --device cuda --images 8192 --blocks 64,256,1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cmboost.boosting.boost import BoostRun, boost
from cmboost.cm.sample import SampleRun, sample
from cmboost.runtime import resolve_device

ASSETS = Path(__file__).resolve().parent.parent / "cmboost" / "assets" / "fmnist"


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--blocks", default="16,64,256", help="comma-separated block sizes")
    args = parser.parse_args()
    device = resolve_device(args.device)
    blocks = [int(b) for b in args.blocks.split(",")]
    print(f"{args.images} images on {device}, torch {torch.__version__} ({torch.get_num_threads()} CPU threads)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "ct1.npz"
        sample(SampleRun(model=str(ASSETS / "ct.safetensors"), out=str(source), num=args.images, steps=1, seed=0,
                         device=str(device), progress=False, batch_size=args.images))
        sample(SampleRun(model=str(ASSETS / "ct.safetensors"), out=str(tmp / "warm.npz"), num=min(64, args.images),
                         steps=1, seed=0, device=str(device), progress=False))  # warm-up: first kernels, allocator
        rows = []
        for block in blocks:
            sample_s = timed(lambda: sample(SampleRun(
                model=str(ASSETS / "ct.safetensors"), out=str(tmp / f"s{block}.npz"), num=args.images, steps=1, seed=0,
                device=str(device), progress=False, batch_size=args.images, block_size=block)), device)
            boost_s = timed(lambda: boost(BoostRun(  # the network's loading is timed too, as boost does it
                samples=str(source), model=str(ASSETS / "jcd-joint.safetensors"), out=str(tmp / f"b{block}.npz"),
                method="pgd", batch_size=args.images, device=str(device), progress=False, grid=False,
                block_size=block)), device)
            rows.append((block, args.images / sample_s, args.images / boost_s))
    top_sample, top_boost = rows[-1][1], rows[-1][2]
    print(f"{'block':>6} {'sample img/s':>13} {'ratio':>6} {'boost img/s':>12} {'ratio':>6}")
    for block, sample_rate, boost_rate in rows:
        print(f"{block:>6} {sample_rate:>13.1f} {sample_rate / top_sample:>6.2f} {boost_rate:>12.1f} "
              f"{boost_rate / top_boost:>6.2f}")
    print(f"(ratio: throughput relative to block {rows[-1][0]})")


if __name__ == "__main__":
    main()
