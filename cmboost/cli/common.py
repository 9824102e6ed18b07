"""Flags shared by several verbs, declared once so they read the same everywhere."""

from __future__ import annotations

import argparse


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --precision."""
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when present)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision (default: bf16 on GPU, fp32 on CPU)")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """--device, --precision, --seed and --batch-size."""
    add_device_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample i uses stream (seed, i)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")


def add_output_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--out and --overwrite."""
    parser.add_argument("--out", required=required, help="output file")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
