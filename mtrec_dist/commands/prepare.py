"""Validate raw logs (bad rows quarantined with a reason), build ID vocabularies, sessionize and window them into
transitions (Parquet shards + manifest), on Ray Data.
"""
from __future__ import annotations

import argparse

from mtrec_dist.config import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", default=None, metavar="PATH",
                   help="raw logs: file, directory or URI (default: prepare.input, else <run_dir>/sim/logs)")
    p.add_argument("--format", default=None,
                   choices=["parquet", "csv", "movielens", "retailrocket", "kuairand"],
                   help="input format (default: prepare.format)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory or URI (default: prepare.output, else <run_dir>/prepared)")
    p.add_argument("--vocab", default=None, metavar="DIR",
                   help="existing vocab (a vocab/ dir or a prepared dataset) to extend: old indices are kept")
    p.add_argument("--column-map", action="append", default=[], metavar="RAW=COLUMN",
                   help="rename a raw column to an event column (generic parquet/csv; repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: run a local one)")


def run(args) -> int:
    import os

    from mtrec_dist.data.prepare import default_paths, prepare_dataset, summarize_manifest

    cfg = load_config(args.config, args.overrides)
    pc = cfg.prepare
    if args.format:
        pc.format = args.format
    for item in args.column_map:
        if "=" not in item:
            raise ConfigError(f"--column-map {item!r}: expected RAW=COLUMN")
        raw, col = item.split("=", 1)
        pc.column_map[raw.strip()] = col.strip()
    pc.overwrite = pc.overwrite or args.overwrite
    pc.progress = pc.progress and not args.no_progress
    pc.validate()
    input_uri, output_uri = default_paths(cfg)
    if args.ray_address or cfg.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address or cfg.ray_address
    manifest = prepare_dataset(pc, args.input or input_uri, args.out or output_uri,
                               vocab_dir=args.vocab if args.vocab is not None else pc.vocab_dir)
    print(summarize_manifest(manifest))
    return 0
