"""Run by tests/test_cuda.py under a 1-process torchrun: `cmboost` (arguments from a JSON file) through
the multi-process code path, so that one GPU exercises NCCL, DDP and SyncBatchNorm.

A world of one normally takes the plain path (runtime.DistInfo.enabled is False), and NCCL refuses two
ranks on one GPU, so this helper marks the run as distributed: init_distributed then joins an NCCL
group, train-jcd converts BatchNorm to SyncBatchNorm and wraps the model in DDP, and sampling shards
its blocks and gathers them through the group. It prints what it saw for the test to check."""

import json
import sys

import torch

import cmboost.runtime as runtime

runtime.DistInfo.enabled = property(lambda self: True)  # a torchrun of one process takes the multi-process path

converted = []
depth = [0]
_convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm


def _counting_convert(module, process_group=None):  # it recurses through the class attribute: count at the top
    depth[0] += 1
    try:
        out = _convert(module, process_group)
    finally:
        depth[0] -= 1
    if depth[0] == 0:
        converted.append(sum(isinstance(m, torch.nn.SyncBatchNorm) for m in out.modules()))
    return out


torch.nn.SyncBatchNorm.convert_sync_batchnorm = _counting_convert

from cmboost.cli import main  # noqa: E402

code = main(json.loads(open(sys.argv[1]).read()))
if torch.distributed.is_initialized():
    print(f"torchrun-cuda: backend {torch.distributed.get_backend()}, world {torch.distributed.get_world_size()}")
    torch.distributed.destroy_process_group()
print(f"torchrun-cuda: SyncBatchNorm layers {sum(converted)}")
sys.exit(code)
