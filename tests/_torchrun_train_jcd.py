"""Run by tests/test_train_jcd.py under torchrun: `cmboost train-jcd` through its CLI entry point."""

import sys

from cmboost.cli import main

code = main(sys.argv[1:])
import torch  # noqa: E402

if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
sys.exit(code)
