"""Benchmark the library against single-process baselines written as a user would (pandas prepare, plain PyTorch
QR-IQL and SASRec, a plain scoring loop), each checked to compute the same result first; prints every ratio with
the machine's load average and writes JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from mtrec_dist.bench.peer import DEFAULT_RATINGS, PEER_MODELS
from mtrec_dist.choices import BENCH_STAGES

SIZE_FLAGS = ("users", "items", "days", "steps", "report_every", "warmup_intervals", "threads", "rounds")


def _preset(name: str) -> str:
    """``default D; --quick Q`` of a size field, read from the presets (their one definition)."""
    from mtrec_dist.bench.sizes import DEFAULT, QUICK

    d, q = getattr(DEFAULT, name), getattr(QUICK, name)
    return f"default {d:,}" + (f"; --quick {q:,}" if q != d else "")


ALL_STAGES = ",".join(BENCH_STAGES)  # --stages' default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small sizes for CI-like machines: under 5 minutes on a quiet 2-core machine")
    size_help = {"users": "simulated users", "items": "simulated catalog", "days": "simulated days",
                 "steps": "training steps of every run", "report_every": "steps per metrics interval",
                 "warmup_intervals": "leading intervals left out of steady-state figures",
                 "threads": "torch threads of the plain runs and of each Ray worker",
                 "rounds": "rounds of each model's training runs (plain, 1 worker, the same worker fed the other "
                           "way, 2 workers, plain), one after another; each training ratio is judged on its median "
                           "round (the lower middle of an even count), every round's value shown beside it. Other "
                           "stages run once (scoring keeps the fastest of its own 2 rounds)"}
    for name in SIZE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"{size_help[name]} ({_preset(name)})")
    p.add_argument("--stages", default=ALL_STAGES,
                   help="comma-separated stages to run (scoring needs qriql; default: all; 'none' with --peer runs "
                        "only the peer comparison)")
    p.add_argument("--catalog-sizes", default="", metavar="N,N,...",
                   help="also time a QR-IQL step and each rank's peak memory per catalog size (item table row-wise "
                        "over 2 Ray Train workers, synthetic batches; sampled vs full-catalog soft value), e.g. "
                        "10000,100000,1000000,10000000; plotted in <work>/bench_scale.png (default: skipped)")
    p.add_argument("--prepare-scale", default="", metavar="USERS,USERS,...",
                   help="also time prepare against the plain pandas/pyarrow script on a simulated world of each "
                        "size (users; about 24 events each over the default 2 days: 40000,400000 is about 10^6 "
                        "and 10^7 events); plotted in <work>/bench_scale.png (default: skipped)")
    p.add_argument("--sharded-items", type=int, default=0, metavar="N",
                   help="also score random pairs with an N-item reward model both ways (item table sharded over 2 "
                        "workers vs scoring actors holding all of it) and rank 1,024 test rows of an N-item SASRec "
                        "sharded; peak RSS per process, rows/s (default: skipped)")
    p.add_argument("--sharded-rows", type=int, default=20_000, metavar="R",
                   help="pairs scored by --sharded-items (default 20,000)")
    p.add_argument("--peer", choices=["recbole"], default=None,
                   help="also train our SASRec, GRU4Rec, Caser and NextItNet and RecBole 1.2.1's on the same "
                        "MovieLens-1M subset, split, architecture and budget: samples/s and NDCG@10 side by side "
                        "(RecBole runs in its own venv: bash scripts/peer_recbole_env.sh; default: skipped)")
    p.add_argument("--peer-epochs", type=int, default=1, help="epochs of every peer run, both sides (default 1)")
    p.add_argument("--peer-models", default=",".join(PEER_MODELS), metavar="M,M,...",
                   help=f"peer models (default all: {','.join(PEER_MODELS)})")
    p.add_argument("--peer-users", type=int, default=0, metavar="N",
                   help="only the N smallest user ids of the ratings file, on both sides (default 0: all)")
    p.add_argument("--peer-ratings", default=None, metavar="PATH",
                   help="MovieLens ratings.dat (default $MTREC_ML1M_RATINGS, else " + DEFAULT_RATINGS + ")")
    p.add_argument("--peer-recbole-threads", type=int, default=0, metavar="T",
                   help="RecBole's torch threads (default 0: as many as ours uses in all, workers x --threads)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="scratch folder; simulated logs are reused between runs (default: <run_dir>/bench)")
    p.add_argument("--json", default=None, metavar="PATH", help="where the JSON result goes (default: <work>/bench.json)")
    p.add_argument("--append-results", nargs="?", const="", default=None, metavar="PATH",
                   help="append the Markdown table to bench/RESULTS.md (or PATH)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: ray_address, else a local one)")


def _command_line(args) -> str:
    """The command as a user would retype it (the flags that were given)."""
    parts = ["mtrec bench"] + (["--quick"] if args.quick else [])
    parts += [f"--{f.replace('_', '-')} {getattr(args, f)}" for f in SIZE_FLAGS if getattr(args, f) is not None]
    parts += [f"--catalog-sizes {args.catalog_sizes}"] if args.catalog_sizes else []
    parts += [f"--prepare-scale {args.prepare_scale}"] if args.prepare_scale else []
    parts += [f"--sharded-items {args.sharded_items} --sharded-rows {args.sharded_rows}"] if args.sharded_items else []
    parts += [f"--stages {args.stages}"] if args.stages != ALL_STAGES else []
    if args.peer:
        parts += [f"--peer {args.peer} --peer-epochs {args.peer_epochs} --peer-models {args.peer_models}"]
        parts += [f"--peer-users {args.peer_users}"] if args.peer_users else []
        parts += [f"--peer-recbole-threads {args.peer_recbole_threads}"] if args.peer_recbole_threads else []
    return " ".join(parts)


def _int_list(flag: str, text: str) -> list:
    """``"10000,100000"`` -> ``[10000, 100000]``; a clear error naming the flag for anything else."""
    try:
        values = [int(n.replace("_", "")) for n in text.split(",") if n.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 10000,100000") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag} {text!r}: every size must be >= 1")
    return values


def peer_settings(args, threads: int):
    """The peer comparison's settings from the flags (``None`` without ``--peer``); raises PeerUnavailable with
    the one command to run when the peer environment or the data is missing, before anything starts."""
    from mtrec_dist.bench.peer import PeerSettings, check_ratings, parse_models, peer_python

    if not args.peer:
        return None
    s = PeerSettings(models=parse_models(args.peer_models), epochs=args.peer_epochs, max_users=args.peer_users,
                     threads=threads, recbole_threads=args.peer_recbole_threads)
    if args.peer_ratings:
        s.ratings = args.peer_ratings
    peer_python(s.venv)
    check_ratings(s.ratings)
    return s


def run(args) -> int:
    from mtrec_dist.bench.report import DEFAULT_RESULTS, append_results, markdown, write_json
    from mtrec_dist.bench.runner import failed_stages, run_bench
    from mtrec_dist.bench.sizes import choose_sizes
    from mtrec_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.ray_address:
        cfg.ray_address = args.ray_address
    sizes = choose_sizes(args.quick, **{f: getattr(args, f) for f in SIZE_FLAGS})
    work = Path(args.work or Path(cfg.run_dir) / "bench")
    if "://" in str(work):
        raise ValueError(f"--work {work}: the benchmark needs a local folder (the baselines read it directly)")
    stages = [s.strip() for s in args.stages.split(",") if s.strip() and s.strip() != "none"]
    from mtrec_dist.bench.peer import PeerUnavailable

    try:
        peer = peer_settings(args, sizes.threads)
    except PeerUnavailable as e:
        print(f"mtrec bench --peer {args.peer}: {e}", file=sys.stderr)
        return 2
    catalog = _int_list("--catalog-sizes", args.catalog_sizes)
    scale = _int_list("--prepare-scale", args.prepare_scale)
    result = run_bench(cfg, sizes, work, stages=stages, catalog_sizes=catalog, prepare_scale=scale,
                       sharded_items=args.sharded_items, sharded_rows=args.sharded_rows,
                       peer=peer, command=_command_line(args), say=lambda m: print(m, file=sys.stderr, flush=True))
    text = markdown(result)
    print(text)
    json_path = Path(args.json) if args.json else work / "bench.json"
    write_json(result, json_path)
    print(f"JSON: {json_path}", file=sys.stderr)
    if result.get("plots"):
        print(f"plots: {', '.join(result['plots'])}", file=sys.stderr)
    if args.append_results is not None:
        results = Path(args.append_results) if args.append_results else DEFAULT_RESULTS
        append_results(text, results)
        print(f"appended to {results}", file=sys.stderr)
    failed = failed_stages(result)
    if failed:
        print(f"mtrec bench: stage(s) {failed} failed; their ratios are missing", file=sys.stderr)
        return 1
    return 0
