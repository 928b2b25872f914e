"""Impressions -> the ``slates/`` table of a prepared dataset: every slate shown, in vocab indices.

docs/method.md v2, R2: the decision utility that drives a click is fitted to the choice among the slate the
user was shown, where the logs have it.  Feeds log what they show beside what is clicked; the simulator
writes it as ``<sim>/impressions/day=.../part-*.parquet`` (:data:`mtrec_dist.data.simulator.EXPOSURE_SCHEMA`:
``user_id, session_id, slate_id, ts, items, click_index``).  ``prepare`` reads these Parquet files (whatever
the events' format) once the vocab of the accepted events is known, and writes under the prepared dataset:

* ``slates/`` (:data:`~mtrec_dist.data.dataset.SLATE_SCHEMA`): ``user_idx``, ``slate_id``, ``slate_items``
  (K vocab indices; 0, the padding index, for an item shown but in no accepted event) and ``click_index``
  (-1 = no click).  ``(user_idx, slate_id)`` is unique: a transition names its slate by it.
* ``slates_rejects/``: the impressions refused, as read (raw ids; ``click_index`` as int64), with
  ``reject_reason`` and ``source_file``.

Reasons, the first that applies (:data:`IMPRESSION_CHECKS`); K is the most common slate length of the
input (the longer on a tie), so slates of other lengths are refused rather than padded or cut.  Rows in =
slates written + rejects written, or :class:`~mtrec_dist.data.dataset.AccountingError`.

The manifest's ``slates`` entry (``null`` without impressions): ``input, rows_in, rows_ok, rows_rejected,
rejects_by_reason, shards, slate_len, items_unknown`` (kept slate positions mapped to 0) and its share, and
:data:`MATCH_COUNTS`: the transitions with a ``slate_id`` (not -1), how many of them find their slate in
``slates/``, how many slates are found, and how many found slates' clicked item is the transition's action.

String ids (``prepare.id_type=string``) work as integers do: the impressions' ids are read as text and
looked up in the vocab's strings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# SLATES_DIR / SLATE_SCHEMA are defined with the other tables of a prepared dataset; importable from here too
from mtrec_dist.data.dataset import (SLATE_REJECTS_DIR, SLATE_SCHEMA, SLATES_DIR, AccountingError, list_array,
                                     list_shards, resolve_broadcast)
from mtrec_dist.data.input_files import InputError, InputFile, join_path, list_input_files, resolve_filesystem
from mtrec_dist.data.parsed import REASON_COLUMN, SOURCE_COLUMN
from mtrec_dist.data.schema import NO_SLATE
from mtrec_dist.data.shuffle import whole_user_blocks
from mtrec_dist.data.simulator import IMPRESSIONS_DIR, LOGS_DIR  # the simulator's layout
from mtrec_dist.data.vocab import as_raw_ids

IMPRESSION_COLUMNS = ("user_id", "slate_id", "items", "click_index")
MISSING_USER, MISSING_SLATE, MISSING_ITEMS = ("impression_missing_user_id", "impression_missing_slate_id",
                                              "impression_missing_items")
BAD_LENGTH, BAD_CLICK, UNKNOWN_USER, DUPLICATE = ("impression_bad_length", "impression_bad_click_index",
                                                  "impression_unknown_user", "impression_duplicate_slate")
IMPRESSION_CHECKS = (
    f"{MISSING_USER} (null user_id)",
    f"{MISSING_SLATE} (null or negative slate_id: transitions use -1 for 'no slate')",
    f"{MISSING_ITEMS} (null or empty items, or a null item id in them)",
    f"{BAD_LENGTH} (a slate length other than K, the most common one of the input)",
    f"{BAD_CLICK} (null, or outside -1..K-1; int8)",
    f"{UNKNOWN_USER} (the user is not in the vocab: no accepted event here or in the vocab extended)",
    f"{DUPLICATE} (another kept row has the same user and slate_id; the one from the first file stays)",
)


# ---- which impressions: resolved and checked before any cluster work ------------------------------------
@dataclass
class Impressions:
    uri: str
    fs: pafs.FileSystem
    files: list[InputFile]


def find_impressions(setting: str, input_uri: str) -> Optional[Impressions]:
    """The impressions ``prepare.impressions`` names: ``"none"`` = none, ``""`` = the simulator's
    ``impressions/`` beside the input's ``logs/`` (:func:`beside_logs`) if it exists, else the path given,
    which must exist and hold Parquet files with :data:`IMPRESSION_COLUMNS` (:class:`InputError` naming it)."""
    if setting == "none":
        return None
    uri = setting or beside_logs(input_uri)
    if not uri:
        return None
    fs, root = resolve_filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise InputError(f"prepare.impressions: {uri} not found (give a Parquet file/dir/URI of impressions, "
                         '"none" to read none, or "" for <sim>/impressions beside <sim>/logs)')
    try:
        fs, files = list_input_files(uri, "parquet")
    except InputError as e:
        raise InputError(f"prepare.impressions: {e}") from None
    _check_columns(fs, files[0])
    return Impressions(uri, fs, files)


def beside_logs(input_uri: str) -> str:
    """``<sim>/impressions`` for an input ``<sim>/logs`` (``<sim>/impressions/day=X`` for ``<sim>/logs/day=X``,
    one day of daily retraining) where that directory exists; else ``""``."""
    parts = input_uri.rstrip("/").split("/")
    at = len(parts) - 1 if parts[-1] == LOGS_DIR else len(parts) - 2
    if at < 0 or parts[at] != LOGS_DIR or (at < len(parts) - 1 and "=" not in parts[-1]):
        return ""
    uri = "/".join(parts[:at] + [IMPRESSIONS_DIR] + parts[at + 1:])
    fs, root = resolve_filesystem(uri)
    return uri if fs.get_file_info(root).type == pafs.FileType.Directory else ""


def _check_columns(fs: pafs.FileSystem, f: InputFile) -> None:
    """Refuse impressions without the columns a slate needs (the first file's footer; cheap)."""
    try:
        with fs.open_input_file(f.path) as fh:
            names = pq.read_schema(fh).names
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"prepare.impressions: cannot read Parquet {f.display} ({e})") from e
    missing = [c for c in IMPRESSION_COLUMNS if c not in names]
    if missing:
        raise InputError(f"prepare.impressions: {f.display} lacks column(s) {missing}; an impression has "
                         f"{list(IMPRESSION_COLUMNS)} (see EXPOSURE_SCHEMA)")


# ---- Ray Data UDFs ----------------------------------------------------------------------------------------
LENGTH_COUNTS = pa.schema([("length", pa.int32()), ("count", pa.int64())])  # what length_counts yields
REASON_COUNTS = pa.schema([("reason", pa.string()), ("rows", pa.int64()), ("unknown", pa.int64())])  # slate_counts


def length_counts(batch: pa.Table) -> pa.Table:
    """Rows per slate length (null for a null list) of a block of impressions: the driver picks K."""
    g = pa.table({"length": pc.list_value_length(batch.column("items"))}).group_by("length").aggregate(
        [([], "count_all")])
    return pa.table({"length": g.column("length"), "count": g.column("count_all")})


def common_length(counts: pa.Table) -> tuple[int, int]:
    """``(rows, K)``: every row counted, and the most common non-empty slate length (the longer on a tie;
    0 where no slate has items)."""
    t = counts.group_by("length").aggregate([("count", "sum")])
    rows = int(pc.sum(t.column("count_sum")).as_py() or 0)
    t = t.filter(pc.greater(pc.fill_null(t.column("length"), 0), 0))
    if not t.num_rows:
        return rows, 0
    best = t.sort_by([("count_sum", "descending"), ("length", "descending")])
    return rows, int(best.column("length")[0].as_py())


def _cast(batch: pa.Table, name: str, typ: pa.DataType) -> pa.Array:
    """Column ``name`` as ``typ``, or :class:`InputError` naming the file (ids of the other id type)."""
    col = batch.column(name).combine_chunks()
    try:
        return col.cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        where = batch.column("path")[0].as_py() if "path" in batch.column_names and batch.num_rows else "?"
        raise InputError(f"prepare.impressions {where}: column {name} ({col.type}) cannot be read as {typ} "
                         f"(prepare.id_type must match the impressions' ids): {e}") from e


def _first_reason(n: int, checks: list) -> np.ndarray:
    """Object array of the first reason whose mask fires on each row (None = kept)."""
    reason = np.full(n, None, dtype=object)
    for mask, code in checks:
        reason[np.equal(reason, None) & np.asarray(mask, dtype=bool)] = code
    return reason


def index_slates(batch: pa.Table, *, vocab, slate_len: int, id_type: str) -> pa.Table:
    """One row per impression: the slate in vocab indices (``user_idx``, ``slate_items`` [K], ``click_index``
    int8; -1 / zeros on refused rows), the ``reject_reason`` (null = kept), the raw columns (``user_id``,
    ``slate_id``, ``items``, ``click_raw``), ``source_file`` and ``_unknown`` (slate positions mapped to 0)."""
    v = resolve_broadcast(vocab)
    raw = pa.string() if id_type == "string" else pa.int64()
    users, items = _cast(batch, "user_id", raw), _cast(batch, "items", pa.list_(raw))
    slate, click = _cast(batch, "slate_id", pa.int64()), _cast(batch, "click_index", pa.int64())
    n, k = batch.num_rows, slate_len
    lens = pc.fill_null(pc.list_value_length(items), 0).to_numpy(zero_copy_only=False)
    flat_null = pc.is_null(pc.list_flatten(items)).to_numpy(zero_copy_only=False)
    null_inside = np.bincount(pc.list_parent_indices(items).to_numpy(), weights=flat_null, minlength=n) > 0
    user_null = users.is_null().to_numpy(zero_copy_only=False)
    user_idx = np.full(n, -1, dtype=np.int64)
    user_idx[~user_null] = v.user_index(as_raw_ids(users.filter(pa.array(~user_null))))
    c = pc.fill_null(click, -2).to_numpy(zero_copy_only=False)
    reason = _first_reason(n, [
        (user_null, MISSING_USER),
        (pc.fill_null(pc.less(slate, 0), True).to_numpy(zero_copy_only=False), MISSING_SLATE),
        ((lens == 0) | null_inside, MISSING_ITEMS),
        (lens != k, BAD_LENGTH),
        ((c < -1) | (c >= min(k, 128)), BAD_CLICK),
        (user_idx < 0, UNKNOWN_USER),
    ])
    ok = np.equal(reason, None)
    slate_items = np.zeros((n, k), dtype=np.int64)
    if ok.any():
        slate_items[ok] = v.item_index(as_raw_ids(pc.list_flatten(items.filter(pa.array(ok))))).reshape(-1, k)
    return pa.table({
        "user_idx": user_idx, "slate_id": slate, "slate_items": list_array(slate_items, k, pa.int64()),
        "click_index": np.where(ok, c, -1).astype(np.int8), REASON_COLUMN: pa.array(reason, pa.string()),
        "user_id": users, "items": items, "click_raw": click,
        SOURCE_COLUMN: batch.column("path") if "path" in batch.column_names else pa.nulls(n, pa.string()),
        "_unknown": (slate_items == 0).sum(1) * ok,
    })


def refuse_duplicates(block: pa.Table) -> pa.Table:
    """Over a block holding whole users: of kept rows sharing ``(user_idx, slate_id)`` the one from the first
    source file stays (of copies in one file, any one) and the others become ``impression_duplicate_slate``:
    the training side joins transitions to slates on that key, and a key seen twice would copy a transition."""
    reason = block.column(REASON_COLUMN).to_numpy(zero_copy_only=False).astype(object)
    kept = np.flatnonzero(np.equal(reason, None))
    if kept.size < 2:
        return block
    keys = block.select(["user_idx", "slate_id", SOURCE_COLUMN]).take(pa.array(kept))
    order = pc.sort_indices(keys, sort_keys=[("user_idx", "ascending"), ("slate_id", "ascending"),
                                             (SOURCE_COLUMN, "ascending")]).to_numpy()  # stable
    u, s = (keys.column(c).to_numpy()[order] for c in ("user_idx", "slate_id"))
    again = np.concatenate([[False], (u[1:] == u[:-1]) & (s[1:] == s[:-1])])
    if not again.any():
        return block
    reason[kept[order[again]]] = DUPLICATE
    unknown = np.where(np.equal(reason, None), block.column("_unknown").to_numpy(), 0)
    block = block.set_column(block.schema.get_field_index(REASON_COLUMN), REASON_COLUMN, pa.array(reason, pa.string()))
    return block.set_column(block.schema.get_field_index("_unknown"), "_unknown", pa.array(unknown))


def slate_counts(block: pa.Table) -> pa.Table:
    """Rows per reason (null = kept) and the kept rows' slate positions mapped to 0, of one block."""
    t = pa.table({"reason": block.column(REASON_COLUMN), "unknown": block.column("_unknown")})
    g = t.group_by("reason").aggregate([([], "count_all"), ("unknown", "sum")])
    return pa.table({"reason": g.column("reason"), "rows": g.column("count_all"), "unknown": g.column("unknown_sum")})


def slate_rows(batch: pa.Table) -> pa.Table:
    """The ``slates/`` rows of kept impressions."""
    return batch.select(SLATE_SCHEMA.names).cast(SLATE_SCHEMA)


def reject_rows(batch: pa.Table) -> pa.Table:
    """The ``slates_rejects/`` rows: the impression as read, its reason and file."""
    t = batch.select(["user_id", "slate_id", "items", "click_raw", REASON_COLUMN, SOURCE_COLUMN])
    return t.rename_columns(["user_id", "slate_id", "items", "click_index", REASON_COLUMN, SOURCE_COLUMN])


def clicked_keys(batch: pa.Table, *, side: int) -> pa.Table:
    """``(user_idx, slate_id, item, side)`` of transitions (``side`` 0, item = the action) or of slates (1,
    item = the clicked item; 0 where none): the two halves of :func:`match_counts`."""
    n = batch.num_rows
    if side == 0:
        item = batch.column("action").to_numpy()
    else:
        click = batch.column("click_index").to_numpy().astype(np.int64)
        shown = pc.list_flatten(batch.column("slate_items")).to_numpy().reshape(n, -1) if n else np.zeros((0, 1))
        item = np.where(click >= 0, shown[np.arange(n), np.maximum(click, 0)], 0)
    return pa.table({"user_idx": batch.column("user_idx"), "slate_id": batch.column("slate_id"),
                     "item": pa.array(item, pa.int64()), "side": pa.array(np.full(n, side, np.int8))})


MATCH_COUNTS = ("transitions_with_slate_id", "transitions_in_slates", "slates_with_click_in_transitions",
                "click_matches_action")


def match_counts(block: pa.Table) -> pa.Table:
    """Over a block holding whole users of both halves (:func:`clicked_keys`): the transitions naming a slate,
    those whose slate was written, the slates some transition names, and the transitions whose action is
    their slate's clicked item (a check that the events and the impressions tell the same story)."""
    side = block.column("side")
    tr = block.filter(pc.equal(side, 0)).select(["user_idx", "slate_id", "item"])
    sl = block.filter(pc.equal(side, 1)).select(["user_idx", "slate_id", "item"]).rename_columns(
        ["user_idx", "slate_id", "clicked"])
    j = tr.join(sl, ["user_idx", "slate_id"], join_type="inner")
    agree = int(pc.sum(pc.equal(j.column("item"), j.column("clicked"))).as_py() or 0) if j.num_rows else 0
    slates = j.group_by(["user_idx", "slate_id"]).aggregate([]).num_rows
    return pa.table({c: pa.array([v], pa.int64()) for c, v in zip(MATCH_COUNTS, (tr.num_rows, j.num_rows, slates,
                                                                                  agree))})


# ---- the driver -------------------------------------------------------------------------------------------
# Impression files up to this many bytes in all are read by the driver with pyarrow: Ray Data's Parquet read
# lists the files in a task with footer-reader actors first (1.2-4.5 s for 5,000 slates on a 2-core box,
# against 0.05 s here).
DRIVER_READ_BYTES = 32 * 2**20


def _read_impressions(imp: Impressions):
    """The impressions as a Ray Dataset of :data:`IMPRESSION_COLUMNS` plus ``path`` (the file each row came
    from, as Ray Data's ``include_paths`` names it)."""
    import ray.data

    if sum(f.size for f in imp.files) > DRIVER_READ_BYTES:
        return ray.data.read_parquet([f.path for f in imp.files], filesystem=imp.fs, partitioning=None,
                                     include_paths=True).select_columns([*IMPRESSION_COLUMNS, "path"])
    tables = []
    for f in imp.files:
        t = pq.read_table(f.path, filesystem=imp.fs, columns=list(IMPRESSION_COLUMNS), partitioning=None)
        tables.append(t.append_column("path", pa.array([f.path] * t.num_rows, pa.string())))
    # one block per file, each with its own schema, as Ray Data's reader gives: a file whose ids have the
    # wrong type is named by the per-block checks that follow
    return ray.data.from_arrow(tables)


def write_slates(imp: Impressions, vocab_ref, cfg, fs_out: pafs.FileSystem, out_root: str, transitions,
                 num_transitions: int) -> dict:
    """Read ``imp``, write ``slates/`` and ``slates_rejects/`` under ``out_root``, check the accounting; the
    manifest's ``slates`` entry.  ``vocab_ref``: the run's :class:`~mtrec_dist.data.vocab.Vocab` (broadcast);
    ``transitions``: the run's transitions (a Ray dataset of ``TRANSITION_SCHEMA`` rows, ``num_transitions``
    of them), matched to the slates for the entry's :data:`MATCH_COUNTS`."""
    import ray
    from ray.data.expressions import col

    udf = dict(batch_size=None, batch_format="pyarrow")
    # read once (each Parquet read costs seconds of planning): K from the lengths, then the slates
    raw = _read_impressions(imp).materialize()
    rows_in, k = common_length(_gather(raw.map_batches(length_counts, **udf), LENGTH_COUNTS))
    ds = raw.map_batches(index_slates, fn_kwargs=dict(vocab=vocab_ref, slate_len=k, id_type=cfg.id_type), **udf)
    ds = whole_user_blocks(ds, "user_idx", rows_in, cfg)[0].map_batches(refuse_duplicates, **udf).materialize()
    rows_ok, unknown, rejects = _reasons(_gather(ds.map_batches(slate_counts, **udf), REASON_COUNTS))
    kept = ds.filter(expr=col(REASON_COLUMN).is_null())
    shard = dict(min_rows_per_file=cfg.rows_per_shard, max_rows_per_file=cfg.rows_per_shard)
    for sub, part, rows, n in ((SLATES_DIR, kept, slate_rows, rows_ok),
                               (SLATE_REJECTS_DIR, ds.filter(expr=col(REASON_COLUMN).is_not_null()), reject_rows,
                                sum(rejects.values()))):
        if n:
            part.map_batches(rows, **udf).write_parquet(join_path(out_root, sub), filesystem=fs_out, **shard)
    entry = _account(imp.uri, rows_in, rows_ok, rejects, fs_out, out_root)
    entry.update(slate_len=k, items_unknown=unknown, items_unknown_share=round(unknown / max(rows_ok * k, 1), 6))
    matched = _matches(kept, transitions, rows_ok + num_transitions, cfg) if num_transitions else {}
    entry.update({c: matched.get(c, 0) for c in MATCH_COUNTS})
    return entry


def _gather(ds, schema: pa.Schema) -> pa.Table:
    """The small per-block count tables of ``ds`` (a Ray dataset) concatenated in the driver."""
    import ray

    tables = [t.cast(schema) for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _reasons(counts: pa.Table) -> tuple[int, int, dict]:
    """``(rows kept, their slate positions mapped to 0, {reason: rows refused})`` summed over the blocks."""
    t = counts.group_by("reason").aggregate([("rows", "sum"), ("unknown", "sum")])
    by = {r: (int(n), int(u)) for r, n, u in zip(*(t.column(c).to_pylist() for c in ("reason", "rows_sum",
                                                                                      "unknown_sum")))}
    rows_ok, unknown = by.pop(None, (0, 0))
    return rows_ok, unknown, dict(sorted((r, n) for r, (n, _) in by.items()))


def _account(uri: str, rows_in: int, rows_ok: int, rejects: dict, fs_out, out_root: str) -> dict:
    """rows in = kept + refused as counted = slates + rejects written (Parquet footers), or AccountingError."""
    rows_rejected = sum(rejects.values())
    shards = {sub: list_shards(fs_out, out_root, sub) for sub in (SLATES_DIR, SLATE_REJECTS_DIR)}
    written = [sum(s["rows"] for s in shards[sub]) for sub in (SLATES_DIR, SLATE_REJECTS_DIR)]
    if rows_in != rows_ok + rows_rejected or written != [rows_ok, rows_rejected]:
        raise AccountingError(f"impressions: {rows_in} rows in, {rows_ok} kept + {rows_rejected} refused, "
                              f"{written[0]} slates + {written[1]} rejects written")
    return dict(input=uri, rows_in=rows_in, rows_ok=rows_ok, rows_rejected=rows_rejected, rejects_by_reason=rejects,
                shards=shards)


def _matches(kept, transitions, rows: int, cfg) -> dict:
    """:data:`MATCH_COUNTS` of the transitions against the kept slates, hash-joined per user (``rows``: how many
    rows the two hold, which sizes the shuffle)."""
    from ray.data.expressions import col

    udf = dict(batch_size=None, batch_format="pyarrow")
    both = transitions.filter(expr=col("slate_id") != NO_SLATE).map_batches(
        clicked_keys, fn_kwargs=dict(side=0), **udf).union(kept.map_batches(clicked_keys, fn_kwargs=dict(side=1),
                                                                            **udf))
    counts = _gather(whole_user_blocks(both, "user_idx", rows, cfg)[0].map_batches(match_counts, **udf),
                     pa.schema([(c, pa.int64()) for c in MATCH_COUNTS]))
    return {c: int(pc.sum(counts.column(c)).as_py() or 0) for c in MATCH_COUNTS}


def summary_line(entry: dict) -> str:
    """The ``slates: ...`` line of a manifest's ``slates`` entry (`mtrec prepare`, `mtrec inspect`)."""
    return (f"slates: {entry['rows_in']:,} impressions in = {entry['rows_ok']:,} ok + "
            f"{entry['rows_rejected']:,} rejected ({entry['rejects_by_reason']}); "
            f"{entry['items_unknown_share']:.1%} of slate items unknown; slate length {entry['slate_len']}; "
            f"{entry['transitions_in_slates']:,} of {entry['transitions_with_slate_id']:,} transitions with a "
            f"slate_id find it in slates/")
