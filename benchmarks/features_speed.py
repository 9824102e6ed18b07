"""Feature-extraction speed, baseline and ours side by side in one run.

(a) GPU: Inception-v3 features/s for 64x64 images resized to 299: torch-fidelity's extractor
    (its own forward: TF-compatible gather resize, fp32, NCHW) against cmboost's InceptionFeatures
    (the same port's layers; resize as two batched matmuls, channels-last, bf16 autocast by
    default). Random weights unless --inception-weights is given (speed does not depend on them).
    Prints the ratio and how far the features are apart, and the FID of two image sets through
    each extractor (--fid-images A B, e.g. real and generated samples; else two synthetic sets).
    Skipped with a message without a GPU or without torch-fidelity.
(b) CPU: Fashion-MNIST test images through the shipped domain net (the cmboost pipeline:
    batching, statistics, softmax), images/s, next to Inception on the same CPU for scale.

    python benchmarks/features_speed.py                      # CPU part only on a CPU machine
    python benchmarks/features_speed.py --device cuda --num-images 5000 --batch-size 500
--json PATH writes every figure of part (a) (benchmarks/gpu_check.py reads it).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from figures import Figures, repo_on_path

repo_on_path()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, batches, device, warmup: int = 2) -> float:
    for batch in batches[:warmup]:
        fn(batch)
    _sync(device)
    tic = time.perf_counter()
    count = 0
    for batch in batches:
        fn(batch)
        count += len(batch)
    _sync(device)
    return count / (time.perf_counter() - tic)


def inception_part(args) -> None:
    from cmboost.runtime import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda" and not args.allow_cpu:
        print(f"(a) Inception GPU speed: skipped, device is {device} (run with --device cuda on a GPU machine)")
        return
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        print("(a) Inception GPU speed: skipped, torch-fidelity is not installed (pip install 'cmboost[inception]')")
        return
    from cmboost.metrics.features import InceptionFeatures

    torch.backends.cudnn.benchmark = True  # for both sides
    if args.inception_weights:
        ours = InceptionFeatures.from_weights(args.inception_weights, device, args.precision, allow_download=False)
        weights = "real weights"
    else:
        ours = InceptionFeatures.random(seed=0, device=device, precision=args.precision)
        weights = "random weights"
    theirs = copy.deepcopy(ours.port).to(memory_format=torch.contiguous_format)  # torch-fidelity's module as-is
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=gen).to(device)
    batches = list(images.split(args.batch_size))

    with torch.no_grad():
        base = _rate(lambda b: theirs(b), batches, device)
        fast = _rate(lambda b: ours(b), batches, device)
        ours_fp32 = InceptionFeatures(ours.port, ours.identity, device, "fp32", channels_last=True)
        fp32 = _rate(lambda b: ours_fp32(b), batches, device)
        probe = batches[0]
        ref_pool = theirs(probe)[0].float()
        diff = lambda out: float((out["pool"] - ref_pool).abs().max() / ref_pool.abs().max())  # noqa: E731
        rel_fast, rel_fp32 = diff(ours(probe)), diff(ours_fp32(probe))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"(a) Inception-v3 {args.image_size}->299, {args.num_images} images, batch {args.batch_size}, "
          f"{weights}, {name}")
    print(f"    torch-fidelity extractor (fp32)      : {base:9.1f} images/s")
    print(f"    cmboost, fp32 + channels-last        : {fp32:9.1f} images/s  ({fp32 / base:.2f}x), "
          f"max rel. pool diff {rel_fp32:.2e}")
    print(f"    cmboost, {args.precision} + channels-last        : {fast:9.1f} images/s  ({fast / base:.2f}x), "
          f"max rel. pool diff {rel_fast:.2e}", flush=True)
    figures = Figures(args.json, "features", device, weights=weights, images=args.num_images,
                      image_size=args.image_size, batch=args.batch_size, precision=args.precision)
    figures.add("inception", torch_fidelity_img_s=base, ours_fp32_img_s=fp32, ours_img_s=fast,
                ratio_fp32=fp32 / base, ratio=fast / base, max_rel_pool_diff_fp32=rel_fp32,
                max_rel_pool_diff=rel_fast)
    fid_part(args, theirs, ours, ours_fp32, device, figures)
    figures.done()


def _fid_sets(args) -> tuple[list[np.ndarray], str]:
    """Two uint8 NCHW image sets: the --fid-images files, or uniform noise against the same noise blurred."""
    if args.fid_images:
        from cmboost.files.samples import load_samples

        sets = [load_samples(path)[0][: args.fid_num] for path in args.fid_images]
        sets = [np.repeat(s, 3, axis=1) if s.shape[1] == 1 else s for s in sets]  # torch-fidelity takes RGB
        return sets, " vs ".join(Path(p).name for p in args.fid_images)
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (2 * args.fid_num, 3, args.image_size, args.image_size), dtype=np.uint8)
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(noise[args.fid_num:]).float(), 3, 1, 1)
    return [noise[: args.fid_num], blurred.round().to(torch.uint8).numpy()], "noise vs blurred noise (synthetic)"


def fid_part(args, theirs, ours, ours_fp32, device, figures) -> None:
    """FID of two image sets through torch-fidelity's extractor, ours in fp32 and ours in --precision.
    With random weights the features are tiny (FIDs near 1e-12), so every extractor's features are
    divided by the same number, the RMS of torch-fidelity's features of the first set: the FIDs are
    then of the usual size and their differences mean what a difference of real FIDs would."""
    from cmboost.metrics.stats import feature_statistics, frechet_distance

    if args.fid_num < 2:
        return
    sets, what = _fid_sets(args)
    extractors = {"torch_fidelity": lambda b: theirs(b)[0], "ours_fp32": lambda b: ours_fp32(b)["pool"],
                  f"ours_{args.precision}": lambda b: ours(b)["pool"]}
    features = {}
    with torch.no_grad():
        for name, extract in extractors.items():
            features[name] = [torch.cat([extract(b.to(device)).float().cpu()
                                         for b in torch.from_numpy(np.ascontiguousarray(images)).split(args.batch_size)])
                              for images in sets]
    real_weights = bool(args.inception_weights)
    scale = 1.0 if real_weights else float(features["torch_fidelity"][0].double().pow(2).mean().sqrt())
    fids = {name: float(frechet_distance(*feature_statistics(a.double().numpy() / scale),
                                         *feature_statistics(b.double().numpy() / scale)))
            for name, (a, b) in features.items()}
    base = fids["torch_fidelity"]
    count = min(len(s) for s in sets)
    unit = "" if real_weights else f", features / {scale:.3g} (random weights)"
    print(f"    FID of {what}, {count} images each{unit}:")
    for name, fid in fids.items():
        print(f"      {name:22s}: {fid:10.4f}  (diff {fid - base:+.4f})")
    figures.add("fid", sets=what, images_per_set=count, feature_scale=scale,
                **{f"fid_{k}": v for k, v in fids.items()},
                max_abs_fid_diff=max(abs(v - base) for v in fids.values()),
                max_rel_fid_diff=max(abs(v - base) for v in fids.values()) / max(abs(base), 1e-30))


def fmnist_part(args) -> None:
    from cmboost.files.datasets import fashion_mnist
    from cmboost.metrics.domain_net import load_domain_net, prepare_images
    from cmboost.metrics.evaluate import extract_features
    from cmboost.files.samples import ArraySource
    from cmboost.metrics.features import InceptionFeatures, load_feature_extractor

    torch.set_num_threads(args.threads)
    images = fashion_mnist("test")[0][: args.fmnist_images, None]
    cpu = torch.device("cpu")

    # baseline: the same net called plainly (NCHW, fp32), features only, same batches
    plain, _ = load_domain_net("fmnist", cpu)
    batches = [torch.from_numpy(b) for b in np.array_split(images, max(1, len(images) // args.fmnist_batch_size))]
    with torch.no_grad():
        base = _rate(lambda b: plain(prepare_images(b, plain.config)), batches, cpu, warmup=1)

    # ours: the evaluation pipeline (channels-last extractor, running statistics, softmax for IS)
    extractor = load_feature_extractor("fmnist", device="cpu")
    extract_features(ArraySource(images[:500], "warm-up"), extractor, args.fmnist_batch_size)
    tic = time.perf_counter()
    feats = extract_features(ArraySource(images, "fmnist test"), extractor, args.fmnist_batch_size)
    seconds = time.perf_counter() - tic
    ours = len(images) / seconds
    print(f"(b) CPU, {args.threads} thread(s), {len(images)} Fashion-MNIST test images, batch {args.fmnist_batch_size}, "
          "fmnist domain net:")
    print(f"    plain forward (NCHW, features only)          : {base:8.0f} images/s")
    print(f"    cmboost extract_features (stats + softmax)   : {ours:8.0f} images/s  ({ours / base:.2f}x), "
          f"{seconds:.2f} s; mu {feats.mu.shape}")
    if args.cpu_inception_images > 0:
        try:
            inception = InceptionFeatures.random(seed=0, device="cpu", precision="fp32")
        except Exception as err:  # torch-fidelity missing: the user error says so
            print(f"    Inception on CPU: skipped ({err})")
            return
        grey = torch.from_numpy(np.ascontiguousarray(images[: args.cpu_inception_images]))
        with torch.no_grad():
            rate = _rate(lambda b: inception(b), list(grey.split(10)), torch.device("cpu"), warmup=1)
        print(f"    Inception-v3 (random weights) on the same CPU: {rate:.2f} images/s -> the domain net is "
              f"{ours / rate:.0f}x faster")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="device for part (a) (default: cuda when present)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="ours, part (a)")
    parser.add_argument("--num-images", type=int, default=2000, help="part (a)")
    parser.add_argument("--image-size", type=int, default=64, help="part (a) input size")
    parser.add_argument("--batch-size", type=int, default=200, help="part (a), both extractors")
    parser.add_argument("--inception-weights", default=None, help="part (a): real weights (optional)")
    parser.add_argument("--fmnist-images", type=int, default=10000, help="part (b)")
    parser.add_argument("--fmnist-batch-size", type=int, default=500, help="part (b)")
    parser.add_argument("--threads", type=int, default=1, help="part (b) CPU threads")
    parser.add_argument("--cpu-inception-images", type=int, default=20, help="part (b) Inception comparison; 0 skips")
    parser.add_argument("--allow-cpu", action="store_true", help="run part (a) on CPU too (slow; checks the script)")
    parser.add_argument("--skip-inception", action="store_true")
    parser.add_argument("--skip-fmnist", action="store_true")
    parser.add_argument("--fid-images", nargs=2, default=None, metavar=("A", "B"),
                        help="part (a): two sample files (.npz or PNG folders) whose FID each extractor computes "
                             "(default: two synthetic sets)")
    parser.add_argument("--fid-num", type=int, default=2000, help="part (a): images per FID set; 0 skips the FID")
    parser.add_argument("--json", default=None, help="part (a): also write every figure here")
    args = parser.parse_args(argv)
    if not args.skip_inception:
        inception_part(args)
    if not args.skip_fmnist:
        fmnist_part(args)


if __name__ == "__main__":
    main()
