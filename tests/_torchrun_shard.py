"""Run by tests/test_runtime.py under torchrun: shards a seeded job, gathers it, rank 0 saves it."""

import sys

import numpy as np
import torch

from cmboost.runtime import gather, init_distributed, randn_per_sample, sample_generators, shard

out_path, n = sys.argv[1], int(sys.argv[2])
info = init_distributed(torch.device("cpu"))
mine = shard(range(n), info)
# Each sample's "work": a per-sample noise draw reduced to a few numbers, batch size 3.
results = []
for start in range(0, len(mine), 3):
    chunk = mine[start : start + 3]
    noise = randn_per_sample(sample_generators(1234, chunk), (4, 5))
    results.extend(noise.flatten(1)[:, :3].numpy())
everything = gather(results, info)
if info.is_main:
    np.save(out_path, np.stack(everything))
if info.enabled:
    torch.distributed.destroy_process_group()
