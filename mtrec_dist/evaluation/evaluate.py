"""`mtrec evaluate`: everything the report shows, measured from trained artefacts of one run.

* the reward model: validity (Spearman / AUC of the learned mean reward against the withheld
  satisfaction of every logged event of the held-out users, beside the click-trained recommender's score and
  the item's click frequency), quantile fan per item group, learned-vs-truth scatter, training curve;
* each recommender: offline ranking of the held-out users' rows (full catalog and sampled 100-negative, all
  and satisfied targets; ``eval.heldout_user_share``, :mod:`mtrec_dist.data.heldout`),
  training curve, and, on simulator data, online results in the simulator with paired gains over the
  click-trained model of the same backbone.

Inputs are paths (prepared dataset, scored transitions, the reward and recommender output directories),
so the command can evaluate any finished run; nothing here trains.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.config import PipelineConfig
from mtrec_dist.data.heldout import heldout_expr, ranked_share
from mtrec_dist.evaluation import offline

SCATTER_POINTS = 3000
VALIDITY_MAX_ROWS = 2_000_000  # reward validity reads at most this many scored rows (driver memory)


def _read(path: str, columns: List[str], max_rows: Optional[int] = None, where=None) -> pa.Table:
    from mtrec_dist.data.readers import resolve_filesystem

    fs, root = resolve_filesystem(path)
    ds = pads.dataset(root, filesystem=fs, format="parquet", ignore_prefixes=["_", "."])
    return ds.head(max_rows, columns=columns, filter=where) if max_rows else ds.to_table(columns=columns, filter=where)


def load_item_truth(sim_dir: str):
    """The simulator's hidden item table, or None where the run has no simulator output."""
    from mtrec_dist.data.simulator import ItemTruth

    path = Path(sim_dir) / "truth" / "items.parquet"
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    return ItemTruth.from_table(pq.read_table(path))


def item_groups(prepared_dir: str, actions: np.ndarray, item_truth=None) -> Dict[str, np.ndarray]:
    """Boolean masks over ``actions`` (item indices): simulator groups (clickbait / compulsive / high quality /
    other) where the hidden truth is known, else popularity terciles of the logged items.  Both kinds of bad
    item are shown: a reward can tell one and not the other (bench/RESULTS.md, session 22)."""
    from mtrec_dist.data.prepare import load_vocab

    vocab = load_vocab(prepared_dir)
    if item_truth is not None:
        raw = np.concatenate([[-1], vocab.item_raw])[actions]
        ok = (raw >= 0) & (raw < item_truth.num_items)
        bait, compulsive = np.zeros(actions.size, bool), np.zeros(actions.size, bool)
        qual = np.full(actions.size, np.nan)
        bait[ok] = item_truth.is_clickbait[raw[ok]]
        compulsive[ok] = item_truth.is_compulsive[raw[ok]] & ~bait[ok]
        qual[ok] = item_truth.quality[raw[ok]]
        plain = ~item_truth.is_clickbait & ~item_truth.is_compulsive
        hi = np.nanquantile(item_truth.quality[plain], 0.75)
        good = ~bait & ~compulsive & (np.nan_to_num(qual, nan=-np.inf) >= hi)
        return {"clickbait": bait, "compulsive": compulsive, "high quality": good,
                "other": ~bait & ~compulsive & ~good}
    counts = np.concatenate([[0], np.asarray(vocab.item_count, np.float64)])[actions]
    lo, hi = np.quantile(counts, [1 / 3, 2 / 3])
    return {"popular (top third)": counts > hi, "mid": (counts > lo) & (counts <= hi), "tail": counts <= lo}


def reward_section(cfg: PipelineConfig, prepared_dir: str, scored_dir: str, reward_dir: str, eval_table: pa.Table,
                   baseline_scores: Optional[pa.Table] = None, item_truth=None) -> Dict[str, Any]:
    """Validity, groups, scatter and training curve of the mental reward model, on the held-out users' rows."""
    from mtrec_dist.training.loop import read_history

    scored = _read(scored_dir, ["row_id", "action", "reward_mean", "reward_cvar", "reward_q"], VALIDITY_MAX_ROWS,
                   where=heldout_expr(cfg.eval.heldout_user_share))
    row_ids = scored.column("row_id").to_numpy()
    actions = scored.column("action").to_numpy()
    scores = {"reward_mean": scored.column("reward_mean").to_numpy().astype(np.float64),
              "reward_cvar": scored.column("reward_cvar").to_numpy().astype(np.float64),
              "click_frequency": offline.click_frequency(prepared_dir, actions, cfg.eval.heldout_user_share)}
    if baseline_scores is not None:
        by_row = dict(zip(baseline_scores.column("row_id").to_pylist(), baseline_scores.column("score").to_pylist()))
        scores["click_model_score"] = np.array([by_row.get(r, np.nan) for r in row_ids.tolist()], np.float64)
    validity = offline.reward_validity(scores, eval_table, row_ids)

    q = np.stack(scored.column("reward_q").to_numpy(zero_copy_only=False)).astype(np.float64)
    n_q = q.shape[1]
    taus = ((np.arange(n_q) + 0.5) / n_q).tolist()
    groups = {}
    for name, mask in item_groups(prepared_dir, actions, item_truth).items():
        if mask.any():
            groups[name] = {"taus": taus, "quantiles": q[mask].mean(0).tolist(), "n": int(mask.sum()),
                            "spread": float((q[mask, -1] - q[mask, 0]).mean())}

    _, graded, signal = offline.satisfied_labels(eval_table)
    truth = graded[offline.eval_rows(eval_table, row_ids)]
    rng = np.random.default_rng(cfg.eval.seed)
    pick = rng.choice(len(row_ids), size=min(SCATTER_POINTS, len(row_ids)), replace=False)
    history = read_history(reward_dir)
    return {
        "validity": validity,
        "groups": groups,
        "scatter": {"learned": scores["reward_mean"][pick].tolist(), "truth": truth[pick].tolist(),
                    "truth_label": signal},
        "curve": [h for h in history if "loss" in h],
    }


def _recommender_factory(summary: Dict[str, Any]):
    """(inference factory, model_spec) of a trained recommender, from its checkpoint's meta (no weights)."""
    from mtrec_dist.training.checkpoint import read_checkpoint_meta
    from mtrec_dist.training.recommender import recommender_factory

    spec = read_checkpoint_meta(summary["checkpoint_path"])["model_spec"]
    return recommender_factory(spec, for_inference=True), spec


def ranked_users(cfg: PipelineConfig, prepared_dir: str, heldout_rows: int) -> Tuple[float, int]:
    """(share, rows) of the held-out users whose rows offline ranking measures: all of them, or under
    ``eval.max_ranked_rows`` a subset by the same hash (:func:`~mtrec_dist.data.heldout.ranked_share`)."""
    from mtrec_dist.data.pipeline import count_transitions

    share = cfg.eval.heldout_user_share
    subset = ranked_share(share, heldout_rows, cfg.eval.max_ranked_rows)
    rows = heldout_rows if subset == share else count_transitions(prepared_dir, where=heldout_expr(subset))
    if rows == 0:  # the subset's users have no rows (a log of very few, very active users): rank them all
        return share, heldout_rows
    return subset, rows


def offline_section(cfg: PipelineConfig, prepared_dir: str, summary: Dict[str, Any], eval_table: pa.Table,
                    num_items: int, ranked_rows: int, share: float) -> Tuple[Dict[str, Any], pa.Table]:
    """(ranking metrics, the ranked rows) of one recommender on the ``ranked_rows`` rows of the users held out
    at ``share`` (the count decides where they are ranked: :func:`~mtrec_dist.training.scoring.score_runner`)."""
    from mtrec_dist.training.scoring import score_runner

    factory, spec = _recommender_factory(summary)
    runner = score_runner(cfg.train, spec, ranked_rows)
    ranked = offline.rank_test_rows(factory, summary["checkpoint_path"], prepared_dir, num_items,
                                    cfg.eval.sampled_negatives, share, seed=cfg.eval.seed,
                                    sharded_on=cfg.train if runner == "sharded" else None,
                                    malloc_trim_mb=cfg.train.malloc_trim_mb, in_process=runner == "local")
    return offline.ranking_metrics(ranked, eval_table, cfg.eval.ks), ranked


# what headline prints for each guided model: (targets, metric, k, label)
OFFLINE_CHANGES = (("all", "HR", 10, "HR@10"), ("satisfied", "NDCG", 10, "NDCG@10 satisfied"))


def offline_change_ci(guided: pa.Table, click_model: pa.Table, eval_table: pa.Table) -> Dict[str, list]:
    """``{label: [change, lo, hi]}`` for :data:`OFFLINE_CHANGES`: the relative change of a guided model's metric
    against the click-trained model's on the same ranked rows, with a 95% bootstrap interval over held-out users
    (:func:`~mtrec_dist.evaluation.metrics.paired_relative_change_ci95`).  One model per arm: the interval covers
    the sampling of evaluation users given the two models, not training randomness (the ablation's does)."""
    from mtrec_dist.evaluation.metrics import hits_at_k, ndcg_gains_at_k, paired_relative_change_ci95

    g, c = guided.sort_by("row_id"), click_model.sort_by("row_id")
    rows = g.column("row_id").to_numpy()
    if not np.array_equal(rows, c.column("row_id").to_numpy()):  # both rank the held-out rows: else a bug
        raise ValueError(f"the guided and click-trained models were ranked on different rows ({g.num_rows} and "
                         f"{c.num_rows}); their offline change would compare different targets")
    at = offline.eval_rows(eval_table, rows)
    users = eval_table.column("user_idx").to_numpy()[at]
    targets = {"all": np.ones(rows.size, bool), "satisfied": offline.satisfied_labels(eval_table)[0][at]}
    per_row = {"HR": hits_at_k, "NDCG": ndcg_gains_at_k}
    rank_g, rank_c = g.column("rank_full").to_numpy(), c.column("rank_full").to_numpy()
    out = {}
    for which, metric, k, label in OFFLINE_CHANGES:
        keep = targets[which]
        if keep.any():
            out[label] = list(paired_relative_change_ci95(per_row[metric](rank_g[keep], k),
                                                          per_row[metric](rank_c[keep], k), users[keep]))
    return out


def online_section(cfg: PipelineConfig, prepared_dir: str, summaries: List[Dict[str, Any]], item_truth
                   ) -> Dict[str, Dict[str, Any]]:
    """Each recommender acts in the simulator; per backbone the click-trained model comes first so that
    ``paired_gain`` is the guided model's gain over it on the same users and seeds."""
    from mtrec_dist.data.prepare import load_vocab
    from mtrec_dist.evaluation.online import catalog_score_fn, evaluate_online, recommender_policy, vocab_maps
    from mtrec_dist.training.checkpoint import load_unsharded_model

    vocab = load_vocab(prepared_dir)
    idx = np.arange(1, len(vocab.item_raw) + 1)
    raw_to_idx, idx_to_raw = vocab_maps(vocab.item_raw, idx, item_truth.num_items)
    sim_cfg = dataclasses.replace(cfg.simulator, max_session_len=cfg.eval.online_session_len)
    seeds = [cfg.eval.seed * 1000 + 7919 * (i + 1) for i in range(cfg.eval.online_seeds)]
    out: Dict[str, Dict[str, Any]] = {}
    by_backbone: Dict[str, List[Dict[str, Any]]] = {}
    for s in summaries:
        by_backbone.setdefault(s["backbone"], []).append(s)
    for backbone, group in by_backbone.items():
        group = sorted(group, key=lambda s: s["guidance"] != CLICK_TRAINED)  # the click-trained model first
        policies = {}
        for s in group:
            factory, spec = _recommender_factory(s)
            model = load_unsharded_model(factory, s["checkpoint_path"])
            policies[f"{backbone}/{s['guidance']}"] = recommender_policy(
                catalog_score_fn(model, spec["num_items"]), raw_to_idx, idx_to_raw, spec["state_len"],
                cfg.simulator.slate_size)
        out.update(evaluate_online(policies, sim_cfg, item_truth, seeds, cfg.eval.online_users))
    return out


def check_trained_share(cfg: PipelineConfig, reward_dir: str, rec_summaries: List[Dict[str, Any]]) -> None:
    """Raise where a model was trained with another ``eval.heldout_user_share`` than this evaluation's (or
    before the setting existed): a larger share here would measure on rows it trained on."""
    from mtrec_dist.training.reward import LATEST_POINTER

    pointer = Path(reward_dir) / LATEST_POINTER
    trained = [(f"{s['backbone']}/{s['guidance']}", s.get("heldout_user_share")) for s in rec_summaries]
    if pointer.exists():
        trained.append(("the reward model", json.loads(pointer.read_text()).get("heldout_user_share")))
    share = cfg.eval.heldout_user_share
    wrong = [f"{name} ({'no share recorded' if got is None else got})" for name, got in trained if got != share]
    if wrong and share > 0:
        raise ValueError(f"eval.heldout_user_share is {share}, but these models were trained with another share: "
                         f"{', '.join(wrong)}; evaluate with the share they were trained with, or train them again")


def evaluate_run(cfg: PipelineConfig, prepared_dir: str, scored_dir: str, reward_dir: str,
                 rec_summaries: List[Dict[str, Any]], sim_dir: Optional[str] = None,
                 progress=print) -> Dict[str, Any]:
    """The ``results`` dict of :func:`mtrec_dist.evaluation.report.write_report` for one run."""
    from mtrec_dist.data.pipeline import count_transitions
    from mtrec_dist.data.prepare import load_manifest
    from mtrec_dist.training.loop import read_history
    from mtrec_dist.training.scoring import score_runner

    check_trained_share(cfg, reward_dir, rec_summaries)
    manifest = load_manifest(prepared_dir)
    num_items = int(manifest["num_items"])
    item_truth = load_item_truth(sim_dir) if sim_dir else None
    eval_table = offline.read_eval_table(prepared_dir)
    share = cfg.eval.heldout_user_share
    notes = []
    heldout_rows = count_transitions(prepared_dir, where=heldout_expr(share)) if share > 0 else 0
    measured = heldout_rows > 0
    if not measured:
        notes.append(f"No held-out users' rows (eval.heldout_user_share {share}): every user was trained on, so "
                     "reward validity and offline ranking are not measured.")
    rank_share, ranked_rows = ranked_users(cfg, prepared_dir, heldout_rows)
    if rank_share != share:
        notes.append(f"Offline ranking measures {ranked_rows:,} of the {heldout_rows:,} held-out rows: those of the "
                     f"users held out at share {rank_share:g} under the same hash (eval.max_ranked_rows "
                     f"{cfg.eval.max_ranked_rows:,}).")

    baseline = next((s for s in rec_summaries if s["guidance"] == CLICK_TRAINED), None)
    baseline_scores = None
    if baseline is not None and measured:
        factory, spec = _recommender_factory(baseline)
        baseline_scores = offline.score_logged_actions(  # sharded has no path here: actors, as before
            factory, baseline["checkpoint_path"], prepared_dir, malloc_trim_mb=cfg.train.malloc_trim_mb,
            in_process=score_runner(cfg.train, spec, heldout_rows) == "local", heldout_share=share)
    if measured:
        progress("[evaluate] reward model on held-out users' rows: validity, quantile groups")
        reward = reward_section(cfg, prepared_dir, scored_dir, reward_dir, eval_table, baseline_scores, item_truth)
    else:
        reward = {"curve": [h for h in read_history(reward_dir) if "loss" in h]}

    recs, ranked = [], {}
    if rec_summaries and measured:  # one line for all of them: each takes seconds
        progress("[evaluate] offline ranking of held-out users' rows: "
                 + ", ".join(f"{s['backbone']}/{s['guidance']}" for s in rec_summaries))
    for s in rec_summaries:
        off = {}
        if measured:
            off, ranked[(s["backbone"], s["guidance"])] = offline_section(cfg, prepared_dir, s, eval_table, num_items,
                                                                          ranked_rows, rank_share)
        recs.append({"backbone": s["backbone"], "guidance": s["guidance"], "checkpoint": s["checkpoint_path"],
                     "curve": [h for h in read_history(s["output_dir"]) if "loss" in h], "offline": off})
    for r in recs:  # each guided model's offline change against its backbone's click model, with a CI
        base = ranked.get((r["backbone"], CLICK_TRAINED))
        if r["guidance"] != CLICK_TRAINED and base is not None and (r["backbone"], r["guidance"]) in ranked:
            r["offline_change"] = offline_change_ci(ranked[(r["backbone"], r["guidance"])], base, eval_table)
    if item_truth is not None and rec_summaries:
        progress(f"[evaluate] online: {len(rec_summaries)} recommenders x {cfg.eval.online_seeds} seeds x "
                 f"{cfg.eval.online_users} simulated users")
        online = online_section(cfg, prepared_dir, rec_summaries, item_truth)
        for r in recs:
            r["online"] = online.get(f"{r['backbone']}/{r['guidance']}")
    else:
        notes.append("Online evaluation needs the simulator's hidden item truth; this run's logs have none.")
    data = {k: v for k, v in manifest.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return {"title": f"MTRec run: {os.path.abspath(cfg.run_dir)}", "config": cfg.to_dict(), "data": data,
            "reward": reward, "recommenders": recs, "notes": notes}


def headline(results: Dict[str, Any]) -> List[str]:
    """Short human-readable lines: reward validity, each model's offline accuracy and online satisfaction,
    and each guided model's changes against the click-trained model of its backbone (guidance ``none``):
    the online gain, and the relative change of HR@10 and of NDCG@10 on satisfied targets, so the price
    guidance pays offline is printed beside what it buys."""
    lines = []
    v = results.get("reward", {}).get("validity", {})
    if v:
        parts = [f"{name.removesuffix('_spearman')} {v[name]:+.3f}" for name in v if name.endswith("_spearman")]
        lines.append(f"reward validity (Spearman vs {v.get('signal')}): " + ", ".join(parts))
    recs = results.get("recommenders", [])
    click_model_offline = {r["backbone"]: r.get("offline", {}) for r in recs if r["guidance"] == CLICK_TRAINED}
    for r in recs:
        off = r.get("offline", {})
        line = f"{r['backbone']}/{r['guidance']}:"
        if off:  # nothing offline where no user was held out (eval.heldout_user_share 0)
            line += (f" HR@10 {_metric(off, 'all', 'HR@10'):.4f} (satisfied {_metric(off, 'satisfied', 'HR@10'):.4f}, "
                     f"100-neg {_metric(off, 'sampled', 'HR@10'):.4f})")
        on = r.get("online") or {}
        if "satisfaction_per_session" in on:
            m = on["satisfaction_per_session"]
            line += f"{';' if off else ''} satisfaction/session {m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"
            g = (on.get("paired_gain") or {}).get("satisfaction_per_session")
            if g:
                line += f"; gain vs {g['vs']} {g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
        if off and r["guidance"] != CLICK_TRAINED and click_model_offline.get(r["backbone"]):
            line += "; " + offline_change(off, click_model_offline[r["backbone"]], f"{r['backbone']}/{CLICK_TRAINED}",
                                          r.get("offline_change"))
        lines.append(line)
    if results.get("ablation"):
        lines.append("ablation (same SASRec guided by each reward; held-out users; mean ±95% CI):")
        lines += results["ablation"]["table"].splitlines()
    return lines


def _metric(offline_metrics: Dict[str, Any], targets: str, name: str) -> float:
    """A metric the run did not measure reads as NaN, so the line still prints."""
    return offline_metrics.get(targets, {}).get(name, float("nan"))


def offline_change(guided: Dict[str, Any], click_model: Dict[str, Any], click_model_name: str,
                   cis: Optional[Dict[str, list]] = None) -> str:
    """``offline vs sasrec/none: HR@10 -24%, NDCG@10 satisfied -6%``: relative changes of a guided model's
    offline metrics against the click-trained model's (``n/a`` where the click model's value is 0 or
    missing); each followed by its 95% interval ``[-9%, -3%]`` where ``cis`` (:func:`offline_change_ci`) has one."""
    parts = []
    for targets, metric, k, label in OFFLINE_CHANGES:
        new, base = _metric(guided, targets, f"{metric}@{k}"), _metric(click_model, targets, f"{metric}@{k}")
        ok = np.isfinite(new) and np.isfinite(base) and base > 0
        rel = _percent(new / base - 1.0) if ok else None
        part = f"{label} {rel}" if rel is not None else f"{label} n/a"
        ci = (cis or {}).get(label)
        if rel is not None and ci and np.isfinite(ci[1:]).all():
            part += f" [{_percent(ci[1])}, {_percent(ci[2])}]"
        parts.append(part)
    return f"offline vs {click_model_name}: " + ", ".join(parts)


def _percent(change: float) -> str:
    """``-24%``: a relative change rounded to a whole percent (a change under 0.5% prints +0%, never -0%)."""
    return f"{round(change * 100):+d}%"


def write_json(obj: Any, path: str) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=float))
