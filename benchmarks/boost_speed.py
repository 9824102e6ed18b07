"""Boosting throughput: the released loop against ours, side by side in one run.

(a) baseline, written like the released code: batch 100, fp32, autograd.grad of the batch-mean
    gathered logit with retain_graph, parameters left trainable;
(b) ours: cmboost.boosting.methods SGLD (same arithmetic, per-image step), frozen parameters, bf16 autocast
    and channels-last on GPU, large batches, optional torch.compile.
Prints images/s for both, the ratio, and the fraction of the bf16 FLOP floor (FLOPs counted with
torch.utils.flop_counter). Random weights: speed does not depend on them.

GPU:  python benchmarks/boost_speed.py --arch wide_resnet50_2 --images 5000 --batch 1000 --compile
CPU:  python benchmarks/boost_speed.py   (small defaults so it ends in about a minute)
--json PATH writes every figure (benchmarks/gpu_check.py reads it); --profile prints where ours spends its time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from figures import Figures, profile_table, repo_on_path

repo_on_path()
from cmboost.boosting.methods import boost  # noqa: E402
from cmboost.jcd.model import build_joint_model  # noqa: E402
from cmboost.runtime import randn_per_sample, resolve_device, resolve_precision, sample_generators  # noqa: E402


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


def timed(fn, warm, device, repeats=1):
    """Seconds per call of `fn` after one call of `warm` (a slice of the same work: first kernels,
    allocator, compilation), so the warm-up does not cost a whole run."""
    warm()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def flops_per_image_step(model, image_size, channels, device):
    """FLOPs of one forward plus the backward to the input, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from cmboost.boosting.methods import frozen

    x = torch.rand(2, channels, image_size, image_size, device=device, requires_grad=True)
    # FlopCounterMode's module hooks do not support autograd.grad; with frozen parameters
    # .backward() does the same work (the input gradient only).
    with frozen(model), FlopCounterMode(display=False) as counter:
        model(x)[:, 0].sum().backward()
    return counter.get_total_flops() / 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=None, help="default: wide_resnet50_2 resnet50 on GPU, resnet50 on CPU")
    parser.add_argument("--images", type=int, default=None, help="default 5000 on GPU, 16 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="ours: default 1000 on GPU, 16 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="default 15 on GPU, 3 on CPU")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with the network torch.compiled (after the eager figures)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one batch of ours")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="bf16 dense matrix rate of the GPU, the FLOP floor (H100/H200 measured: ~790)")
    parser.add_argument("--json", default=None, help="also write every figure here (rewritten after each)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    precision = resolve_precision(args.precision, device)
    arches = args.arch or (["wide_resnet50_2", "resnet50"] if gpu else ["resnet50"])
    n = args.images or (5000 if gpu else 16)
    batch = min(args.batch or (1000 if gpu else 16), n)
    steps = args.steps or (15 if gpu else 3)
    figures = Figures(args.json, "boost", device, arches=arches, images=n, batch=batch, released_batch=100,
                      steps=steps, image_size=args.image_size, precision=precision, compile=args.compile)
    print(f"device {device}, precision {precision}, {n} images, {steps} steps, image size {args.image_size}")
    if gpu:
        torch.backends.cudnn.benchmark = True  # for both sides
    torch.manual_seed(0)
    for arch in arches:
        model = build_joint_model(arch, num_classes=args.num_classes, in_channels=3,
                                  image_size=args.image_size).to(device).eval()
        images = torch.rand(n, 3, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, args.num_classes, (n,), device=device)
        flops = flops_per_image_step(model, args.image_size, 3, device)
        floor_rate = args.peak_tflops * 1e12 / (flops * steps)
        figures.add(arch, gflop_per_image_step=flops / 1e9, bf16_floor_img_s=floor_rate if gpu else None)
        print(f"{arch}: {flops / 1e9:.2f} GFLOP per image-step (forward + input backward)")
        warm_n = min(100, n)
        base_s = timed(lambda: released_loop(model, images, labels, steps),
                       lambda: released_loop(model, images[:warm_n], labels[:warm_n], steps), device)
        base_rate = n / base_s
        figures.add(arch, released_img_s=base_rate)
        print(f"  released loop  {base_rate:10.1f} img/s")
        # SGLD draws each image's noise from its own CPU generator (so that the bytes do not depend on the
        # batch): that alone caps the rate, whatever the network; shown so a miss can be read.
        generators = sample_generators(0, range(batch))
        noise_s = timed(lambda: [randn_per_sample(generators, images.shape[1:], device) for _ in range(steps)],
                        lambda: randn_per_sample(generators, images.shape[1:], device), device)
        figures.add(arch, noise_only_img_s=batch / noise_s)
        print(f"  per-image noise alone {batch / noise_s:10.1f} img/s (drawn on the CPU, one generator per image)")
        fast_model = model.to(memory_format=torch.channels_last) if gpu else model
        variants = [("eager", fast_model)]
        if args.compile:  # as `cmboost boost --compile`: the backbone (boost calls model.logits, not forward)
            compiled = copy.deepcopy(fast_model)
            compiled.backbone = torch.compile(compiled.backbone)
            variants.append(("compiled", compiled))
        for name, net in variants:  # eager first: its figures stand if compiling runs out of time
            ours_s = timed(lambda: ours(net, images, labels, steps, batch, precision, gpu),
                           lambda: ours(net, images[:batch], labels[:batch], steps, batch, precision, gpu), device)
            ours_rate = n / ours_s
            row = {f"ours_{name}_img_s": ours_rate, f"ratio_{name}": ours_rate / base_rate}
            line = f"  cmboost {name:8s}{ours_rate:10.1f} img/s   ratio {ours_rate / base_rate:.2f}x"
            if gpu:
                row[f"floor_fraction_{name}"] = ours_rate / floor_rate
                line += f"   {ours_rate / floor_rate:.1%} of the bf16 floor ({floor_rate:.0f} img/s)"
            else:
                line += f"   {ours_rate * flops * steps / 1e9:.1f} GFLOP/s (no FLOP floor on CPU)"
            figures.add(arch, **row)
            print(line, flush=True)
            if args.profile and name == "eager":
                print(f"--- {arch}, one batch of ours (eager)")
                print(profile_table(lambda: ours(net, images[:batch], labels[:batch], steps, batch, precision, gpu),
                                    device), flush=True)
        del model, fast_model, variants
        if gpu:
            torch.cuda.empty_cache()
    figures.done()


if __name__ == "__main__":
    main()
