"""MovieLens-1M (users 1-2999) benchmark: SASRec baseline ranking and QR-IQL reward validity on real data.

The data is NOT in the repository (GroupLens licence: no redistribution); it is read by path from
``--ratings`` (default ``/work/shared/data/ml-1m/ratings_users0001-2999.dat``, or ``$MTREC_ML1M_RATINGS``).
The script exits with a message (code 0) when the file is absent.

Steps (all on a local Ray cluster, ``--num-cpus`` CPUs):

1. ``prepare_dataset`` with format ``movielens`` (rating -> evaluation-only ``eval_rating``), ``--state-len``;
   the held-out users' rows (``eval.heldout_user_share``, mtrec_dist/data/heldout.py) are the test cases (never
   trained on);
2. (a) SASRec trained with ``train_recommender`` (guidance ``none``) on Ray Train with ``--workers`` workers,
   then ranked on the test rows: sampled protocol (target vs ``--sampled-negatives`` uniform negatives not
   in the state, ``offline.rank_test_rows``) and full ranking over the catalog -> HR@k, NDCG@k;
3. (b) the QR-IQL reward model trained with ``train_reward_model`` on the same transitions, every
   transition scored with ``score_rewards``, and reward validity (Spearman vs the withheld rating, AUC for
   rating >= 4) of ``reward_mean`` beside ``click_frequency`` (item popularity) and SASRec's score of the
   logged item (``offline.score_logged_actions``).

Prints a JSON summary and writes it to ``<work>/ml1m_summary.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ml1m.py [--epochs 2] [--state-len 30] [--layers 1] [--dim 64] ...
        [--skip-rec] [--skip-reward] [--work /tmp/mtrec-bench-ml1m]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.config import PipelineConfig, PrepareConfig  # noqa: E402

DEFAULT_RATINGS = "/work/shared/data/ml-1m/ratings_users0001-2999.dat"


def log(msg: str) -> None:
    print(f"[bench_ml1m {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def prepare(args, work: Path) -> dict:
    from mtrec_dist.data.prepare import load_manifest, prepare_dataset

    out = work / "prepared"
    key = {"ratings": os.path.abspath(args.ratings), "size": os.path.getsize(args.ratings), "state_len": args.state_len}
    stamp = work / "prepared_key.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key and (out / "manifest.json").exists():
        return load_manifest(str(out))
    t = time.time()
    m = prepare_dataset(PrepareConfig(format="movielens", state_len=args.state_len, overwrite=True, progress=False),
                        args.ratings, str(out), progress=lambda msg: None)
    log(f"prepared {m['num_transitions']:,} transitions in {time.time() - t:.1f}s")
    stamp.write_text(json.dumps(key))
    return m


def make_config(args) -> PipelineConfig:
    cfg = PipelineConfig(run_dir=str(Path(args.work) / "run"))
    cfg.model = dataclasses.replace(cfg.model, embedding_dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                                    dropout=args.dropout, encoder="sasrec")
    cfg.rec = dataclasses.replace(cfg.rec, backbone="sasrec", guidance="none", num_negatives=args.rec_negatives)
    cfg.reward = dataclasses.replace(cfg.reward, num_quantiles=args.quantiles, num_negatives=args.reward_negatives)
    cfg.train = dataclasses.replace(
        cfg.train, num_workers=args.workers, cpus_per_worker=0.5, use_gpu="false", batch_size=args.batch_size,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, sparse_lr=args.sparse_lr, report_every=50, checkpoint_every=10 ** 9,
        shuffle_buffer_rows=args.shuffle_buffer, seed=args.seed,
        score_concurrency=2, score_cpus=0.5, score_full_catalog_max=1, score_candidates=args.score_candidates,
    )
    cfg.eval = dataclasses.replace(cfg.eval, sampled_negatives=args.sampled_negatives, ks=[1, 5, 10, 20], seed=args.seed)
    cfg.validate()
    return cfg


def curve(output_dir: str, run_name: str) -> list:
    from mtrec_dist.training.loop import read_history

    out, seen = [], set()
    for e in read_history(output_dir, run_name):
        if e.get("event") == "metrics" and e["step"] not in seen:  # the final event may repeat the last interval
            seen.add(e["step"])
            out.append({k: round(e[k], 4) if isinstance(e[k], float) else e[k]
                        for k in ("step", "epoch", "loss", "samples_per_s") if k in e})
    return out


def pick(d: dict, ks=(5, 10, 20)) -> dict:
    return {k: round(v, 4) for k, v in d.items() if any(k.endswith(f"@{x}") for x in ks) or k.lower() in ("mrr", "n")}


def metric(d: dict, name: str) -> float:
    """``HR@10`` / ``hr@10`` (the key case of ranking_metrics changed once)."""
    return d.get(name, d.get(name.lower(), float("nan")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ratings", default=os.environ.get("MTREC_ML1M_RATINGS", DEFAULT_RATINGS))
    ap.add_argument("--work", default="/tmp/mtrec-bench-ml1m", help="scratch directory (prepared data cached)")
    ap.add_argument("--state-len", type=int, default=30)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512, help="per worker")
    ap.add_argument("--epochs", type=int, default=2, help="SASRec epochs")
    ap.add_argument("--max-steps", type=int, default=0, help="cap SASRec's steps (0 = all epochs)")
    ap.add_argument("--lr", type=float, default=2e-3, help="dense (Adam) learning rate")
    ap.add_argument("--sparse-lr", type=float, default=0.05, help="item table (fused row-wise Adagrad) learning rate")
    ap.add_argument("--rec-negatives", type=int, default=0, help="rec.num_negatives (0 = full softmax)")
    ap.add_argument("--shuffle-buffer", type=int, default=50_000, help="train.shuffle_buffer_rows (rows are user-ordered)")
    ap.add_argument("--sampled-negatives", type=int, default=100)
    ap.add_argument("--reward-epochs", type=int, default=1)
    ap.add_argument("--reward-max-steps", type=int, default=300, help="cap the reward model's steps (0 = all epochs)")
    ap.add_argument("--quantiles", type=int, default=16)
    ap.add_argument("--reward-negatives", type=int, default=0, help="reward.num_negatives (0 = full-catalog soft value)")
    ap.add_argument("--score-candidates", type=int, default=64,
                    help="score-rewards baseline candidates (validity uses reward_mean only; kept small for speed)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-rec", action="store_true",
                    help="skip SASRec training (the logged-item score then reuses <work>/sasrec if present)")
    ap.add_argument("--skip-reward", action="store_true")
    ap.add_argument("--no-click-model-score", action="store_true", help="skip SASRec's score of logged items")
    args = ap.parse_args()

    if not os.path.exists(args.ratings):
        print(f"bench_ml1m: {args.ratings} not found; MovieLens-1M is not redistributed with the project. "
              "Pass --ratings PATH or set MTREC_ML1M_RATINGS (see /work/shared/data/README.md). Skipped.")
        return 0

    import ray

    from mtrec_dist.evaluation import offline
    from mtrec_dist.runtime import init_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    init_ray(num_cpus=args.num_cpus, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary: dict = {"data": {"ratings": args.ratings, "note": "MovieLens-1M users 1-2999 only (487,650 ratings); "
                              "published SASRec figures use all 6,040 users"},
                     "machine": {"cpus": os.cpu_count(), "ray_cpus": args.num_cpus, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                 "load_avg_1m_start": load1(), "python": platform.python_version()},
                     "settings": vars(args)}
    manifest = prepare(args, work)
    prepared = str(work / "prepared")
    summary["data"].update({k: manifest[k] for k in ("num_transitions", "num_items", "num_users", "state_len")})
    cfg = make_config(args)
    eval_table = offline.read_eval_table(prepared)
    sasrec = None

    if not args.skip_rec:
        from mtrec_dist.evaluation.evaluate import _recommender_factory
        from mtrec_dist.training.recommender import train_recommender

        out = work / "sasrec"
        shutil.rmtree(out, ignore_errors=True)
        log(f"SASRec: {args.epochs} epoch(s), {args.workers} workers")
        t = time.time()
        sasrec = train_recommender(cfg, str(Path(prepared) / "transitions"), prepared, str(out),
                                   backbone="sasrec", guidance="none", progress=False)
        train_s = time.time() - t
        log(f"SASRec trained in {train_s:.0f}s; ranking test rows")
        t = time.time()
        factory, spec = _recommender_factory(sasrec)
        ranked = offline.rank_test_rows(factory, sasrec["checkpoint_path"], prepared, manifest["num_items"],
                                        args.sampled_negatives, cfg.eval.heldout_user_share, seed=args.seed)
        metrics = offline.ranking_metrics(ranked, eval_table, cfg.eval.ks)
        c = curve(str(out), sasrec["run_name"])
        summary["sasrec"] = {
            "train_s": round(train_s, 1), "eval_s": round(time.time() - t, 1), "train_rows": sasrec["train_rows"],
            "steps": c[-1]["step"] if c else None, "final_loss": c[-1].get("loss") if c else None,
            "samples_per_s_median": float(np.median([e["samples_per_s"] for e in c[1:]] or [np.nan])),
            f"sampled_{args.sampled_negatives}neg": pick(metrics["sampled"]), "full_ranking": pick(metrics["all"]),
            "full_ranking_satisfied_targets": pick(metrics["satisfied"]), "n_test": metrics["n_test"],
            "loss_curve": c[:: max(1, len(c) // 12)] + c[-1:] if len(c) > 1 else c, "load_avg_1m_after": load1(),
        }
        log(f"SASRec sampled HR@10 {metric(metrics['sampled'], 'HR@10'):.4f} "
            f"NDCG@10 {metric(metrics['sampled'], 'NDCG@10'):.4f}; full HR@10 {metric(metrics['all'], 'HR@10'):.4f}")

    if sasrec is None and not args.no_click_model_score:
        pointer = work / "sasrec" / "recommender.json"  # a SASRec trained by an earlier run of this script
        if pointer.exists():
            sasrec = json.loads(pointer.read_text())
            summary["sasrec_reused"] = sasrec["checkpoint_path"]

    if not args.skip_reward:
        import pyarrow.dataset as pads

        from mtrec_dist.training.reward import train_reward_model
        from mtrec_dist.training.scoring import score_rewards

        rcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=args.reward_epochs,
                                                                    max_steps=args.reward_max_steps))
        out = work / "reward"
        shutil.rmtree(out, ignore_errors=True)
        log(f"QR-IQL reward model: {args.reward_epochs} epoch(s)")
        t = time.time()
        rew = train_reward_model(rcfg, prepared, str(out), progress=False)
        train_s = time.time() - t
        log(f"reward model trained in {train_s:.0f}s; scoring every transition")
        t = time.time()
        sc = score_rewards(rcfg, rew["checkpoint_path"], prepared, str(work / "scored"), overwrite=True)
        score_s = time.time() - t
        from mtrec_dist.data.heldout import heldout_expr

        scored = pads.dataset(str(work / "scored"), format="parquet", ignore_prefixes=["_", "."]).to_table(
            columns=["row_id", "action", "reward_mean", "reward_cvar"],
            filter=heldout_expr(cfg.eval.heldout_user_share))  # validity on rows no model trained on
        row_ids = scored.column("row_id").to_numpy()
        actions = scored.column("action").to_numpy()
        scores = {"reward_mean": scored.column("reward_mean").to_numpy().astype(np.float64),
                  "reward_cvar": scored.column("reward_cvar").to_numpy().astype(np.float64),
                  "click_frequency": offline.click_frequency(prepared, actions, cfg.eval.heldout_user_share)}
        click_s = None
        if sasrec is not None and not args.no_click_model_score:
            from mtrec_dist.evaluation.evaluate import _recommender_factory

            t2 = time.time()
            factory, _ = _recommender_factory(sasrec)
            base = offline.score_logged_actions(factory, sasrec["checkpoint_path"], prepared,
                                                heldout_share=cfg.eval.heldout_user_share)
            by_row = dict(zip(base.column("row_id").to_pylist(), base.column("score").to_pylist()))
            scores["sasrec_score"] = np.array([by_row.get(r, np.nan) for r in row_ids.tolist()], np.float64)
            click_s = round(time.time() - t2, 1)
        validity = offline.reward_validity(scores, eval_table, row_ids)
        c = curve(str(out), rew["run_name"])
        summary["reward"] = {
            "train_s": round(train_s, 1), "score_s": round(score_s, 1), "rows_scored": sc["rows"],
            "sasrec_logged_score_s": click_s, "steps": c[-1]["step"] if c else None,
            "samples_per_s_median": float(np.median([e["samples_per_s"] for e in c[1:]] or [np.nan])),
            "validity": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in validity.items()},
            "loss_curve": c[:: max(1, len(c) // 12)] + c[-1:] if len(c) > 1 else c, "load_avg_1m_after": load1(),
        }
        log("validity: " + ", ".join(f"{k} {v:+.4f}" for k, v in validity.items() if k.endswith(("_spearman", "_auc"))))

    summary["machine"]["load_avg_1m_end"] = load1()
    summary["total_s"] = round(time.time() - t_all, 1)
    text = json.dumps(summary, indent=2, default=float)
    (work / "ml1m_summary.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
