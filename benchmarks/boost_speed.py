"""Boosting throughput: the released loop against ours, side by side in one run.

(a) baseline, written like the released code: batch 100, fp32, autograd.grad of the batch-mean
    gathered logit with retain_graph, parameters left trainable;
(b) ours: cmboost.boost SGLD (same arithmetic, per-image step), frozen parameters, bf16 autocast
    and channels-last on GPU, large batches, optional torch.compile.
Prints images/s for both, the ratio, and the fraction of the bf16 FLOP floor (FLOPs counted with
torch.utils.flop_counter). Random weights: speed does not depend on them.

GPU:  python benchmarks/boost_speed.py --arch wide_resnet50_2 --images 5000 --batch 1000 --compile
CPU:  python benchmarks/boost_speed.py   (small defaults so it ends in about a minute)
"""

from __future__ import annotations

import argparse
import time

import torch

from cmboost.boost import boost
from cmboost.jcd import build_joint_model
from cmboost.runtime import resolve_device, resolve_precision


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def released_loop(model, images, labels, steps, a=0.2, s=1e-4, batch=100):
    """The release's arithmetic: mean over the batch, so a / batch per image; fp32."""
    out = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].clone().requires_grad_(True)
        y = labels[start:start + batch]
        for _ in range(steps):
            logits = model(x)
            chosen = logits.gather(1, y[:, None]).mean()
            grad = torch.autograd.grad(chosen, x, retain_graph=True)[0]
            x = (x + a * grad + s * torch.randn_like(x)).detach().requires_grad_(True)
        out.append(x.detach().clamp(0, 1))
    return torch.cat(out)


def ours(model, images, labels, steps, batch, precision, channels_last):
    out = []
    for start in range(0, len(images), batch):
        out.append(boost(model, images[start:start + batch], labels[start:start + batch], "sgld",
                         steps=steps, step=0.002, noise=1e-4, precision=precision, channels_last=channels_last,
                         indices=range(start, min(start + batch, len(images)))))
    return torch.cat(out)


def timed(fn, device, repeats=1):
    fn()  # warm-up (and compilation)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def flops_per_image_step(model, image_size, channels, device):
    """FLOPs of one forward plus the backward to the input, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from cmboost.boost import frozen

    x = torch.rand(2, channels, image_size, image_size, device=device, requires_grad=True)
    # FlopCounterMode's module hooks do not support autograd.grad; with frozen parameters
    # .backward() does the same work (the input gradient only).
    with frozen(model), FlopCounterMode(display=False) as counter:
        model(x)[:, 0].sum().backward()
    return counter.get_total_flops() / 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=None, help="default: wide_resnet50_2 resnet50 on GPU, resnet50 on CPU")
    parser.add_argument("--images", type=int, default=None, help="default 5000 on GPU, 16 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="ours: default 1000 on GPU, 16 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="default 15 on GPU, 3 on CPU")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network for ours")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak of the GPU (H100: ~790)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    precision = resolve_precision(args.precision, device)
    arches = args.arch or (["wide_resnet50_2", "resnet50"] if gpu else ["resnet50"])
    n = args.images or (5000 if gpu else 16)
    batch = args.batch or (1000 if gpu else 16)
    steps = args.steps or (15 if gpu else 3)
    print(f"device {device}, precision {precision}, {n} images, {steps} steps, image size {args.image_size}")
    torch.manual_seed(0)
    for arch in arches:
        model = build_joint_model(arch, num_classes=1000, in_channels=3, image_size=args.image_size).to(device).eval()
        images = torch.rand(n, 3, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, 1000, (n,), device=device)
        base_s = timed(lambda: released_loop(model, images, labels, steps), device)
        fast_model = model
        if gpu:
            fast_model = model.to(memory_format=torch.channels_last)
        if args.compile:
            fast_model = torch.compile(fast_model)
        ours_s = timed(lambda: ours(fast_model, images, labels, steps, batch, precision, gpu), device)
        flops = flops_per_image_step(model, args.image_size, 3, device)
        base_rate, ours_rate = n / base_s, n / ours_s
        floor_rate = args.peak_tflops * 1e12 / (flops * steps)
        print(f"{arch}: {flops / 1e9:.2f} GFLOP per image-step (forward + input backward)")
        print(f"  released loop  {base_rate:10.1f} img/s")
        print(f"  cmboost        {ours_rate:10.1f} img/s   ratio {ours_rate / base_rate:.2f}x")
        if gpu:
            print(f"  bf16 floor     {floor_rate:10.1f} img/s   ours reach {ours_rate / floor_rate:.1%} of it")
        else:
            print(f"  CPU: {ours_rate * flops * steps / 1e9:.1f} GFLOP/s achieved (no FLOP floor on CPU)")


if __name__ == "__main__":
    main()
