"""Capacity planning, to size a cluster before launching it: run TorchRec's sharding planner for a target topology
(e.g. 64 GPUs x 80 GiB, 1e9 items x 128 dims) and print the plan, per-rank memory and all-to-all bytes per step.

Defaults come from the config (items = simulator.num_items + 1 for the padding row, dim = model.embedding_dim,
world size = train.num_workers, batch = train.batch_size, ids per sample = 2 * prepare.state_len + 1 +
reward.num_negatives, sharding = train.sharding, optimizer = train.sparse_optimizer); every flag overrides.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mtrec_dist.config import load_config


def _count(text: str) -> int:
    """Accept 1000000, 1_000_000, 1e9, 10^9 and 10**9."""
    t = text.strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", t)
    try:
        if m:
            value = int(m.group(1)) ** int(m.group(2))
        elif re.fullmatch(r"\d+", t):
            value = int(t)
        else:
            f = float(t)
            if f != int(f):
                raise ValueError
            value = int(f)
    except (ValueError, OverflowError):
        import argparse

        raise argparse.ArgumentTypeError(f"not a whole number: {text!r} (use e.g. 1000000, 1e9 or 10^9)")
    return value


def add_arguments(p) -> None:
    from mtrec_dist.planning import DEVICE_CHOICES, OPTIMIZER_CHOICES, SHARDING_CHOICES

    p.add_argument("--items", type=_count, default=None,
                   help="rows of the item table, padding row included (1e9 and 10^9 work; "
                        "default: simulator.num_items + 1)")
    p.add_argument("--dim", type=int, default=None, help="embedding dimension (default: model.embedding_dim)")
    p.add_argument("--world-size", type=int, default=None,
                   help="total ranks, one per GPU (default: train.num_workers)")
    p.add_argument("--local-world-size", type=int, default=None,
                   help="ranks (GPUs) per node (default: the world size up to 8, else 8)")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory per rank in GiB (default: 80)")
    p.add_argument("--ddr-gb", type=float, default=128.0,
                   help="host memory per rank in GiB, i.e. node RAM / ranks per node (default: 128)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="cuda",
                   help="compute device of the target ranks (default: cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per rank per step (default: train.batch_size)")
    p.add_argument("--ids-per-sample", type=int, default=None,
                   help="item ids looked up per sample (default: 2 * prepare.state_len + 1 + reward.num_negatives: "
                        "state, next state, action and sampled candidates)")
    p.add_argument("--sharding", choices=SHARDING_CHOICES, default=None,
                   help="force a sharding type, or 'auto' to let the planner choose (default: train.sharding)")
    p.add_argument("--sparse-optimizer", choices=OPTIMIZER_CHOICES, default=None,
                   help="fused optimizer whose state is counted (default: train.sparse_optimizer)")
    p.add_argument("--reserve", type=float, default=0.15,
                   help="fraction of memory per rank kept for dense parameters and activations (default: 0.15)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--output", default=None, metavar="PATH_OR_URI",
                   help="also write the JSON result there (local path, file://, s3://, gs://)")


def write_text(dest: str, text: str) -> str:
    """Write ``text`` to a local path or a pyarrow-supported URI; returns where it went."""
    from pyarrow import fs

    if "://" in dest:
        filesystem, path = fs.FileSystem.from_uri(dest)
    else:
        filesystem, path = fs.LocalFileSystem(), str(Path(dest).expanduser().resolve())
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        filesystem.create_dir(parent, recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode())
    return dest


def run(args) -> int:
    from mtrec_dist.planning import CapacityError, format_plan, plan_capacity

    cfg = load_config(args.config, args.overrides)
    world = args.world_size if args.world_size is not None else cfg.train.num_workers
    kwargs = dict(
        num_items=args.items if args.items is not None else cfg.simulator.num_items + 1,
        embedding_dim=args.dim if args.dim is not None else cfg.model.embedding_dim,
        world_size=world,
        local_world_size=args.local_world_size,
        hbm_gb_per_rank=args.hbm_gb,
        ddr_gb_per_rank=args.ddr_gb,
        compute_device=args.device,
        batch_size_per_rank=args.batch_size if args.batch_size is not None else cfg.train.batch_size,
        ids_per_sample=(args.ids_per_sample if args.ids_per_sample is not None
                        else 2 * cfg.prepare.state_len + 1 + cfg.reward.num_negatives),
        sharding=args.sharding or cfg.train.sharding,
        sparse_optimizer=args.sparse_optimizer or cfg.train.sparse_optimizer,
        reserve_fraction=args.reserve,
    )
    if not args.json:
        print(f"mtrec plan: running the TorchRec planner for {kwargs['world_size']} {args.device} "
              f"rank(s), {kwargs['num_items']:,} x {kwargs['embedding_dim']} ...", file=sys.stderr, flush=True)
    try:
        result = plan_capacity(**kwargs)
    except CapacityError as e:
        print(f"mtrec plan: {e}", file=sys.stderr)
        return 3
    text = json.dumps(result, indent=2)
    if args.output:
        write_text(args.output, text + "\n")
        print(f"mtrec plan: wrote {args.output}", file=sys.stderr)
    print(text if args.json else format_plan(result))
    return 0
