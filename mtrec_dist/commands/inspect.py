"""Print a summary of raw logs (file/dir/URI), a simulator output or a prepared dataset: manifest, schema, counts
and a few rows.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="directory, file or URI")
    p.add_argument("--format", default="parquet",
                   choices=["parquet", "csv", "movielens", "retailrocket", "kuairand"],
                   help="format of raw logs (ignored for prepared datasets and simulator outputs)")
    p.add_argument("--rows", type=int, default=3, help="sample rows to print per table (default 3)")


def run(args) -> int:
    print(describe_path(args.path, fmt=args.format, rows=args.rows))
    return 0


def _sample(fs, path: str, rows: int):
    """(schema, first ``rows`` rows as dicts) of a Parquet file, reading only its first batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        first = next(pf.iter_batches(batch_size=max(rows, 1)), None)
        return pf.schema_arrow, ([] if first is None else pa.Table.from_batches([first]).slice(0, rows).to_pylist())


def _fmt_rows(sample: list[dict]) -> list[str]:
    """One JSON line per row, floats rounded so that a row fits on a line."""
    def short(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, list):
            return [short(x) for x in v]
        return v
    return [f"    {json.dumps({k: short(v) for k, v in r.items()}, default=str)}" for r in sample]


def describe_path(path: str, fmt: str = "parquet", rows: int = 3) -> str:
    """Text summary of a prepared dataset, a simulator output directory, or raw logs of ``fmt``."""
    import pyarrow.fs as pafs

    from mtrec_dist.data.dataset import is_prepared_dataset
    from mtrec_dist.data.readers import join_path, resolve_filesystem
    from mtrec_dist.data.summaries import format_simulation_summary

    if is_prepared_dataset(path):
        return _describe_prepared(path, rows)
    fs, root = resolve_filesystem(path)
    summary_path = join_path(root, "truth", "summary.json")
    if fs.get_file_info(summary_path).type == pafs.FileType.File:
        with fs.open_input_stream(summary_path) as f:
            s = json.loads(f.read().decode())
        return format_simulation_summary(s) + "\n" + describe_path(join_path(path, "logs"), "parquet", rows)
    return _describe_raw(path, fmt, rows)


def _describe_prepared(path: str, rows: int) -> str:
    """Manifest summary, each table's schema and first rows, and the vocab sizes of a prepared dataset."""
    from mtrec_dist.data.dataset import EVAL_DIR, REJECTS_DIR, TRANSITIONS_DIR, load_manifest
    from mtrec_dist.data.readers import join_path, resolve_filesystem
    from mtrec_dist.data.summaries import summarize_manifest
    from mtrec_dist.data.vocab import load_vocab

    fs, root = resolve_filesystem(path)
    m = load_manifest(path)
    out = [summarize_manifest(m)]
    for sub in (TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR):
        if m["shards"].get(sub):
            schema, sample = _sample(fs, join_path(root, m["shards"][sub][0]["path"]), rows)
            out.append(f"  {sub}/ schema: " + ", ".join(f"{f.name}: {f.type}" for f in schema))
            out += _fmt_rows(sample)
    vocab = load_vocab(path)
    out.append(f"  vocab: {vocab.num_items:,} items (embedding rows {vocab.num_items + 1:,}), "
               f"{vocab.num_users:,} users")
    return "\n".join(out)


def _describe_raw(path: str, fmt: str, rows: int) -> str:
    """Files, day partitions, row count (Parquet) and a parsed sample of raw logs."""
    from mtrec_dist.data import readers as rd

    fs, files = rd.list_input_files(path, fmt)
    out = [f"raw {fmt} logs at {path}: {len(files)} file(s), {sum(f.size for f in files):,} bytes"]
    days = sorted({f.partition_day for f in files if f.partition_day})
    if days:
        out.append(f"  day partitions: {len(days)} ({days[0]} .. {days[-1]})")
    if fmt == "parquet":
        total = sum(sum(rd.parquet_row_groups(fs, f)) for f in files)
        schema, sample = _sample(fs, files[0].path, rows)
        out.append(f"  rows: {total:,}")
        out.append("  schema: " + ", ".join(f"{f.name}: {f.type}" for f in schema))
        out += _fmt_rows(sample)
    else:
        rd.check_input_file(fs, files[0], fmt)
        first = next(rd.iter_file(fs, files[0], fmt), None)
        if first is not None:
            out.append(f"  parsed sample of {files[0].display} (as event columns):")
            out += _fmt_rows(first.slice(0, rows).to_pylist())
    return "\n".join(out)
