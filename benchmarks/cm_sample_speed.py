"""Images/s of 1-step consistency-model sampling: fp32 eager with OpenAI-style attention (the baseline)
against SDPA with bf16 (autocast, or bf16 weights + channels-last), side by side in one run.

Random weights (the zero-initialised output convolutions are filled too, so outputs are not trivially
zero and the paths can be compared). Each path runs the full sampler step: x_T = 80 z, the
preconditioning, the UNet, the clip to [-1, 1].

    python benchmarks/cm_sample_speed.py                       # CPU: small config, batch 4
    python benchmarks/cm_sample_speed.py --device cuda --config imagenet64 --batch 256 [--compile] [--profile]

OpenAI's own code was measured at 598 images/s on one H100 (ImageNet-64, fp32, legacy attention); the
goal for the bf16 paths on GPU is >= 2x that. --json PATH writes every figure (benchmarks/gpu_check.py
reads it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from figures import Figures  # noqa: E402

from cmboost.cm.denoiser import CM_PRECOND, Denoiser, onestep  # noqa: E402
from cmboost.cm.train_config import small_unet_config  # noqa: E402
from cmboost.cm.unet import IMAGENET64_CONFIG, UNetModel, set_attention_impl  # noqa: E402
from cmboost.runtime import resolve_device  # noqa: E402

OPENAI_H100_IMAGES_PER_S = 598.0
PATHS = {
    # name: (attention, precision for autocast, cast weights to bf16, channels_last)
    "fp32-reference": ("reference", "fp32", False, False),   # the baseline: like OpenAI's fp32 eager code
    "fp32-sdpa": ("sdpa", "fp32", False, False),
    "bf16-autocast-sdpa": ("sdpa", "bf16", False, False),
    "bf16-weights-sdpa-cl": ("sdpa", "fp32", True, True),    # bf16 params, no casts, channels-last
}


def build(config: str, device: torch.device) -> tuple[UNetModel, dict]:
    cfg = dict(IMAGENET64_CONFIG) if config == "imagenet64" else small_unet_config(image_size=32, in_channels=3,
                                                                                   num_classes=10, model_channels=32)
    torch.manual_seed(0)
    net = UNetModel(**cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return net.to(device).eval(), cfg


def make_path(net: UNetModel, name: str, device: torch.device, compile_model: bool):
    attention, precision, bf16_weights, channels_last = PATHS[name]
    import copy

    model = set_attention_impl(copy.deepcopy(net), attention)
    if bf16_weights:
        model = model.to(torch.bfloat16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model and name != "fp32-reference":
        model = torch.compile(model)
    denoiser = Denoiser(model, CM_PRECOND, device, precision=precision, clip=True)

    def run(noise, labels):
        if channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        return onestep(denoiser, noise.to(torch.bfloat16) if bf16_weights else noise, labels)

    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_path(run, noise, labels, warmup: int, iters: int, device) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        for _ in range(warmup):
            out = run(noise, labels)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            out = run(noise, labels)
        sync(device)
        elapsed = time.perf_counter() - start
    return noise.shape[0] * iters / elapsed, out.float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--config", choices=["imagenet64", "small"], default=None,
                        help="UNet (default: imagenet64 on GPU, small on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 256 on GPU, 4 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed batches (default 20 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 5 GPU, 1 CPU)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--compile", action="store_true", help="torch.compile the non-baseline paths")
    parser.add_argument("--profile", action="store_true", help="print the top operators of each path")
    parser.add_argument("--json", default=None, help="also write every figure here (rewritten after each)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    config = args.config or ("imagenet64" if gpu else "small")
    batch = args.batch or (256 if gpu else 4)
    iters = args.iters or (20 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    names = [n for n in args.paths.split(",") if n]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        parser.error(f"--paths: unknown {unknown}")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # the baseline is real fp32, like OpenAI's
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True

    net, cfg = build(config, device)
    gen = torch.Generator().manual_seed(0)
    size = cfg["image_size"]
    noise = torch.randn(batch, cfg["in_channels"], size, size, generator=gen).to(device)
    labels = torch.randint(cfg["num_classes"], (batch,), generator=gen).to(device)
    params = sum(p.numel() for p in net.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else 'cpu'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, config {config} ({params / 1e6:.1f}M params, {size}x{size}), "
          f"batch {batch}, {iters} timed batches after {warmup} warm-up")

    figures = Figures(args.json, "cm_sample", device, config=config, params_m=params / 1e6, image_size=size,
                      batch=batch, iters=iters, warmup=warmup, compile=args.compile, baseline=names[0])
    results, outputs = {}, {}
    for name in names:
        run = make_path(net, name, device, args.compile)
        results[name], outputs[name] = time_path(run, noise, labels, warmup, iters, device)
        diff = (outputs[name] - outputs[names[0]]).abs().max().item()
        figures.add(name, img_s=results[name], ratio=results[name] / results[names[0]], max_abs_diff=diff)
        print(f"  {name:24s} {results[name]:10.1f} images/s", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
            with profile(activities=acts) as prof, torch.inference_mode():
                run(noise, labels)
                sync(device)
            key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
            print(f"--- {name}\n" + prof.key_averages().table(sort_by=key, row_limit=12))

    base = names[0]
    print(f"{'path':24s} {'images/s':>10s} {'vs ' + base:>22s} {'max |diff| vs ' + base:>22s}")
    for name in names:
        diff = (outputs[name] - outputs[base]).abs().max().item()
        print(f"{name:24s} {results[name]:10.1f} {results[name] / results[base]:21.2f}x {diff:22.4f}")
    if gpu and config == "imagenet64" and batch == 256:
        best = max(results, key=results.get)
        print(f"best {best}: {results[best] / OPENAI_H100_IMAGES_PER_S:.2f}x OpenAI's measured "
              f"{OPENAI_H100_IMAGES_PER_S:.0f} images/s on an H100 (compare only on that GPU)")
        figures.add("best", path=best, vs_openai_measured_h100=results[best] / OPENAI_H100_IMAGES_PER_S)
    figures.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
