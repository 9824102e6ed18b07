"""Adversarial-training throughput: the released loop against ours, side by side in one run.

One training iteration = L2 PGD on the real batch (random start + 2 steps), L2 PGD on the
generated batch (5 steps), then the update on the ce+bce loss (Adam, gradient clip 1.0).

(a) baseline, written like the released loop: fp32, NCHW, attacks that call loss.backward()
    (so every step also computes and accumulates parameter gradients, zeroed afterwards), and a
    separate forward for each of the four loss terms;
(b) ours: cmboost.jcd.training.training_step: parameters frozen during the attacks (input
    gradients only, via autograd.grad), bf16 autocast and channels-last on GPU, one forward
    on cat(real, generated).
images/s counts real + generated images per iteration. Random weights and random images:
speed does not depend on them.

GPU:  python benchmarks/train_jcd_speed.py --arch wide_resnet50_2 --batch 128 --image-size 64
CPU:  python benchmarks/train_jcd_speed.py   (resnet_small, batch 16, 32x32; about half a minute)
--json PATH writes every figure (benchmarks/gpu_check.py reads it); --profile prints where ours spends its time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from figures import Figures, profile_table, repo_on_path

repo_on_path()
from cmboost.jcd.attacks import PGD  # noqa: E402
from cmboost.jcd.model import build_joint_model  # noqa: E402
from cmboost.jcd.losses import get_objective  # noqa: E402
from cmboost.runtime import resolve_device, resolve_precision  # noqa: E402
from cmboost.jcd.training import training_step  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- baseline

def _released_pgd(model, x, y, target, eps, step, steps, random_start):
    """L2 PGD as released: BCE(f_y(x), target).backward() fills x.grad and every parameter's .grad."""
    x0 = x.detach()
    x_adv = x0.clone()
    if random_start:
        noise = torch.randn_like(x0)
        noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x_adv = (x0 + noise * eps * torch.rand(len(x0), 1, 1, 1, device=x.device)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        fy = logits.gather(1, y[:, None]).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(fy, torch.full_like(fy, target))
        loss.backward()
        grad = x_adv.grad.detach()
        grad = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x_adv = (x_adv.detach() + step * grad).clamp(0, 1)
        delta = x_adv - x0
        delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
        x_adv = (x0 + delta).detach()
    model.zero_grad(set_to_none=True)
    return x_adv


def released_step(model, optimizer, x, y, xh, yh):
    model.train()
    x_adv = _released_pgd(model, x, y, 1.0, eps=1.0, step=0.5, steps=2, random_start=True)
    xh_adv = _released_pgd(model, xh, yh, 0.0, eps=100.0, step=0.1, steps=5, random_start=False)
    optimizer.zero_grad(set_to_none=True)
    # one forward per loss term, as released
    bce_real = F.binary_cross_entropy_with_logits(model(x_adv).gather(1, y[:, None]).squeeze(1),
                                                  torch.ones(len(y), device=x.device))
    bce_gen = F.binary_cross_entropy_with_logits(model(xh_adv).gather(1, yh[:, None]).squeeze(1),
                                                 torch.zeros(len(yh), device=x.device))
    ce_real = F.cross_entropy(model(x_adv), y)
    ce_gen = F.cross_entropy(model(xh_adv), yh)
    loss = bce_real + bce_gen + ce_real + ce_gen
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------- ours

def our_step(model, optimizer, scaler, objective, x, y, xh, yh, precision, channels_last):
    real_attack = PGD("l2", 1.0, 0.5, 2, True, precision=precision, channels_last=channels_last)
    gen_attack = PGD("l2", 100.0, 0.1, 5, False, precision=precision, channels_last=channels_last)
    result = training_step(model, objective, optimizer, real_attack, gen_attack, x, y, xh, yh,
                           precision=precision, grad_clip=1.0, attack_mode="train", scaler=scaler)
    return result.loss


def timed(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="default: wide_resnet50_2 on GPU, resnet_small on CPU")
    parser.add_argument("--batch", type=int, default=None, help="real batch = generated batch (default 128 GPU, 16 CPU)")
    parser.add_argument("--image-size", type=int, default=None, help="default 64 on GPU, 32 on CPU")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=None, help="default 1000 on GPU, 10 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3 GPU, 1 CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="ours: default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                        help="ours: default on for GPU")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one iteration of ours")
    parser.add_argument("--json", default=None, help="also write every figure here (rewritten after each)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    precision = resolve_precision(args.precision, device)
    channels_last = gpu if args.channels_last == "auto" else args.channels_last == "on"
    arch = args.arch or ("wide_resnet50_2" if gpu else "resnet_small")
    batch = args.batch or (128 if gpu else 16)
    size = args.image_size or (64 if gpu else 32)
    classes = args.num_classes or (1000 if gpu else 10)
    iters = args.iters or (10 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    figures = Figures(args.json, "train_jcd", device, arch=arch, batch_real=batch, batch_generated=batch,
                      image_size=size, channels=args.channels, num_classes=classes, iters=iters, warmup=warmup,
                      precision=precision, channels_last=channels_last)
    print(f"{arch}, {classes} classes, batch {batch} real + {batch} generated at {args.channels}x{size}x{size}, "
          f"device {device}; ours: {precision}, channels_last {channels_last}; {iters} timed iterations")

    torch.manual_seed(0)
    shape = (batch, args.channels, size, size)
    x, xh = torch.rand(shape, device=device), torch.rand(shape, device=device)
    y, yh = torch.randint(0, classes, (batch,), device=device), torch.randint(0, classes, (batch,), device=device)

    base_model = build_joint_model(arch, classes, args.channels, size).to(device)
    base_opt = torch.optim.Adam(base_model.parameters(), lr=1e-5)
    base_s = timed(lambda: released_step(base_model, base_opt, x, y, xh, yh), device, iters, warmup)
    figures.add(arch, released_img_s=2 * batch / base_s, released_it_s=1 / base_s)
    print(f"  released loop  {2 * batch / base_s:10.1f} img/s  ({1 / base_s:7.2f} it/s)", flush=True)
    del base_model, base_opt
    if gpu:
        torch.cuda.empty_cache()

    torch.manual_seed(0)
    model = build_joint_model(arch, classes, args.channels, size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x, xh = (t.contiguous(memory_format=torch.channels_last) for t in (x, xh))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    objective = get_objective("ce+bce")
    step = lambda: our_step(model, optimizer, scaler, objective, x, y, xh, yh, precision, channels_last)  # noqa: E731
    ours_s = timed(step, device, iters, warmup)

    images = 2 * batch
    base_rate, ours_rate = images / base_s, images / ours_s
    figures.add(arch, ours_img_s=ours_rate, ours_it_s=1 / ours_s, ratio=ours_rate / base_rate)
    print(f"  cmboost        {ours_rate:10.1f} img/s  ({1 / ours_s:7.2f} it/s)   ratio {ours_rate / base_rate:.2f}x")
    if args.profile:
        print("--- one iteration of ours")
        print(profile_table(step, device))
    figures.done()


if __name__ == "__main__":
    main()
