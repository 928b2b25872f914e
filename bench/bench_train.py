"""Training-throughput benchmark of the QR-IQL reward model (one run, ratios between variants).

Measures, in one process run, on the same simulated + prepared transitions:

(a) ``train_reward_model`` (Ray Data -> Ray Train -> TorchRec DMP, gloo) with 1 and with 2 workers:
    steady-state samples/s from ``metrics.jsonl`` (report intervals after the first ``--warmup-intervals``
    are pooled: rows / time), plus the wall time of the whole call (Ray Train start-up, planning,
    checkpoint included);
(b) a plain single-process PyTorch implementation of the same model (``bench/plain_qriql.py``:
    nn.Embedding instead of TorchRec, no Ray; same batch size, dim, quantiles, encoder, losses), fed
    from the same Parquet files read with pyarrow; its loss is first checked against QRIQLModel's;
(c) the step time (forward + backward + optimizer + target update) of the real QRIQLModel under DMP
    with one in-process gloo rank (fused EXACT_ROWWISE_ADAGRAD), on synthetic batches, with 10^4,
    10^5, 10^6 items: sampled soft value (``reward.num_negatives``) vs the full-catalog soft value.

Prints a table and a JSON summary (also written to ``<work>/bench_train.json``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train.py [--users 12000] [--items 20000] [--steps 300]
        [--sizes 10000,100000,1000000] [--full-max 1000000] [--skip-ray] [--skip-steps]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plain_qriql as plain  # noqa: E402

from mtrec_dist.config import PipelineConfig, PrepareConfig, SimulatorConfig  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ---- data ---------------------------------------------------------------------------------------------

def make_data(args, work: Path) -> dict:
    """Simulate + prepare (cached in ``work`` when the settings match)."""
    from mtrec_dist.data.prepare import load_manifest, prepare_dataset
    from mtrec_dist.data.simulator import simulate_logs

    key = {"users": args.users, "items": args.items, "days": args.days, "state_len": args.state_len}
    stamp = work / "data_key.json"
    prepared = work / "prepared"
    if stamp.exists() and json.loads(stamp.read_text()) == key and (prepared / "manifest.json").exists():
        return load_manifest(str(prepared))
    shutil.rmtree(work / "sim", ignore_errors=True)
    t = time.time()
    s = simulate_logs(SimulatorConfig(num_users=args.users, num_items=args.items, days=args.days,
                                      write_exposures=False, seed=0), str(work / "sim"), progress=lambda m: None)
    log(f"simulated {s['events']:,} events in {time.time() - t:.1f}s")
    from mtrec_dist.runtime import init_ray

    init_ray(num_cpus=args.num_cpus, log_to_driver=False)
    t = time.time()
    prepare_dataset(PrepareConfig(state_len=args.state_len, overwrite=True, progress=False),
                    str(work / "sim" / "logs"), str(prepared), progress=lambda m: None)
    log(f"prepared in {time.time() - t:.1f}s")
    stamp.write_text(json.dumps(key))
    return load_manifest(str(prepared))


def base_config(args) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model = dataclasses.replace(cfg.model, embedding_dim=args.dim, num_layers=args.layers, num_heads=2,
                                    encoder="sasrec")
    cfg.reward = dataclasses.replace(cfg.reward, num_quantiles=args.quantiles, num_negatives=args.negatives)
    cfg.train = dataclasses.replace(cfg.train, batch_size=args.batch_size, epochs=1000, max_steps=args.steps,
                                    report_every=args.report_every, checkpoint_every=10 ** 9, cpus_per_worker=0.5,
                                    use_gpu="false", shuffle_buffer_rows=args.shuffle_buffer,
                                    prefetch_batches=args.prefetch)
    return cfg


# ---- (a) Ray Train --------------------------------------------------------------------------------------

def steady_state(history: list, warmup_intervals: int) -> dict:
    """Pool the report intervals after the first ``warmup_intervals``: rows / seconds, seconds / steps."""
    seen, iv = set(), []
    for h in history:  # the final metrics event repeats the last interval when max_steps % report_every == 0
        if h.get("event") == "metrics" and h.get("interval_rows", 0) > 0 and h["step"] not in seen:
            seen.add(h["step"])
            iv.append(h)
    prev = [0] + [h["step"] for h in iv[:-1]]
    pairs = list(zip(iv, prev))[warmup_intervals:] or list(zip(iv, prev))[-1:]
    rows = sum(h["interval_rows"] for h, _ in pairs)
    secs = sum(h["interval_rows"] / h["samples_per_s"] for h, _ in pairs)
    steps = sum(h["step"] - p for h, p in pairs)
    return {"samples_per_s": rows / secs, "step_time_s": secs / steps,
            "data_wait_frac": float(np.mean([h["data_wait_frac"] for h, _ in pairs])), "intervals": len(pairs),
            "rows_measured": int(rows), "first_interval_samples_per_s": iv[0]["samples_per_s"] if iv else None,
            "final_loss": iv[-1].get("loss") if iv else None}


def run_ray(args, cfg: PipelineConfig, prepared: str, work: Path, workers: int) -> dict:
    from mtrec_dist.training.loop import read_history
    from mtrec_dist.training.reward import train_reward_model

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=workers))
    out = work / f"ray_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    la0 = load1()
    t = time.perf_counter()
    summary = train_reward_model(cfg, prepared, str(out), progress=False)
    wall = time.perf_counter() - t
    hist = read_history(str(out), summary["run_name"])
    st = steady_state(hist, args.warmup_intervals)
    start = next(e for e in hist if e["event"] == "start")
    end = next(e for e in hist if e["event"] == "end")
    return {"workers": workers, "wall_s": round(wall, 2), "worker_setup_s": round(start["setup_s"], 2),
            "worker_start_to_end_s": round(end["time"] - start["worker_entered"], 2),
            "steps": end["step"], "rows": end["rows_seen"], **st, "load_avg_1m_before": la0, "load_avg_1m_after": load1(),
            "sharding": {k: v["sharding_type"] for k, v in start["plan"].items()}}


# ---- (b) plain PyTorch ------------------------------------------------------------------------------------

def run_plain(args, cfg: PipelineConfig, prepared: str, manifest: dict) -> dict:
    L = manifest["state_len"]
    la0 = load1()
    t0 = time.perf_counter()
    data = plain.load_transitions(prepared, L)
    read_s = time.perf_counter() - t0
    torch.manual_seed(cfg.train.seed)
    model = plain.PlainQRIQL(manifest["num_items"], cfg.model, cfg.reward, L)
    model.train()
    opts = plain.make_optimizer(model, cfg.train.lr, cfg.train.sparse_lr)
    it = plain.iter_batches(data, cfg.train.batch_size, seed=cfg.train.seed)
    warm = args.report_every * args.warmup_intervals
    times, losses = [], []
    for i in range(args.steps):
        ts = time.perf_counter()
        batch = next(it)
        losses.append(plain.train_step(model, opts, batch))
        times.append(time.perf_counter() - ts)
    total = time.perf_counter() - t0
    steady = times[warm:] or times
    return {"workers": "plain", "wall_s": round(total, 2), "read_s": round(read_s, 3), "rows_loaded": int(data["action"].shape[0]),
            "steps": args.steps, "samples_per_s": cfg.train.batch_size * len(steady) / sum(steady),
            "step_time_s": float(np.mean(steady)), "first_steps_samples_per_s": cfg.train.batch_size * warm / max(sum(times[:warm]), 1e-9) if warm else None,
            "final_loss": float(np.mean(losses[-args.report_every:])), "torch_threads": torch.get_num_threads(),
            "load_avg_1m_before": la0, "load_avg_1m_after": load1()}


# ---- (c) step time vs catalog size (DMP, one in-process gloo rank) ------------------------------------------

def init_single_rank() -> None:
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def step_time(args, cfg: PipelineConfig, num_items: int, negatives: int) -> dict:
    import gc

    from mtrec_dist.models.reward_model import QRIQLModel
    from mtrec_dist.training.sharding import shard_model

    init_single_rank()
    rcfg = dataclasses.replace(cfg.reward, num_negatives=negatives)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = QRIQLModel(num_items, cfg.model, rcfg, args.state_len, device=torch.device("meta"))
    sharded = shard_model(model, dataclasses.replace(cfg.train, num_workers=1), torch.device("cpu"), 1, 1)
    build_s = time.perf_counter() - t
    dmp, opt = sharded.dmp, sharded.optimizer
    dmp.train()
    batches = [plain.synthetic_batch(num_items, cfg.train.batch_size, args.state_len, seed=i) for i in range(4)]

    def one(i: int) -> float:
        ts = time.perf_counter()
        out = dmp(batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sharded.call_hook("update_target")
        return time.perf_counter() - ts

    warm = []
    for i in range(args.step_warmup):  # one warm-up step is enough when a step is slow (10^6 items, full catalog)
        warm.append(one(i))
        if warm[-1] > args.step_budget_s / 3:
            break
    times: list = []
    t0 = time.perf_counter()
    while len(times) < args.step_max or (time.perf_counter() - t0 < args.step_budget_s and len(times) < 10 * args.step_max):
        times.append(one(len(times)))
        if len(times) >= args.step_min and time.perf_counter() - t0 > args.step_budget_s:
            break
    res = {"items": num_items, "soft_value": f"sampled {negatives}" if negatives else "full catalog",
           "step_s_median": float(np.median(times)), "step_s_mean": float(np.mean(times)), "steps": len(times),
           "warmup_s": [round(w, 3) for w in warm], "build_s": round(build_s, 2), "load_avg_1m": load1()}
    del dmp, opt, sharded, model
    gc.collect()
    return res


# ---- main ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work", default="/tmp/mtrec-bench-train", help="scratch directory (data cached for reuse)")
    ap.add_argument("--users", type=int, default=12000, help="simulated users")
    ap.add_argument("--items", type=int, default=20000, help="simulated catalog for (a)/(b)")
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--state-len", type=int, default=10)
    ap.add_argument("--dim", type=int, default=32, help="embedding dim")
    ap.add_argument("--layers", type=int, default=1, help="SASRec encoder layers")
    ap.add_argument("--quantiles", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=256, help="reward.num_negatives for (a)/(b) (0 = full catalog)")
    ap.add_argument("--batch-size", type=int, default=256, help="per worker (and of the plain run)")
    ap.add_argument("--steps", type=int, default=300, help="train.max_steps of each run in (a) and (b)")
    ap.add_argument("--report-every", type=int, default=10)
    ap.add_argument("--warmup-intervals", type=int, default=2, help="report intervals excluded as warm-up")
    ap.add_argument("--shuffle-buffer", type=int, default=4096, help="train.shuffle_buffer_rows of the Ray runs")
    ap.add_argument("--prefetch", type=int, default=2, help="train.prefetch_batches of the Ray runs")
    ap.add_argument("--workers", default="1,2", help="Ray Train worker counts for (a)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="catalog sizes for (c)")
    ap.add_argument("--step-negatives", type=int, default=256, help="sampled soft value in (c)")
    ap.add_argument("--full-max", type=int, default=1_000_000, help="largest catalog for the full-catalog soft value in (c)")
    ap.add_argument("--step-warmup", type=int, default=2)
    ap.add_argument("--step-min", type=int, default=3)
    ap.add_argument("--step-max", type=int, default=20)
    ap.add_argument("--step-budget-s", type=float, default=15.0, help="time per (c) configuration after warm-up")
    ap.add_argument("--skip-ray", action="store_true", help="skip (a)")
    ap.add_argument("--skip-plain", action="store_true", help="skip (b)")
    ap.add_argument("--skip-steps", action="store_true", help="skip (c)")
    args = ap.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    result: dict = {"machine": {"cpus": os.cpu_count(), "ray_cpus": args.num_cpus, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                "load_avg_1m_start": load1(), "python": platform.python_version(), "torch": torch.__version__}}
    cfg = base_config(args)
    result["settings"] = {k: v for k, v in vars(args).items()}
    result["settings"].update(encoder="sasrec", heads=2, lr=cfg.train.lr, sparse_lr=cfg.train.sparse_lr,
                              sparse_optimizer=cfg.train.sparse_optimizer, cpus_per_worker=cfg.train.cpus_per_worker)

    if not (args.skip_ray and args.skip_plain):
        manifest = make_data(args, work)
        prepared = str(work / "prepared")
        result["data"] = {k: manifest[k] for k in ("num_transitions", "num_items", "num_users", "state_len")}
        log(f"data: {result['data']}")
        b = plain.synthetic_batch(manifest["num_items"], 64, manifest["state_len"])
        result["equivalence"] = plain.check_equivalence(manifest["num_items"], cfg.model, cfg.reward,
                                                        manifest["state_len"], b)
        log(f"plain vs QRIQLModel loss max |diff| = {result['equivalence']['max_abs_diff']:.3g}")
        runs = []
        if not args.skip_plain:
            log("(b) plain PyTorch")
            runs.append(run_plain(args, cfg, prepared, manifest))
            log(f"    {runs[-1]['samples_per_s']:.0f} samples/s")
        if not args.skip_ray:
            from mtrec_dist.runtime import init_ray

            init_ray(num_cpus=args.num_cpus, log_to_driver=False)
            for w in [int(x) for x in args.workers.split(",")]:
                log(f"(a) Ray Train, {w} worker(s)")
                runs.append(run_ray(args, cfg, prepared, work, w))
                log(f"    {runs[-1]['samples_per_s']:.0f} samples/s steady, wall {runs[-1]['wall_s']}s")
            if not args.skip_plain:  # bracket the Ray runs: the box's load drifts during a run
                log("(b) plain PyTorch, again after the Ray runs")
                runs.append(dict(run_plain(args, cfg, prepared, manifest), workers="plain (after)"))
                log(f"    {runs[-1]['samples_per_s']:.0f} samples/s")
        result["throughput"] = runs
        plains = [r["samples_per_s"] for r in runs if str(r["workers"]).startswith("plain")]
        ref = float(np.mean(plains)) if plains else None
        one = next((r for r in runs if r["workers"] == 1), None)
        ratios = {"plain_reference_samples_per_s": ref}  # mean of the plain runs before/after
        for r in runs:
            if ref is not None:
                ratios[f"{r['workers']}_vs_plain"] = round(r["samples_per_s"] / ref, 3)
            if one is not None:
                ratios[f"{r['workers']}_vs_1worker"] = round(r["samples_per_s"] / one["samples_per_s"], 3)
        result["throughput_ratios"] = ratios

    if not args.skip_steps:
        steps = []
        for n in [int(x) for x in args.sizes.split(",")]:
            for neg in (args.step_negatives, 0):
                if neg == 0 and n > args.full_max:
                    steps.append({"items": n, "soft_value": "full catalog", "skipped": f"> --full-max {args.full_max}"})
                    continue
                log(f"(c) step time: {n:,} items, {'sampled ' + str(neg) if neg else 'full catalog'}")
                steps.append(step_time(args, cfg, n, neg))
                log(f"    {steps[-1]['step_s_median'] * 1000:.1f} ms/step")
        result["step_time"] = steps
        smallest = {s["soft_value"]: s for s in steps if "step_s_median" in s and s["items"] == min(x["items"] for x in steps)}
        for s in steps:
            if "step_s_median" in s and s["soft_value"] in smallest:
                s["vs_smallest_catalog"] = round(s["step_s_median"] / smallest[s["soft_value"]]["step_s_median"], 2)
            if "step_s_median" in s and s["soft_value"] == "full catalog":
                samp = next((x for x in steps if x["items"] == s["items"] and x["soft_value"].startswith("sampled")), None)
                if samp:
                    s["vs_sampled_same_catalog"] = round(s["step_s_median"] / samp["step_s_median"], 2)
    result["machine"]["load_avg_1m_end"] = load1()
    result["total_s"] = round(time.time() - t_all, 1)

    # ---- table ----
    lines = []
    if "throughput" in result:
        lines.append(f"{'variant':<22}{'samples/s':>12}{'step ms':>10}{'wall s':>9}  ratio")
        for r in result["throughput"]:
            name = f"{r['workers']} PyTorch" if str(r["workers"]).startswith("plain") else f"Ray Train {r['workers']} worker(s)"
            ratio = result["throughput_ratios"].get(f"{r['workers']}_vs_plain", "")
            lines.append(f"{name:<22}{r['samples_per_s']:>12.0f}{r['step_time_s'] * 1000:>10.1f}{r['wall_s']:>9.1f}  {ratio}")
    if "step_time" in result:
        lines.append(f"\n{'items':>10}  {'soft value':<14}{'ms/step':>10}  vs smallest")
        for s in result["step_time"]:
            if "skipped" in s:
                lines.append(f"{s['items']:>10,}  {s['soft_value']:<14}{'skipped':>10}  ({s['skipped']})")
            else:
                lines.append(f"{s['items']:>10,}  {s['soft_value']:<14}{s['step_s_median'] * 1000:>10.1f}  {s.get('vs_smallest_catalog', '')}")
    print("\n".join(lines), file=sys.stderr)
    text = json.dumps(result, indent=2, default=float)
    (work / "bench_train.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
