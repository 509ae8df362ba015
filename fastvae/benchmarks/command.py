"""``fastvae bench``: the smoke cases (every case with --full) timed and printed as one table."""

from __future__ import annotations

import argparse

import torch

from fastvae.benchmarks.measure import measure
from fastvae.benchmarks.report import device_name, format_table, row_order
from fastvae.benchmarks.scopes import cases
from fastvae.benchmarks.timing import copy_bandwidth
from fastvae.training.options import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Time the fused ops and the training step against eager PyTorch and torch.compile."
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=positive_int, default=10, help="timed runs per case (median reported)")
    parser.add_argument("--full", action="store_true", help="every size and the compiled training step (slow on a CPU)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    rows = [measure(case, device, rounds=args.rounds, warmup=3) for case in cases(device, "full" if args.full else "smoke")]
    rows.sort(key=row_order)
    print(f"{device_name(device)}, torch {torch.__version__}")
    print(format_table(rows, bandwidth))
    return 0
