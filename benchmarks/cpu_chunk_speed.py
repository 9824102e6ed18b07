"""What runtime.CPU_CHUNK buys: inference-only networks on a CPU, one call per block against slices
of CPU_CHUNK rows, side by side in one run, with the largest difference between their outputs.

A block's activations (a few hundred 32x32 images through a UNet) do not fit a core's cache; a few
dozen do. The networks: the demo's CT UNet (ect.safetensors; one denoising step, as `sample` runs
it) and the reporting judges' feature extractors (as `evaluate` runs them). Boosting is not chunked (its
backward passes are fastest on whole blocks: benchmarks/block_size_speed.py).

    python benchmarks/cpu_chunk_speed.py            # about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cmboost.cm.checkpoint import load_model
from cmboost.cm.denoiser import denoise
from cmboost.errors import UserInputError
from cmboost.metrics.features import load_feature_extractor
from cmboost.runtime import CPU_CHUNK, in_cpu_chunks

ASSETS = Path(__file__).resolve().parent.parent / "cmboost" / "assets" / "fmnist"
JUDGES = ("effnet-lite0", "fmnist-allconv", "fmnist-resnet")


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: first kernels, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(name: str, forward, inputs, repeats: int) -> None:
    whole = best_of(lambda: forward(*inputs), repeats)
    chunked = best_of(lambda: in_cpu_chunks(forward, torch.device("cpu"), *inputs), repeats)
    a, b = forward(*inputs), in_cpu_chunks(forward, torch.device("cpu"), *inputs)
    a, b = (a["pool"], b["pool"]) if isinstance(a, dict) else (a, b)
    print(f"| {name} | {whole:.3f} | {chunked:.3f} | {chunked / whole:.2f}x | {(a - b).abs().max().item():.1e} |")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=250, help="the block: images per call without chunks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{args.images} images per block, chunks of {CPU_CHUNK}, {torch.get_num_threads()} CPU threads, "
          f"torch {torch.__version__}; best of {args.repeats}, seconds per block")
    print("| network | one call | chunks | ratio | max abs difference |\n|---|---|---|---|---|")
    loaded = load_model(ASSETS / "ect.safetensors")
    net = loaded.net.eval()
    x = torch.randn(args.images, loaded.in_channels, loaded.image_size, loaded.image_size) * loaded.precond.sigma_max
    sigma = torch.full((args.images,), loaded.precond.sigma_max)
    labels = torch.arange(args.images) % loaded.num_classes if loaded.num_classes else None
    compare("demo CT (ECT) UNet, one step", lambda x_, s_, y_: denoise(net, x_, s_, y_, loaded.precond, clip=True),
            (x, sigma, labels), args.repeats)
    images = torch.randint(0, 256, (args.images, 1, 32, 32), dtype=torch.uint8)
    for name in JUDGES:
        try:
            extractor = load_feature_extractor(name, "cpu")
        except UserInputError as err:
            print(f"| {name} | not installed: {err} | | | |")
            continue
        compare(f"judge {name}", extractor, (images,), args.repeats)


if __name__ == "__main__":
    main()
