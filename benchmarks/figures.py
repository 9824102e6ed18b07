"""What the benchmark scripts share: the --json record of their figures, and a profile of one call.

Each script prints its table as before; with `--json PATH` it also writes every figure there, rewritten
after each measurement, so that a run stopped by its time budget (benchmarks/gpu_check.py) still leaves
what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """The machine and library versions a figure was measured with."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


class Figures:
    """A dict of figures written to `path` (if any) whenever one is added."""

    def __init__(self, path: str | os.PathLike | None, benchmark: str, device: torch.device, **settings):
        self.path = Path(path) if path else None
        self.data = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "environment": environment(device),
                     "settings": settings, "results": {}, "complete": False}
        self.write()

    def add(self, key: str, **values) -> None:
        self.data["results"].setdefault(key, {}).update(values)
        self.write()

    def done(self) -> None:
        self.data["complete"] = True
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float) + "\n")
        os.replace(tmp, self.path)


def profile_table(fn, device: torch.device, rows: int = 12) -> str:
    """The operators that took the most time in one call of `fn` (device time on GPU, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else []
    for key in keys + ["self_cpu_time_total"]:  # torch versions name the device column differently
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except (KeyError, AttributeError, ValueError):
            continue
    return ""


def repo_on_path() -> None:
    """Lets `python benchmarks/x.py` import cmboost from the checkout when it is not installed."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
