"""`mtrec prepare` on Ray Data: raw event logs -> validated, sessionized, windowed transitions.

This module is the driver; each stage's logic lives in a module of its own:

1. **read + validate** (:mod:`mtrec_dist.data.validate`) -- one task per input file (per group of row
   groups for big Parquet files) parses rows with :mod:`mtrec_dist.data.readers` and flags row-level
   problems in ``reject_reason``; every row gets its input position ``_order``.
2. **per-user stage** (:mod:`mtrec_dist.data.sessionize`) -- rows hash-partitioned by ``user_id`` (one
   user's rows land in one block) and processed one block at a time, vectorised over the block's users:
   ``duplicate_event``, ``ts_out_of_order``, then sessionization and windowing of the engaged events.
3. **vocabularies** (:mod:`mtrec_dist.data.vocab`) -- of the accepted rows (per-block id counts merged
   here): items get indices ``1..num_items`` (0 is padding), users ``0..num_users-1``.  With an existing
   vocab the old indices are kept and unseen ids are appended (daily retraining never crashes on a new id).
4. **write** (:mod:`mtrec_dist.data.dataset`) -- ``transitions/``, ``eval/``, ``rejects/``, ``vocab/``;
5. **slates** (:mod:`mtrec_dist.data.slates`) -- where the logs come with impressions (``prepare.impressions``;
   by default the simulator's ``impressions/`` beside its ``logs/``), each slate shown in vocab indices:
   ``slates/`` and ``slates_rejects/``; and, last, ``manifest.json``.

Row accounting is checked in code: ``rows_in == rows_ok + rows_rejected`` or :class:`AccountingError`.

String ids (``prepare.id_type=string``: UUIDs, ASINs) are read as text, then, between stages 1 and 2,
replaced by int64 keys (:mod:`mtrec_dist.data.ids`) so that the per-user stage runs unchanged; the vocab
and the rejects turn the keys back into the strings.

Daily retraining (:mod:`mtrec_dist.retrain`) prepares one day at a time: ``carry_in`` starts each user's
states from the last ``state_len`` items carried over from earlier days (``carry/users.parquet``, raw
ids), ``carry_out`` writes the updated carry-over, and ``row_id_offset`` shifts the row ids past the
previous days' (manifest ``row_id_offset`` / ``next_row_id``).  ``pos_from_end`` and ``done`` stay
per input: a user's last transition of the day is ``done = 1``.

The names other modules use from the stage modules are re-exported here (``__all__``), so
``from mtrec_dist.data.prepare import load_vocab`` keeps working.
"""
from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec_dist.config import PrepareConfig
from mtrec_dist.data import readers as rd
from mtrec_dist.data.dataset import (EVAL_DIR, EVAL_SCHEMA, MANIFEST_FILE, REJECTS_DIR, SLATES_DIR,
                                     TRANSITION_SCHEMA, TRANSITIONS_DIR, VOCAB_DIR, AccountingError,
                                     EmptyDatasetError, list_shards, load_manifest, prepare_output_dir,
                                     write_manifest)
from mtrec_dist.data.ids import IdKeys, intern_ids
from mtrec_dist.data.readers import REASON_COLUMN, InputError, join_path, resolve_filesystem
from mtrec_dist.data.schema import SCHEMA_VERSION
from mtrec_dist.data.sessionize import annotate_users, index_transitions
from mtrec_dist.data.shuffle import whole_user_blocks
from mtrec_dist.data.slates import Impressions, find_impressions, summary_line, write_slates
from mtrec_dist.data.stats import collect_stats, largest, sum_by, total
from mtrec_dist.data.summaries import summarize_manifest
from mtrec_dist.data.validate import (ORDER_COLUMN, ROW_CHECKS, USER_CHECKS, count_reasons, read_units, reason_code,
                                      to_rejects, validate_local, validate_rows, work_units)
from mtrec_dist.data.vocab import (CARRY_SCHEMA, PAD_RAW, VOCAB_SCHEMA, Vocab, carry_arrays, check_carry_items,
                                   extend_vocab, load_carry, load_vocab, save_carry, update_carry, vocab_lookup)

__all__ = [
    "prepare_dataset", "default_paths", "summarize_manifest",
    # dataset I/O
    "TRANSITIONS_DIR", "EVAL_DIR", "REJECTS_DIR", "VOCAB_DIR", "SLATES_DIR", "MANIFEST_FILE", "TRANSITION_SCHEMA",
    "EVAL_SCHEMA", "AccountingError", "EmptyDatasetError", "load_manifest",
    # validation
    "ORDER_COLUMN", "ROW_CHECKS", "USER_CHECKS", "count_reasons", "reason_code", "validate_local",
    "validate_rows",
    # per-user stage
    "annotate_users", "index_transitions",
    # vocabularies and carry-over
    "VOCAB_SCHEMA", "CARRY_SCHEMA", "PAD_RAW", "Vocab", "extend_vocab", "load_vocab", "vocab_lookup",
    "load_carry", "update_carry", "save_carry",
]


def _unwrap_input_error(e: BaseException) -> Optional[InputError]:
    """The InputError raised inside a Ray task (wrapped by Ray Core / Ray Data), if that is the cause."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError keeps the task's exception here
        if isinstance(cause, BaseException):
            e = cause
            continue
        if isinstance(e, InputError):
            return e
        e = e.__cause__ or e.__context__
    return None


# ---- the run: inputs resolved up front, then one function per stage ------------------------------------
@dataclass
class _Run:
    """One prepare run: what was resolved and checked before any Ray work, and what the stages found."""

    cfg: PrepareConfig
    input_uri: str
    output_uri: str
    vocab_dir: str
    carry_in: Optional[str]
    carry_out: Optional[str]
    row_id_offset: int
    say: Callable[[str], None]
    fs_in: object = None
    files: list = field(default_factory=list)
    units: list = field(default_factory=list)
    base_vocab: Optional[Vocab] = None
    carried: Optional[pa.Table] = None
    impressions: Optional[Impressions] = None
    fs_out: object = None
    out_root: str = ""
    out_display: str = ""
    t_start: float = field(default_factory=time.time)
    t_lap: float = field(default_factory=time.time)
    timings: dict = field(default_factory=dict)
    # filled by the stages
    stats: Optional[pa.Table] = None  # stage 1 statistics
    ann_stats: Optional[pa.Table] = None  # stage 2 statistics
    rows_in: int = 0
    partitions: int = 0
    num_transitions: int = 0
    vocab: Optional[Vocab] = None
    keys: Optional[IdKeys] = None  # string ids: the run's id keys (see mtrec_dist.data.ids)
    log_end: Optional[int] = None  # the accepted rows' latest ts (return labels are censored before it)

    def lap(self, name: str) -> float:
        """Record the seconds since the previous lap under ``name`` (the manifest's ``seconds``)."""
        now = time.time()
        self.timings[name] = round(now - self.t_lap, 3)
        self.t_lap = time.time()
        return self.timings[name]


def _resolve(cfg: PrepareConfig, input, output, vocab_dir, progress, carry_in, carry_out, row_id_offset) -> _Run:
    """Check the configuration, the input files, the vocab and carry-over, and ready the output directory:
    every mistake a user can make is reported here, before a cluster starts."""
    cfg.validate()
    input_uri, output_uri = input or cfg.input, output or cfg.output
    if not input_uri:
        raise InputError("prepare: no input given (--input or prepare.input)")
    if not output_uri:
        raise InputError("prepare: no output given (--out or prepare.output)")
    say = progress or ((lambda m: print(m, file=sys.stderr, flush=True)) if cfg.progress else (lambda m: None))
    run = _Run(cfg, input_uri, output_uri, vocab_dir if vocab_dir is not None else cfg.vocab_dir, carry_in,
               carry_out, row_id_offset, say)
    run.fs_in, run.files = rd.list_input_files(input_uri, cfg.format)
    run.units, _ = work_units(run.fs_in, run.files, cfg.format, cfg.column_map, cfg.delimiter, say)
    run.impressions = find_impressions(cfg.impressions, input_uri)
    run.base_vocab = load_vocab(run.vocab_dir) if run.vocab_dir else None
    if run.base_vocab is not None and run.base_vocab.num_items and run.base_vocab.id_type != cfg.id_type:
        raise InputError(f"vocab {run.vocab_dir} holds {run.base_vocab.id_type} ids, prepare.id_type is "
                         f"{cfg.id_type}: keep it the same from day to day")
    if row_id_offset < 0:
        raise ValueError(f"row_id_offset must be >= 0, got {row_id_offset}")
    run.carried = load_carry(carry_in, cfg.state_len) if carry_in else None
    check_carry_items(run.carried, run.base_vocab, carry_in, run.vocab_dir)
    run.fs_out, run.out_root = resolve_filesystem(output_uri)
    run.out_display = rd.display_path(run.fs_out, run.out_root)
    prepare_output_dir(run.fs_out, run.out_root, cfg.overwrite, run.out_display)
    return run


def _read_validate(run: _Run):
    """Stage 1: parse and validate every work unit on the cluster; count rows, users and reasons."""
    import ray

    cfg = run.cfg
    staged = ray.data.from_items(run.units, override_num_blocks=len(run.units)).map_batches(
        read_units, batch_size=1, batch_format="pyarrow",
        fn_kwargs=dict(fs=run.fs_in, files=run.files, fmt=cfg.format, column_map=cfg.column_map,
                       delimiter=cfg.delimiter, max_item_id=cfg.max_item_id, max_ts=cfg.max_ts,
                       id_type=cfg.id_type),
    ).materialize()
    run.lap("read_validate")
    run.stats = collect_stats(staged)
    run.rows_in = total(run.stats, "rows")
    run.lap("stats")
    run.say(f"[prepare] read + validate: {run.rows_in:,} rows in {run.timings['read_validate']:.1f}s")
    if run.rows_in == 0:
        raise InputError(f"input is empty: {len(run.files)} file(s) under {run.input_uri} hold no rows")
    return staged


def _per_user_stage(run: _Run, staged):
    """Stage 2: per-user checks, sessions, windows on blocks that each hold whole users.

    A hash repartition on user_id puts each user's rows in one block (the same guarantee
    groupby().map_groups() relies on); the UDF is vectorised over all users of a block instead of being
    called once per user.  Small inputs skip the hash shuffle: one block trivially holds each user whole.
    """
    import ray
    from ray.data.expressions import col

    cfg = run.cfg
    users = sum_by(run.stats, "user", "id")
    user_counts = users.column("count_sum").to_numpy()
    ok = staged.filter(expr=col(REASON_COLUMN).is_null())
    run.log_end = largest(run.stats, "ts_max")  # session ends within a return window of it: returns unknown
    user_ids = users.column("id").to_numpy()
    if cfg.id_type == "string":
        run.keys = _id_keys(run)
        user_ids = run.keys.user_keys(users.column("id"))
        ok = ok.map_batches(intern_ids, batch_size=None, batch_format="pyarrow",
                            fn_kwargs=dict(keys=ray.put(run.keys)))
    row_base = ray.put((user_ids,
                        np.concatenate([[0], np.cumsum(user_counts)[:-1]]).astype(np.int64) + run.row_id_offset))
    carry_ref = (ray.put(carry_arrays(run.carried, cfg.state_len, run.keys)) if run.carried is not None
                 else None)
    rows_ok_staged = run.rows_in - total(run.stats, "reason")
    grouped, run.partitions = whole_user_blocks(ok, "user_id", rows_ok_staged, cfg)
    annotated = grouped.map_batches(
        annotate_users, batch_size=None, batch_format="pyarrow",
        fn_kwargs=dict(state_len=cfg.state_len, session_gap_s=cfg.session_gap_s, row_base=row_base,
                       return_window_s=cfg.return_window_s, log_end=run.log_end,
                       **(dict(carry=carry_ref) if carry_ref is not None else {})),
    ).materialize()
    run.ann_stats = collect_stats(annotated)
    run.lap("sessionize")
    users_seen = total(run.ann_stats, "first_of_user")
    if users_seen != users.num_rows:
        raise AccountingError(f"per-user stage saw {users_seen} user blocks for {users.num_rows} users: "
                              "a user was split across blocks")
    run.num_transitions = total(run.ann_stats, "transitions")
    run.say(f"[prepare] sessionize + windows: {run.num_transitions:,} transitions in "
            f"{run.timings['sessionize']:.1f}s")
    return annotated


def _id_keys(run: _Run) -> IdKeys:
    """Keys for every string id of the run: the accepted rows', the base vocab's and the carry-over's."""
    def ids(kind: str):
        return sum_by(run.stats, kind, "id").column("id")

    users, items = [ids("user")], [ids("item")]
    if run.base_vocab is not None:
        users.append(run.base_vocab.user_raw)
        items.append(run.base_vocab.item_raw)
    if run.carried is not None:
        users.append(run.carried.column("user_id"))
        items.append(pc.list_flatten(run.carried.column("state_raw")))
    return IdKeys.build(users, items)


def _build_vocab(run: _Run):
    """Stage 3: the vocab of the accepted rows (old indices kept, unseen ids appended), saved; returns the
    broadcast lookup the writers index with."""
    import ray

    items_ok = sum_by(run.ann_stats, "item", "id")
    users_ok = sum_by(run.ann_stats, "user", "id")
    item_ids, user_ids = items_ok.column("id").to_numpy(), users_ok.column("id").to_numpy()
    if run.keys is not None:  # the per-user stage ran on keys: the vocab holds the strings
        item_ids, user_ids = run.keys.item_text(item_ids), run.keys.user_text(user_ids)
    base = run.base_vocab
    vocab = extend_vocab(base, item_ids, user_ids, items_ok.column("count_sum").to_numpy(),
                         users_ok.column("count_sum").to_numpy())
    vocab.save(join_path(run.output_uri, VOCAB_DIR))
    run.vocab = vocab
    run.lap("vocab")
    run.say(f"[prepare] vocab: {vocab.num_items:,} items ({_new(vocab, base, 'items'):,} new), "
            f"{vocab.num_users:,} users ({_new(vocab, base, 'users'):,} new)")
    return ray.put(vocab_lookup(vocab, run.keys))


def _new(vocab: Vocab, base: Optional[Vocab], what: str) -> int:
    """How many items (``what`` = "items") or users the vocab added to ``base``."""
    attr = "num_items" if what == "items" else "num_users"
    return getattr(vocab, attr) - (getattr(base, attr) if base else 0)


def _write(run: _Run, staged, annotated, lookup) -> None:
    """Stage 4: transitions/ and eval/ (in indices), and rejects/ of both stages, as Parquet shards."""
    import ray
    from ray.data.expressions import col

    shard = dict(min_rows_per_file=run.cfg.rows_per_shard, max_rows_per_file=run.cfg.rows_per_shard)
    fs_out, out_root = run.fs_out, run.out_root
    if run.num_transitions:
        for part, sub in (("transitions", TRANSITIONS_DIR), ("eval", EVAL_DIR)):
            _indexed(annotated, lookup, part).write_parquet(join_path(out_root, sub), filesystem=fs_out, **shard)
    if total(run.stats, "reason") + total(run.ann_stats, "reason"):
        sources = [f.display for f in run.files]
        keys = ray.put(run.keys) if run.keys is not None else None
        staged_rejects, user_rejects = (
            ds.filter(expr=col(REASON_COLUMN).is_not_null()).map_batches(
                to_rejects, batch_size=None, batch_format="pyarrow", fn_kwargs=dict(sources=sources, **kw))
            for ds, kw in ((staged, {}), (annotated, dict(keys=keys))))
        staged_rejects.union(user_rejects).write_parquet(join_path(out_root, REJECTS_DIR), filesystem=fs_out,
                                                         **shard)
    run.lap("write")


def _slates(run: _Run, annotated, lookup) -> Optional[dict]:
    """Stage 5: the impressions' slates in vocab indices (:mod:`mtrec_dist.data.slates`), matched to the
    transitions; the manifest's ``slates`` entry (None without impressions)."""
    import ray

    if run.impressions is None:
        return None
    entry = write_slates(run.impressions, ray.put(run.vocab), run.cfg, run.fs_out, run.out_root,
                         _indexed(annotated, lookup, "transitions"), run.num_transitions)
    run.lap("slates")
    run.say(f"[prepare] {summary_line(entry)}")
    return entry


def _indexed(annotated, lookup, part: str):
    """The ``transitions/`` (``part`` = "transitions") or ``eval/`` ("eval") rows of the annotated events
    (``index_transitions`` keeps only the transition rows: one filter, not a Ray filter before it too)."""
    return annotated.map_batches(
        index_transitions, batch_size=None, batch_format="pyarrow", fn_kwargs=dict(lookup=lookup, part=part))


def _account(run: _Run) -> dict:
    """Row accounting over both stages and the shards written: ``rows_in == rows_ok + rows_rejected`` and
    the shards hold exactly the transitions and rejects counted, or :class:`AccountingError`."""
    full_reasons: dict[str, int] = {}
    for s in (run.stats, run.ann_stats):
        for r in sum_by(s, "reason", "reason").to_pylist():
            full_reasons[r["reason"]] = full_reasons.get(r["reason"], 0) + int(r["count_sum"])
    reasons, hints = count_reasons(full_reasons)
    rows_rejected = sum(reasons.values())
    rows_ok = total(run.ann_stats, "rows") - total(run.ann_stats, "reason")
    if run.rows_in != rows_ok + rows_rejected:
        raise AccountingError(f"rows_in {run.rows_in} != rows_ok {rows_ok} + rows_rejected {rows_rejected}")
    shards = {sub: list_shards(run.fs_out, run.out_root, sub) for sub in (TRANSITIONS_DIR, EVAL_DIR, REJECTS_DIR)}
    written = sum(s["rows"] for s in shards[TRANSITIONS_DIR])
    rejects_written = sum(s["rows"] for s in shards[REJECTS_DIR])
    if written != run.num_transitions or rejects_written != rows_rejected:
        raise AccountingError(f"wrote {written} transitions (expected {run.num_transitions}) and "
                              f"{rejects_written} rejects (expected {rows_rejected})")
    return dict(rows_ok=rows_ok, rows_rejected=rows_rejected, reasons=reasons, hints=hints,
                full_reasons=full_reasons, shards=shards)


def _manifest(run: _Run, counts: dict) -> dict:
    """The manifest: what was read, what was kept and refused (and why), the vocab, shards and timings."""
    cfg, vocab, n_tr = run.cfg, run.vocab, run.num_transitions
    manifest = dict(
        schema_version=SCHEMA_VERSION,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        input=run.input_uri, format=cfg.format, column_map=cfg.column_map, id_type=cfg.id_type,
        rows_in=run.rows_in, rows_ok=counts["rows_ok"], rows_rejected=counts["rows_rejected"],
        rejects_by_reason=counts["reasons"], reject_hints=counts["hints"],
        rows_engaged=n_tr, rows_not_engaged=counts["rows_ok"] - n_tr,
        num_transitions=n_tr, num_items=vocab.num_items, num_users=vocab.num_users,
        embedding_rows=vocab.num_items + 1, state_len=cfg.state_len, session_gap_s=cfg.session_gap_s,
        return_window_s=cfg.return_window_s, log_end=run.log_end,
        shuffle_partitions=run.partitions,
        vocab=dict(base=run.vocab_dir or None, new_items=_new(vocab, run.base_vocab, "items"),
                   new_users=_new(vocab, run.base_vocab, "users"),
                   items_in_data=int((vocab.item_count > 0).sum()),
                   users_in_data=int((vocab.user_count > 0).sum())),
        source_files=[dict(path=f.display, bytes=f.size, partition_day=f.partition_day) for f in run.files],
        shards=counts["shards"], seconds=run.timings, total_seconds=round(time.time() - run.t_start, 3),
        events_per_s=round(run.rows_in / max(time.time() - run.t_start, 1e-9), 1),
    )
    if run.row_id_offset or run.carry_in or run.carry_out:
        manifest.update(row_id_offset=int(run.row_id_offset), next_row_id=int(run.row_id_offset + run.rows_in))
    return manifest


def _carry_over(run: _Run) -> Optional[dict]:
    """Daily retraining: write the updated carry-over (``carry_out``); the manifest's ``carry`` entry."""
    if not (run.carry_in or run.carry_out):
        return None
    carry_stats = dict(input=run.carry_in or None, output=run.carry_out or None,
                       users_in=int(run.carried.num_rows) if run.carried is not None else 0)
    if run.carry_out:
        new_carry = update_carry(run.carried, run.output_uri, run.vocab, run.cfg.state_len)
        save_carry(new_carry, run.carry_out)
        carry_stats["users_out"] = int(new_carry.num_rows)
    return carry_stats


def prepare_dataset(cfg: PrepareConfig, input: Optional[str] = None, output: Optional[str] = None,
                    vocab_dir: Optional[str] = None, progress: Optional[Callable[[str], None]] = None, *,
                    carry_in: Optional[str] = None, carry_out: Optional[str] = None,
                    row_id_offset: int = 0) -> dict:
    """Run the whole prepare pipeline on Ray Data; write the dataset under ``output``; return the manifest.

    ``input``/``output``/``vocab_dir`` default to ``cfg.input``/``cfg.output``/``cfg.vocab_dir``.
    Starts (or attaches to) a Ray cluster if none is running.

    Daily retraining (:mod:`mtrec_dist.retrain`): ``carry_in`` = a carry-over dir written by an earlier
    prepare (``carry_out``) whose users' first states start from their carried last ``state_len`` items
    (needs ``vocab_dir``, the vocab those items are in); ``carry_out`` = where to write each user's last
    ``state_len`` engaged items after this input (carried users absent from it are kept as they were);
    ``row_id_offset`` is added to every ``row_id`` so that the row ids of successive inputs never collide
    (this dataset's ids lie in ``[row_id_offset, row_id_offset + rows_in)``; manifest ``next_row_id``).
    """
    import ray

    from mtrec_dist.runtime import init_ray

    run = _resolve(cfg, input, output, vocab_dir, progress, carry_in, carry_out, row_id_offset)
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = bool(cfg.progress)
    try:
        run.t_lap = time.time()
        staged = _read_validate(run)
        annotated = _per_user_stage(run, staged)
        lookup = _build_vocab(run)
        _write(run, staged, annotated, lookup)
        slates = _slates(run, annotated, lookup)
    except Exception as e:
        err = _unwrap_input_error(e)
        if err is not None and err is not e:
            raise err from None  # the file and the problem, not a Ray traceback
        raise
    counts = _account(run)
    manifest = _manifest(run, counts)
    manifest["slates"] = slates
    carry = _carry_over(run)
    if carry is not None:
        manifest["carry"] = carry
    write_manifest(run.fs_out, run.out_root, manifest)
    run.say(f"[prepare] {run.rows_in:,} rows in = {counts['rows_ok']:,} ok + {counts['rows_rejected']:,} rejected; "
            f"{run.num_transitions:,} transitions -> {run.out_display} ({manifest['total_seconds']:.1f}s)")
    if run.num_transitions == 0:
        why = dict(sorted(counts["full_reasons"].items()))
        raise EmptyDatasetError(f"no valid engaged events in {run.input_uri}: {run.rows_in:,} rows read, "
                                f"{counts['rows_rejected']:,} rejected ({why}); "
                                f"see {join_path(run.out_display, REJECTS_DIR)}{_string_id_hint(run, counts)}")
    return manifest


def _string_id_hint(run: _Run, counts: dict) -> str:
    """A hint when integer ids were asked for and most rows were refused for ids that are not integers."""
    invalid = sum(counts["reasons"].get(f"invalid_{c}", 0) for c in ("user_id", "item_id"))
    if run.cfg.id_type == "int" and run.cfg.format in ("csv", "parquet") and 2 * invalid > run.rows_in:
        return "; ids that are not integers (UUIDs, ASINs)? set prepare.id_type=string"
    return ""


def default_paths(cfg) -> tuple[str, str]:
    """(input, output) of prepare for a PipelineConfig: the configured paths, else the run's defaults."""
    from mtrec_dist.layout import prepare_paths

    return prepare_paths(cfg)
