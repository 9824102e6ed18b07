"""The shipped domain nets' recorded test accuracy, checked on this machine's CPU (tests/test_shipped_*.py)."""

import copy
import json
import os

import numpy as np
import torch

from cmboost.files.datasets import fashion_mnist
from cmboost.metrics.domain_net import SHIPPED, DomainNet, load_domain_net, prepare_images

# Another CPU's float32 kernels sum in another order. How far that can move a logit is bounded from
# this machine's own float32 error (float32 against the same net in float64): another float32 kernel
# is taken to err at most ROUNDING_FACTOR times as much. A prediction can only change where the top-2
# margin is below the sum of both errors, twice (both logits move).
ROUNDING_FACTOR = 10.0
# float64 convolutions are about 20x slower than float32 ones, so the exact pass runs on a probe of
# PROBE images and on every image whose float32 margin is within reach of PROBE_HEADROOM times the
# largest error the probe shows; elsewhere the margin is too wide for any such error to matter.
PROBE = 500
PROBE_HEADROOM = 10.0


def accuracy_and_near_ties(net: DomainNet, images_u8: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Top-1 accuracy in float32, and how many images another CPU's rounding could reclassify. Runs
    on every core (the suite's default is one thread): the passes over the 10,000 test images are the
    suite's largest convolutions, and nothing else runs beside them."""
    x = prepare_images(torch.from_numpy(images_u8), net.config)
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        return _accuracy_and_near_ties(net, x, labels)
    finally:
        torch.set_num_threads(threads)


def _reach(logits32: torch.Tensor, logits64: torch.Tensor) -> torch.Tensor:
    """How far another CPU's float32 logits could be from ours, summed over the top two: per image."""
    return 2 * (1 + ROUNDING_FACTOR) * (logits32 - logits64).abs().amax(1)


def _accuracy_and_near_ties(net: DomainNet, x: torch.Tensor, labels: np.ndarray) -> tuple[float, int]:
    exact_net = copy.deepcopy(net).double()

    def exact(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([exact_net(b.double())[1] for b in x[rows].split(500)]) if len(rows) else \
            torch.zeros(0, logits32.shape[1], dtype=torch.float64)

    with torch.no_grad():
        logits32 = torch.cat([net.eval()(b)[1] for b in x.split(500)]).double()
        probe = torch.arange(min(PROBE, len(x)))
        top2_32 = logits32.topk(2, dim=1).values
        wide_reach = PROBE_HEADROOM * _reach(logits32[probe], exact(probe)).max()
        close = torch.nonzero(top2_32[:, 0] - top2_32[:, 1] <= 2 * wide_reach).squeeze(1)  # margin64 >= margin32 - err
        rows = torch.unique(torch.cat([probe, close]))
        logits64 = exact(rows)
    top2 = logits64.topk(2, dim=1).values
    near_ties = int((top2[:, 0] - top2[:, 1] <= _reach(logits32[rows], logits64)).sum())
    accuracy = float((logits32.argmax(1).numpy() == labels).mean())
    return accuracy, near_ties


def fmnist_test_split():
    images, labels = fashion_mnist("test")
    return images[:, None], labels


def check_shipped_candidate(name: str, arch: str, seed: int, images: np.ndarray, labels: np.ndarray) -> None:
    """A shipped tuning candidate is what the recipe trained: its architecture, seed and command, and
    the test accuracy it records (ours up to the images rounding could reclassify), as the assets
    README states it."""
    net, meta = load_domain_net(name)
    assert net.config.arch == arch and json.loads(meta["settings"])["seed"] == seed
    assert f"--arch {arch}" in meta["command"] and f"--seed {seed}" in meta["command"]
    accuracy, near_ties = accuracy_and_near_ties(net, images, labels)
    assert abs(accuracy - float(meta["test_accuracy"])) <= near_ties / len(images) + 1e-12
    # the assets README states each one's accuracy (the file's own record, rounded)
    assert f"| {float(meta['test_accuracy']):.4f} |" in (SHIPPED[name].parent / "README.md").read_text()
