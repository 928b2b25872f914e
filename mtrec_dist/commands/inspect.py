"""`mtrec inspect`: summarise a log directory, a simulator output or a prepared dataset."""
from __future__ import annotations

import argparse

NAME = "inspect"
HELP = ("print a summary of raw logs (file/dir/URI), a simulator output or a prepared dataset: manifest, "
        "schema, counts and a few rows")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="directory, file or URI")
    p.add_argument("--format", default="parquet",
                   choices=["parquet", "csv", "movielens", "retailrocket", "kuairand"],
                   help="format of raw logs (ignored for prepared datasets and simulator outputs)")
    p.add_argument("--rows", type=int, default=3, help="sample rows to print per table (default 3)")


def run(args) -> int:
    from mtrec_dist.data.prepare import describe_path

    print(describe_path(args.path, fmt=args.format, rows=args.rows))
    return 0
