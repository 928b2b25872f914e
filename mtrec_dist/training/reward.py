"""`mtrec train-reward`: the QR-IQL mental reward model trained with :func:`fit_distributed`.

Each checkpoint carries a ``model_spec`` (catalog size, state length, model and reward config) so that
scoring can rebuild the exact model from the checkpoint alone, whatever config it is run with.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from mtrec_dist.config import PipelineConfig, RewardConfig, samples_by_popularity
from mtrec_dist.data.heldout import training_expr
from mtrec_dist.runtime import init_ray
from mtrec_dist.training.launch import launch_fit, read_pointer
from mtrec_dist.training.specs import configs_from_spec

REWARD_RUN_PREFIX = "reward"
LATEST_POINTER = "reward_model.json"  # <output_dir>/reward_model.json -> the final checkpoint
MANIFEST_KEYS = ("num_items", "num_users", "state_len", "num_transitions")


def load_training_manifest(prepared_dir: str) -> dict:
    """The prepared dataset's manifest, checked for what training needs."""
    from mtrec_dist.data.prepare import load_manifest

    manifest = load_manifest(prepared_dir)
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest.get(k), int)]
    if missing:
        raise ValueError(f"{prepared_dir}/manifest.json: missing or non-integer key(s) {missing}")
    if manifest["num_items"] < 1 or manifest["state_len"] < 1:
        raise ValueError(f"{prepared_dir}/manifest.json: num_items and state_len must be >= 1")
    return manifest


def model_spec(cfg: PipelineConfig, manifest: dict) -> Dict[str, Any]:
    """JSON-able description of the reward model (stored in every checkpoint)."""
    return {
        "kind": "qr_iql_reward_model",
        "num_items": int(manifest["num_items"]),
        "state_len": int(manifest["state_len"]),
        "model": dataclasses.asdict(cfg.model),
        "reward": dataclasses.asdict(cfg.reward),
    }


def reward_model_factory(spec: Dict[str, Any], item_counts: Optional[np.ndarray] = None, *,
                         for_inference: bool = False,
                         item_prior: Optional[Dict[str, np.ndarray]] = None) -> Callable[[torch.device], torch.nn.Module]:
    """Picklable ``device -> QRIQLModel`` for a :func:`model_spec`.

    ``item_counts`` feed the popularity negative sampler (training only).  ``for_inference`` builds the
    model with the uniform sampler: scoring never samples negatives, so it needs no counts.  ``item_prior``
    (training only, :func:`training_item_prior`): scoring reads the prior back from the checkpoint.
    """
    from mtrec_dist.models.reward_model import QRIQLModel

    model_cfg, reward_cfg, counts = configs_from_spec(spec, "qr_iql_reward_model", "a reward model", "reward",
                                                      RewardConfig, item_counts, for_inference)
    prior = None if item_prior is None else {k: item_prior[k] for k in ("level", "watch_level")}
    return functools.partial(QRIQLModel, spec["num_items"], model_cfg, reward_cfg, spec["state_len"],
                             item_counts=counts, item_prior=prior)


def training_item_prior(cfg: PipelineConfig, ds, num_items: int) -> Optional[Dict[str, Any]]:
    """The item prior (:mod:`mtrec_dist.objectives.item_prior`) counted from the training rows ``ds`` (a Ray
    Dataset), or None where the reward model does not use one (``reward.uses_item_prior``).  The driver
    streams four columns of every row and keeps per-item sums only (seven floats per item)."""
    from mtrec_dist.objectives.item_prior import PRIOR_COLUMNS, ItemSums, add_rows, item_prior_from_sums

    if not cfg.reward.uses_item_prior:
        return None
    sums = ItemSums(num_items)
    for batch in ds.select_columns(list(PRIOR_COLUMNS)).iter_batches(batch_size=1 << 16, batch_format="numpy"):
        add_rows(sums, batch)
    return item_prior_from_sums(sums, cfg.reward.item_prior_watch_slope)


def item_prior_summary(prior: Dict[str, Any]) -> Dict[str, Any]:
    """What a run records of its item prior: the fit and how many items it read as pulled."""
    return {**prior["fit"], "items_pulled": int((prior["p_pull"] > 0.5).sum()),
            "level_sd": float(np.std(prior["level"][1:]))}


def training_transitions(cfg: PipelineConfig, prepared_dir: str, rows: int, earlier: Sequence[str] = (),
                         log_end: Optional[int] = None):
    """The prepared transitions of the users not held out (``eval.heldout_user_share``,
    :mod:`mtrec_dist.data.heldout`) as a Ray Dataset, the ``earlier`` prepared datasets (daily retraining's
    previous days) added, with ``later_items`` when the order term is on (``reward.order_items`` > 0) and
    ``slate_items`` when the data have slates (``reward.slate_choice``; :mod:`mtrec_dist.data.slate_join`).
    ``rows``: every transition of those days, held-out users' too (the join is checked against it).

    With ``earlier`` the return labels are computed again over all the days up to ``log_end`` (the newest
    day's end): a session end in the last ``prepare.return_window_s`` of its own day has no label in its
    day's data, and the following days' events give it one.  Both need each user's rows together: a hash
    repartition by user gives each block whole users, as prepare's per-user stage does.

    A set small enough for the driver (``train.driver_read_mb`` of the reward stage) is read, joined and
    labelled in this process with pyarrow and handed to Ray Data as in-memory blocks (:func:`_driver_table`):
    the same rows, without the join's and the shuffle's actors to start.  (The size estimate counts the state
    columns, not ``slate_items`` or ``later_items``, and the driver holds a few copies of the table while it
    builds it: a set near the limit takes a few times ``driver_read_mb`` there.)

    Where some days have slates and others none, the days without get padding slates (the catalog is their
    choice set); days whose slates differ in length raise."""
    from mtrec_dist.data.dataset import load_manifest
    from mtrec_dist.data.pipeline import in_memory_dataset, read_transitions
    from mtrec_dist.data.shuffle import partitions_for, whole_user_blocks
    from mtrec_dist.data.sessionize import with_later_items, with_returns_relabelled
    from mtrec_dist.data.slate_join import no_slates, slate_table, with_slates
    from mtrec_dist.training.loop import fits_driver

    v2 = cfg.reward.objective == "v2"
    share = cfg.eval.heldout_user_share

    days = (prepared_dir, *earlier)
    slates = {d: slate_table(d) if v2 and cfg.reward.slate_choice else None for d in days}
    width = _one_slate_length(slates)
    joined = width is not None
    if fits_driver(cfg.stage_train("reward"), rows, int(load_manifest(prepared_dir)["state_len"])):
        table = _driver_table(cfg, days, slates, width, log_end if earlier else None)
        _check_rows(table.num_rows, rows, prepared_dir, joined)
        return in_memory_dataset(table.filter(training_expr(share)))
    # each day's transitions joined to that day's slates only (slate ids are unique within one dataset)
    per_day = [with_slates(read_transitions(d), *slates[d], partitions_for(rows, cfg.prepare)) if slates[d]
               else read_transitions(d).map_batches(no_slates, batch_size=None, batch_format="pyarrow",
                                                    fn_kwargs=dict(width=width)) if joined
               else read_transitions(d) for d in days]
    ds = per_day[0].union(*per_day[1:]) if earlier else per_day[0]
    k = cfg.reward.order_items if v2 else 0
    if k == 0 and not earlier and not joined:
        return ds.filter(expr=training_expr(share, "ray"))
    if k or earlier:
        ds, _ = whole_user_blocks(ds, "user_idx", rows, cfg.prepare)
    if earlier:
        ds = ds.map_batches(with_returns_relabelled, batch_size=None, batch_format="pyarrow",
                            fn_kwargs=dict(window_s=cfg.prepare.return_window_s, log_end=int(log_end)))
    if k:
        ds = ds.map_batches(with_later_items, batch_size=None, batch_format="pyarrow", fn_kwargs=dict(k=k))
    # materialised: the shuffle and the join run once, not again for each schema or epoch read of the dataset
    ds = ds.materialize()
    _check_rows(ds.count() if joined else rows, rows, prepared_dir, joined)
    return ds.filter(expr=training_expr(share, "ray"))


def _one_slate_length(slates: Dict[str, Any]) -> Optional[int]:
    """The slate length K shared by every day that has slates (None: no day has any); days with different K
    raise, since one batch holds one width of ``slate_items``."""
    widths = {d: entry[1] for d, entry in slates.items() if entry}
    if len(set(widths.values())) > 1:
        raise ValueError(f"slates of different lengths across the days trained together: {widths}")
    return next(iter(widths.values()), None)


def _check_rows(got: int, rows: int, prepared_dir: str, joined: bool) -> None:
    """A left join keeps every transition, so more rows than went in means a key seen twice in slates/."""
    from mtrec_dist.data.dataset import AccountingError

    if got != rows:
        what = "joining slates/" if joined else "reading the transitions"
        raise AccountingError(f"{prepared_dir}: {what} gave {got} transitions, not {rows}")


def _driver_table(cfg: PipelineConfig, days: Sequence[str], slates: Dict[str, Any], width: Optional[int],
                  log_end: Optional[int]):
    """:func:`training_transitions`' rows as one pyarrow table built in this process: each day's transitions
    with its own slates (padding for a day without, when others have them), the days together, return labels
    computed again when ``log_end`` is given, then ``later_items`` (the order term).  The whole table holds
    whole users, so the per-user steps run on it as they run on each of the Ray path's user blocks."""
    import pyarrow as pa

    from mtrec_dist.data.pipeline import read_transitions_table
    from mtrec_dist.data.sessionize import with_later_items, with_returns_relabelled
    from mtrec_dist.data.slate_join import no_slates, read_slates_table, with_slates_table

    tables = []
    for d in days:
        table = read_transitions_table(d)
        if slates[d]:
            table = with_slates_table(table, read_slates_table(slates[d][0]), width)
        elif width is not None:
            table = no_slates(table, width=width)
        tables.append(table)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if log_end is not None:
        table = with_returns_relabelled(table, window_s=cfg.prepare.return_window_s, log_end=int(log_end))
    k = cfg.reward.order_items if cfg.reward.objective == "v2" else 0
    return with_later_items(table, k=k) if k else table


def order_term_note(cfg: PipelineConfig, manifest: Dict[str, Any]) -> Optional[str]:
    """A note when the order term is on for logs with impressions: it reads the order in which a user chose
    items as a preference, which holds where the user set the order (rating sessions) but not where a feed
    did (the slates say what was shown, and in which order it was offered)."""
    slates = manifest.get("slates") or {}
    if cfg.reward.objective != "v2" or cfg.reward.order_items <= 0 or not slates.get("rows_ok"):
        return None
    return (f"reward.order_items is {cfg.reward.order_items}, but these logs come with impressions "
            f"({slates['rows_ok']:,} slates): the order term is meant for self-directed logs, where the user chose "
            "the order; in a feed the order follows what was shown. Set reward.order_items: 0 unless that is "
            "what you mean.")


def train_reward_model(cfg: PipelineConfig, prepared_dir: str, output_dir: str,
                       resume: Optional[str] = None, *, progress: bool = True,
                       warm_start: Optional[str] = None, earlier_prepared: Sequence[str] = ()) -> Dict[str, Any]:
    """Train the QR-IQL reward model on ``<prepared_dir>/transitions`` with Ray Train + TorchRec.

    Writes metrics (``metrics.jsonl``, ``tensorboard/``) under ``output_dir``, checkpoints under
    ``cfg.train.storage_path`` (default ``<output_dir>/ray_results``), and ``<output_dir>/reward_model.json``
    naming the final checkpoint.  ``resume``: ``"latest"`` or a checkpoint path.  ``warm_start``: an
    earlier reward-model checkpoint whose weights initialise a fresh run (daily retraining; the catalog may
    have grown, see :func:`~mtrec_dist.training.loop.fit_distributed`).  ``earlier_prepared``: prepared
    datasets of the previous days (daily retraining), trained on again with their return labels completed
    by the newer days (:func:`training_transitions`).  Returns ``{"metrics", "checkpoint_path", "run_name",
    "storage_path", "output_dir", "train_rows", "heldout_user_share"}`` (``train_rows``: the rows of the users
    not held out, over every day read; with ``earlier_prepared`` also ``"rows"`` and ``"return_known_rows"``,
    every row of those days and the training rows with a return label).
    """
    from mtrec_dist.data.pipeline import action_counts, count_transitions

    cfg.validate()
    manifest = load_training_manifest(prepared_dir)
    rows = count_transitions(prepared_dir)
    if rows != manifest["num_transitions"]:
        raise ValueError(f"{prepared_dir}: transitions/ holds {rows} rows but manifest.json says "
                         f"{manifest['num_transitions']}; the dataset is incomplete or was modified")
    if rows == 0:
        raise ValueError(f"{prepared_dir}: no transitions to train on")
    share = cfg.eval.heldout_user_share
    counts = action_counts([prepared_dir, *earlier_prepared], manifest["num_items"], training_expr(share)) \
        if samples_by_popularity(cfg.reward) else None
    spec = model_spec(cfg, manifest)
    note = order_term_note(cfg, manifest)
    if note and progress:
        print(f"train-reward: note: {note}", file=sys.stderr, flush=True)
    train_rows = sum(count_transitions(d, where=training_expr(share)) for d in (prepared_dir, *earlier_prepared))
    if train_rows == 0:
        raise ValueError(f"{prepared_dir}: no training rows (every user is held out; eval.heldout_user_share is "
                         f"{share})")
    extra: Dict[str, Any] = {"train_rows": train_rows, "heldout_user_share": share}
    datasets = lambda: {"train": training_transitions(cfg, prepared_dir, rows)}  # noqa: E731
    if earlier_prepared:
        rows += sum(count_transitions(d) for d in earlier_prepared)
        init_ray(cfg.ray_address)
        ds = training_transitions(cfg, prepared_dir, rows, earlier_prepared, manifest["log_end"])
        extra.update({"rows": rows, "return_known_rows": int(ds.sum("return_known") or 0),
                      "earlier_prepared": list(earlier_prepared)})
        datasets = lambda: {"train": ds}  # noqa: E731
    prior = None
    if cfg.reward.uses_item_prior:  # counted from the very rows training reads, before it starts
        init_ray(cfg.ray_address)
        ds = datasets()["train"]
        datasets = lambda: {"train": ds}  # noqa: E731
        prior = training_item_prior(cfg, ds, manifest["num_items"])
        extra["item_prior"] = item_prior_summary(prior)
        if progress:
            p = extra["item_prior"]
            print(f"train-reward: item prior from {train_rows:,} rows: {p['items_pulled']:,} of "
                  f"{manifest['num_items']:,} items read as pulled (share of pulls {p['pi']:.2f}), "
                  f"item level sd {p['level_sd']:.3f}",
                  file=sys.stderr, flush=True)
    return launch_fit(cfg, "reward", reward_model_factory(spec, counts, item_prior=prior), datasets, spec=spec,
                      output_dir=output_dir,
                      run_prefix=REWARD_RUN_PREFIX, pointer=LATEST_POINTER, label="train-reward",
                      row_counts={"train": train_rows}, resume=resume, progress=progress, warm_start=warm_start,
                      extra=extra)


def default_reward_checkpoint(output_dir: str) -> str:
    """The final checkpoint named by ``<output_dir>/reward_model.json`` (written by train-reward)."""
    return read_pointer(output_dir, LATEST_POINTER, "train-reward")
