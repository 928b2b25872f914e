"""Offline evaluation of trained recommenders and of the mental reward (docs/method.md "Metrics").

* **Ranking** on the held-out users' rows (``eval.heldout_user_share``, :mod:`mtrec_dist.data.heldout`):
  every transition of a user no model trained on is a test case.  (Not each user's last transition: where
  sessions end after unsatisfying items, the last events are a biased sample, bench/RESULTS.md session 24.)
  Full ranking over the whole catalog (padding excluded) gives HR@k / NDCG@k; the
  sampled protocol ranks the target among ``sampled_negatives`` items drawn uniformly from the items the
  user has not interacted with in the state (as in SASRec's evaluation).  Both on all targets
  ("engaged") and on satisfied targets only (rating >= 4, purchase, like, long view, or simulator
  satisfaction above its median over all logged events).
* **Reward validity**: Spearman and AUC of a score against the withheld satisfaction signal of every
  held-out user's logged event: for the learned mean mental reward and, side by side, for the click-trained
  model's
  score of the same events and the item's click frequency.

Scoring runs as Ray Data ``map_batches`` over actors that each load the trained model once (the model is
exported from its sharded DCP checkpoint into a plain module); ranking a catalog too big for one process runs
in a worker group with the table sharded as in training instead (:mod:`.sharded_ranking`), and a small test
set is ranked in the driver process itself (no actor to start).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from mtrec_dist.data.heldout import heldout_expr
from mtrec_dist.evaluation.metrics import ranking_report, roc_auc, spearman

ModelFactory = Callable[[torch.device], torch.nn.Module]


class Ranker:
    """Rank of each row's action under a loaded recommender (full catalog and sampled): a numpy batch in
    (``row_id``, ``user_idx``, ``state_items``, ``state_feedback``, ``action``), ranks out.  ``histories``:
    user_idx -> every item the user engaged with (the sampled protocol never draws those as negatives)."""

    def __init__(self, model: torch.nn.Module, num_items: int, sampled_negatives: int, seed: int,
                 histories: Optional[Dict[int, np.ndarray]] = None, chunk: int = 8192):
        self.model = model
        self.histories = histories or {}
        self.num_items = num_items
        self.sampled_negatives = min(sampled_negatives, max(num_items - 1, 1))
        self.seed = seed
        self.chunk = chunk

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        state_items = torch.as_tensor(np.stack(batch["state_items"]), dtype=torch.long)
        state_fb = torch.as_tensor(np.stack(batch["state_feedback"]), dtype=torch.float32)
        action = torch.tensor(np.asarray(batch["action"]), dtype=torch.long)  # a copy: batches may be read-only
        with torch.no_grad():
            parts = []
            for lo in range(1, self.num_items + 1, self.chunk):
                ids = torch.arange(lo, min(lo + self.chunk, self.num_items + 1))
                parts.append(self.model.score_catalog(state_items, state_fb, ids))
            scores = torch.cat(parts, dim=1)  # [B, num_items], column j is item j + 1
        target_score = scores.gather(1, (action - 1).unsqueeze(1)).squeeze(1)
        # Pessimistic on ties: every other item scoring >= the target ranks above it.
        rank_full = (scores >= target_score.unsqueeze(1)).sum(1) - 1
        users = batch["user_idx"] if "user_idx" in batch else np.full(len(batch["row_id"]), -1)
        neg = self._negatives(batch["row_id"], state_items.numpy(), action.numpy(), users)
        neg_scores = scores.gather(1, torch.as_tensor(neg - 1))
        rank_sampled = (neg_scores >= target_score.unsqueeze(1)).sum(1)
        return {"row_id": np.asarray(batch["row_id"]), "rank_full": rank_full.numpy(),
                "rank_sampled": rank_sampled.numpy(), "score_target": target_score.numpy()}

    def _negatives(self, row_ids: np.ndarray, state_items: np.ndarray, action: np.ndarray,
                   users: np.ndarray) -> np.ndarray:
        return sampled_negatives(row_ids, state_items, action, users, self.sampled_negatives, self.num_items,
                                 self.seed, self.histories)


class RankingScorer(Ranker):
    """Ray Data callable: each ranking actor loads the whole model once, unsharded."""

    def __init__(self, model_factory: ModelFactory, checkpoint_path: str, num_items: int,
                 sampled_negatives: int, seed: int, chunk: int = 8192, histories_ref=None, malloc_trim_mb: int = 0):
        import ray

        from mtrec_dist.training.checkpoint import load_for_inference_actor

        model = load_for_inference_actor(model_factory, checkpoint_path, malloc_trim_mb=malloc_trim_mb)
        histories = ray.get(histories_ref[0]) if histories_ref is not None else None
        super().__init__(model, num_items, sampled_negatives, seed, histories, chunk)


def sampled_negatives(row_ids: np.ndarray, state_items: np.ndarray, action: np.ndarray, users: np.ndarray,
                      n: int, num_items: int, seed: int, histories: Dict[int, np.ndarray]) -> np.ndarray:
    """``n`` items per row, uniform over items the user never engaged with (SASRec's protocol: not in the
    user's history, not the target; the state where no history is given).

    Deterministic per row (seeded by row id), so every model is ranked against the same negatives.
    """
    out = np.empty((len(row_ids), n), dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    for r, rid in enumerate(row_ids):
        rng = np.random.default_rng([seed, int(rid)])
        banned = set(state_items[r].tolist()) | {int(action[r]), 0}
        banned.update(histories.get(int(users[r]), empty).tolist())
        picked: list[int] = []
        while len(picked) < n:
            cand = rng.integers(1, num_items + 1, size=2 * n)
            picked.extend(int(c) for c in cand if c not in banned)
            if len(banned) >= num_items:  # tiny catalogs: allow repeats of the allowed items
                break
        if len(picked) < n:
            picked = (picked or [1]) * n
        out[r] = picked[:n]
    return out


def target_scores(model: torch.nn.Module, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``row_id, score``: the recommender's score of each row's logged action (``score_items`` on one
    candidate), for a numpy batch of ``row_id``, ``state_items``, ``state_feedback``, ``action``."""
    state_items = torch.as_tensor(np.stack(batch["state_items"]), dtype=torch.long)
    state_fb = torch.as_tensor(np.stack(batch["state_feedback"]), dtype=torch.float32)
    action = torch.tensor(np.asarray(batch["action"]), dtype=torch.long)  # a copy: batches may be read-only
    with torch.no_grad():
        score = model.score_items(state_items, state_fb, action.view(-1, 1))[:, 0]
    return {"row_id": np.asarray(batch["row_id"]), "score": score.numpy()}


class TargetScorer:
    """Ray Data callable: :func:`target_scores` under a model each actor loads.

    Used for reward validity: how well does the click-trained recommender's own score of a logged event
    track the withheld satisfaction, next to the mental reward.
    """

    def __init__(self, model_factory: ModelFactory, checkpoint_path: str, malloc_trim_mb: int = 0):
        from mtrec_dist.training.checkpoint import load_for_inference_actor

        self.model = load_for_inference_actor(model_factory, checkpoint_path, malloc_trim_mb=malloc_trim_mb)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return target_scores(self.model, batch)


TARGET_COLUMNS = ["row_id", "state_items", "state_feedback", "action"]
TARGET_BATCH_ROWS = 1024
TARGET_SCHEMA = pa.schema([("row_id", pa.int64()), ("score", pa.float32())])


def score_logged_actions(model_factory: ModelFactory, checkpoint_path: str, prepared_dir: str,
                         concurrency: int = 2, malloc_trim_mb: int = 0, in_process: bool = False,
                         heldout_share: Optional[float] = None) -> pa.Table:
    """``row_id, score`` for every prepared transition (only the held-out users' rows, given
    ``heldout_share``) under a trained recommender: on Ray Data actors (each keeps ``malloc_trim_mb`` of freed
    memory: :func:`~mtrec_dist.runtime.retain_freed_memory`), or with ``in_process`` (a small set) in this
    process with ``concurrency`` torch threads (restored after)."""
    if in_process:
        from mtrec_dist.data.pipeline import read_transitions_table
        from mtrec_dist.training.checkpoint import load_unsharded_model

        where = None if heldout_share is None else heldout_expr(heldout_share)
        return _batches_in_process(read_transitions_table(prepared_dir, columns=TARGET_COLUMNS + ["user_idx"],
                                                          where=where).select(TARGET_COLUMNS), TARGET_BATCH_ROWS,
                                   concurrency, lambda: load_unsharded_model(model_factory, checkpoint_path),
                                   target_scores, TARGET_SCHEMA)
    from ray.data import ActorPoolStrategy

    from mtrec_dist.data.pipeline import read_transitions

    ds = read_transitions(prepared_dir, columns=TARGET_COLUMNS + ["user_idx"])
    if heldout_share is not None:
        ds = ds.filter(expr=heldout_expr(heldout_share, "ray"))
    ds = ds.select_columns(TARGET_COLUMNS)
    ds = ds.map_batches(TargetScorer, fn_constructor_args=(model_factory, checkpoint_path, malloc_trim_mb),
                        batch_size=TARGET_BATCH_ROWS,
                        batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=concurrency),
                        num_cpus=0.5)
    return _collected(ds, TARGET_SCHEMA)


def _collected(ds, schema: pa.Schema) -> pa.Table:
    """A Ray dataset's rows in the driver, as ``schema`` (an empty one too)."""
    table = pa.Table.from_pandas(ds.to_pandas(), preserve_index=False)
    return table.select(schema.names).cast(schema) if table.num_rows else schema.empty_table()


def _batches_in_process(table: pa.Table, batch_rows: int, threads: int, load: Callable[[], Any],
                        score_batch: Callable[[Any, Dict[str, np.ndarray]], Dict[str, np.ndarray]],
                        schema: pa.Schema) -> pa.Table:
    """``score_batch(load(), batch)`` over ``table``, ``batch_rows`` rows at a time as numpy batches (states
    collated to [n, L] arrays), in this process with ``threads`` torch threads (restored after); the outputs
    as one table of ``schema``.  The in-process twin of the actors' ``map_batches``."""
    from mtrec_dist.data.pipeline import collate_transitions
    from mtrec_dist.runtime import torch_threads

    with torch_threads(threads):
        scorer = load()
        parts = []
        for start in range(0, table.num_rows, batch_rows):
            part = table.slice(start, batch_rows)
            states = collate_transitions(part.select(["state_items", "state_feedback"]))
            batch = {name: (states[name].numpy() if name in states else part.column(name).to_numpy())
                     for name in part.column_names}
            parts.append(pa.table(score_batch(scorer, batch)).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def satisfied_labels(eval_table: pa.Table) -> tuple[np.ndarray, np.ndarray, str]:
    """(satisfied bool [n], graded satisfaction [n], name of the signal) from an ``eval/`` table.

    Satisfied = rating >= 4, or purchase, or like, or long view, or (simulator) true satisfaction above its
    median; the graded signal used for Spearman is true satisfaction, else rating, else the satisfied label.
    """
    n = eval_table.num_rows
    sat = np.zeros(n, dtype=bool)
    graded, name = None, None

    def col(c):
        if c not in eval_table.column_names:
            return None
        a = eval_table.column(c)
        if a.null_count == n:
            return None
        return a.to_numpy(zero_copy_only=False).astype(np.float64)

    ts = col("eval_true_satisfaction")
    if ts is not None:
        sat |= np.nan_to_num(ts, nan=-np.inf) > np.nanmedian(ts)
        graded, name = ts, "true satisfaction"
    rating = col("eval_rating")
    if rating is not None:
        sat |= np.nan_to_num(rating) >= 4
        if graded is None:
            graded, name = rating, "rating"
    for c in ("eval_purchase", "eval_like", "eval_long_view"):
        v = col(c)
        if v is not None:
            sat |= np.nan_to_num(v) > 0
    if graded is None:
        graded, name = sat.astype(np.float64), "satisfied label"
    return sat, graded, name


RANKED_COLUMNS = ["row_id", "user_idx", "state_items", "state_feedback", "action"]
RANK_BATCH_ROWS = 256  # test rows ranked per call (each scores the whole catalog for them)
# what ranking returns per test row
RANKS_SCHEMA = pa.schema([("row_id", pa.int64()), ("rank_full", pa.int64()), ("rank_sampled", pa.int64()),
                          ("score_target", pa.float32())])


def rank_test_rows(model_factory: ModelFactory, checkpoint_path: str, prepared_dir: str, num_items: int,
                   sampled_negatives: int, heldout_share: float, seed: int = 0, concurrency: int = 2,
                   sharded_on: Optional[Any] = None, malloc_trim_mb: int = 0,
                   in_process: bool = False) -> pa.Table:
    """Rank every test transition (the rows of the users ``heldout_share`` holds out,
    :mod:`mtrec_dist.data.heldout`) with the trained recommender: on Ray Data actors that
    each load the whole model; or, given ``sharded_on`` (a TrainConfig: its workers, devices and timeouts),
    in a worker group with the item table sharded as in training (:mod:`.sharded_ranking`); or, with
    ``in_process`` (a small test set), in this process with ``concurrency`` torch threads.  Each ranking actor
    keeps ``malloc_trim_mb`` of freed memory (:func:`~mtrec_dist.runtime.retain_freed_memory`)."""
    if in_process:
        return _rank_in_process(model_factory, checkpoint_path, prepared_dir, num_items, sampled_negatives, seed,
                                concurrency, heldout_share)
    from mtrec_dist.data.pipeline import read_transitions

    import ray
    from ray.data import ActorPoolStrategy

    ds = read_transitions(prepared_dir, columns=RANKED_COLUMNS)
    ds = ds.filter(expr=heldout_expr(heldout_share, "ray"))
    if sharded_on is not None:
        from mtrec_dist.data.dataset import load_manifest
        from mtrec_dist.evaluation.sharded_ranking import rank_sharded

        ranked, _ = rank_sharded(model_factory, checkpoint_path, ds, sharded_on, num_items=num_items,
                                 state_len=int(load_manifest(prepared_dir)["state_len"]),
                                 sampled_negatives=sampled_negatives, seed=seed,
                                 histories=user_histories(prepared_dir, heldout_expr(heldout_share)))
        return ranked
    histories_ref = [ray.put(user_histories(prepared_dir, heldout_expr(heldout_share)))]
    ds = ds.map_batches(RankingScorer, fn_constructor_args=(model_factory, checkpoint_path, num_items,
                                                            sampled_negatives, seed),
                        fn_constructor_kwargs={"histories_ref": histories_ref, "malloc_trim_mb": malloc_trim_mb},
                        batch_size=RANK_BATCH_ROWS, batch_format="numpy",
                        compute=ActorPoolStrategy(min_size=1, max_size=concurrency), num_cpus=0.5)
    return _collected(ds, RANKS_SCHEMA)


def _rank_in_process(model_factory: ModelFactory, checkpoint_path: str, prepared_dir: str, num_items: int,
                     sampled_negatives: int, seed: int, threads: int, heldout_share: float) -> pa.Table:
    """:func:`rank_test_rows` in this process (torch threads restored after): the same ranks as the actors'."""
    from mtrec_dist.data.pipeline import read_transitions_table
    from mtrec_dist.training.checkpoint import load_unsharded_model

    # the size rule counted the test rows only: the others are filtered out while reading, never held
    heldout = heldout_expr(heldout_share)
    table = read_transitions_table(prepared_dir, columns=RANKED_COLUMNS, where=heldout)
    return _batches_in_process(table, RANK_BATCH_ROWS, threads,
                               lambda: Ranker(load_unsharded_model(model_factory, checkpoint_path), num_items,
                                              sampled_negatives, seed, user_histories(prepared_dir, heldout)),
                               lambda ranker, batch: ranker(batch), RANKS_SCHEMA)


def user_histories(prepared_dir: str, where=None) -> Dict[int, np.ndarray]:
    """``user_idx -> unique item indices`` the user engaged with anywhere in the prepared dataset; only the rows
    ``where`` selects (a pyarrow expression: the held-out users', whose rows are ranked) when given, so that a
    ranking holds the histories of the users it ranks, not of every user."""
    import pyarrow.dataset as pads

    from mtrec_dist.data.readers import join_path, resolve_filesystem

    fs, root = resolve_filesystem(prepared_dir)
    t = pads.dataset(join_path(root, "transitions"), filesystem=fs, format="parquet").to_table(
        columns=["user_idx", "action"], filter=where)
    g = t.group_by("user_idx").aggregate([("action", "distinct")])
    return {int(u): np.asarray(a, dtype=np.int64)
            for u, a in zip(g.column("user_idx").to_pylist(), g.column("action_distinct").to_pylist())}


def read_eval_table(prepared_dir: str) -> pa.Table:
    """The evaluation-only signals of every prepared transition (never read by training code)."""
    import pyarrow.dataset as pads

    from mtrec_dist.data.readers import join_path, resolve_filesystem

    fs, root = resolve_filesystem(prepared_dir)
    return pads.dataset(join_path(root, "eval"), filesystem=fs, format="parquet").to_table()


def _report(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    """:func:`ranking_report` with the names the report and the literature use (HR@k, NDCG@k, MRR)."""
    names = {"mrr": "MRR", "n": "n"}
    out = {}
    for key, value in ranking_report(ranks, ks).items():
        metric, _, k = key.partition("@")
        out[f"{metric.upper()}@{k}" if k else names.get(key, key)] = value
    return out


def ranking_metrics(ranked: pa.Table, eval_table: pa.Table, ks: Sequence[int]) -> dict:
    """HR/NDCG on all targets and satisfied targets (full ranking), plus the sampled protocol."""
    sat, _, _ = satisfied_labels(eval_table)
    sat_by_row = dict(zip(eval_table.column("row_id").to_pylist(), sat.tolist()))
    rows = ranked.column("row_id").to_pylist()
    is_sat = np.array([sat_by_row.get(r, False) for r in rows], dtype=bool)
    full = ranked.column("rank_full").to_numpy()
    sampled = ranked.column("rank_sampled").to_numpy()
    out = {"all": _report(full, ks), "sampled": _report(sampled, ks),
           "n_test": int(len(rows)), "n_satisfied": int(is_sat.sum())}
    out["satisfied"] = _report(full[is_sat], ks) if is_sat.any() else {}
    return out


def eval_rows(eval_table: pa.Table, row_ids: np.ndarray) -> np.ndarray:
    """Positions in ``eval_table`` of ``row_ids`` (each must be there: every transition has an eval row)."""
    order = {r: i for i, r in enumerate(eval_table.column("row_id").to_pylist())}
    return np.array([order[r] for r in np.asarray(row_ids).tolist()], dtype=np.int64)


def reward_validity(scores: Dict[str, np.ndarray], eval_table: pa.Table, row_ids: np.ndarray) -> dict:
    """Spearman (vs the graded signal) and AUC (vs the satisfied label) of each named score.

    ``scores[name]`` is aligned with ``row_ids``; rows are matched to ``eval_table`` by row id.
    """
    sat, graded, signal = satisfied_labels(eval_table)
    idx = eval_rows(eval_table, row_ids)
    out: dict = {"signal": signal, "n": int(len(idx)), "satisfied_share": float(sat[idx].mean())}
    for name, s in scores.items():
        ok = np.isfinite(graded[idx]) & np.isfinite(s)
        out[f"{name}_spearman"] = spearman(s[ok], graded[idx][ok])
        labels = sat[idx][ok]
        out[f"{name}_auc"] = roc_auc(s[ok], labels) if 0 < labels.sum() < labels.size else float("nan")
    return out


def click_frequency(prepared_dir: str, actions: np.ndarray, heldout_share: Optional[float] = None) -> np.ndarray:
    """How often each row's item was engaged with in the logs (the click-label baseline score); given
    ``heldout_share``, counted on the training users' rows only, as every other score is fitted."""
    if heldout_share is None:
        from mtrec_dist.data.prepare import load_vocab

        counts = np.concatenate([[0], np.asarray(load_vocab(prepared_dir).item_count, dtype=np.float64)])
        return counts[actions]
    from mtrec_dist.data.heldout import training_expr
    from mtrec_dist.data.pipeline import read_transitions_table

    trained = read_transitions_table(prepared_dir, columns=["action", "user_idx"], where=training_expr(heldout_share))
    counts = np.bincount(trained.column("action").to_numpy(), minlength=int(np.max(actions, initial=0)) + 1)
    return counts.astype(np.float64)[actions]
