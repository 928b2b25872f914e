"""Daily retraining (`mtrec retrain`): one new day of logs on top of the previous run, as a new version.

    retrain_day(cfg, "<logs>/day=2026-01-02", out_root)        # previous = newest earlier version

Each call writes one **versioned run** ``<out_root>/v<NNNN>-<YYYY-MM-DD>/`` with the pipeline's layout::

    prepared/   only the new day's transitions (+ eval/, rejects/, the *extended* vocab/, manifest.json)
    carry/      users.parquet: every user's last L engaged items (raw ids) + feedback after this day
    reward/     the reward model, warm-started from the previous version's (reward_model.json)
    rewards/    scored transitions (only when a guided recommender needs them)
    rec/<backbone>-<guidance>/   each recommender, warm-started from the previous version's same model
    retrain.json   what was done: inputs, fingerprint, row accounting, vocab growth, checkpoints, timings

and ``<out_root>/versions.json`` (every complete version, oldest first, and ``latest``).

What carries across the day boundary:

* **states**: the new day is prepared alone, but each user's first states start from the previous run's
  ``carry/`` (their last L items across days), so no old event is re-read or re-emitted as a transition;
* **ID dictionaries**: the previous vocab is extended (old indices kept, new item/user ids appended), so
  old embedding rows keep their meaning;
* **row ids**: the new day's ``row_id`` start at the previous run's ``next_row_id``: unique across days;
* **models**: both models are warm-started (:func:`mtrec_dist.training.checkpoint.warm_start_module`):
  dense weights and the old item rows copied, new item rows freshly initialised; optimizer state, step and
  epoch start fresh.  A model whose architecture/objective config changed since the previous run (anything
  in its ``model_spec`` but the catalog size) is trained cold, and ``retrain.json`` says why.

The previous run is the newest complete version with an earlier day (``previous="auto"``), an explicit
run directory (a version, or a ``mtrec pipeline`` run dir: its carry-over is then derived from its
prepared data), or ``"none"`` (bootstrap a chain from the first day, cold).

Idempotency: the version's name depends only on the previous version and the day, so re-running the same
day never adds a version.  If that version is complete and its fingerprint (input files and sizes, the
previous run, the config) matches, the call returns it unchanged (``reused: True``); otherwise (``force``,
an interrupted attempt, changed inputs) the version directory is deleted and rebuilt from the same
previous run, so its events are counted once.  Re-running a day that later versions were built on is
refused (it would fork the chain).  ``out_root`` must be a local (or NFS) path.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from mtrec_dist.config import PipelineConfig, dump_config
from mtrec_dist.layout import RETRAIN_FILE as RUN_FILE, VERSIONS_FILE as INDEX_FILE, RunLayout, rec_name
from mtrec_dist.stages import (
    RunContext, StageRunner, model_stages, now_utc as _now, prepare_stage, rec_stage_name, rec_variants,
    say_stderr as _say,
)

VERSION_RE = re.compile(r"^v(\d{4,})-(\d{4}-\d{2}-\d{2})$")


class RetrainError(ValueError):
    """The request is inconsistent with the existing runs (a day already covered, a forked chain, ...)."""


def version_name(version: int, day: str) -> str:
    return f"v{version:04d}-{day}"


def list_versions(out_root: str, complete_only: bool = True) -> List[Dict[str, Any]]:
    """Versions under ``out_root``, oldest first: ``{"name", "version", "day", "run_dir", "status", ...}``
    (the version's ``retrain.json`` when it has one)."""
    root = Path(out_root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = VERSION_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        info: Dict[str, Any] = {}
        if (d / RUN_FILE).exists():
            try:
                info = json.loads((d / RUN_FILE).read_text())
            except json.JSONDecodeError:
                info = {}
        status = info.get("status", "incomplete")
        if complete_only and status != "complete":
            continue
        out.append({**info, "name": d.name, "version": int(m.group(1)), "day": m.group(2), "run_dir": str(d),
                    "status": status})
    out.sort(key=lambda v: v["version"])
    return out


def input_day(new_logs: str, fmt: str, day: Optional[str] = None) -> tuple[str, str, list]:
    """(input uri, day, files) of one day's log partition.

    ``new_logs`` is the partition (``.../day=YYYY-MM-DD``) or, with ``day``, the logs root holding it.
    Every file must lie in that one day's partition.
    """
    from mtrec_dist.data import readers as rd

    uri = new_logs
    if day is not None:
        dt.date.fromisoformat(day)
        fs, root = rd.resolve_filesystem(new_logs)
        import pyarrow.fs as pafs

        sub = rd.join_path(root, f"day={day}")
        if rd.partition_day(root) != day and fs.get_file_info(sub).type == pafs.FileType.Directory:
            uri = new_logs.rstrip("/") + f"/day={day}"
    _, files = rd.list_input_files(uri, fmt)
    days = sorted({f.partition_day or "" for f in files})
    if "" in days:
        raise RetrainError(f"{uri}: file(s) outside a day=YYYY-MM-DD partition (e.g. "
                           f"{next(f.display for f in files if not f.partition_day)}); retrain takes one day's "
                           "partition")
    if len(days) != 1:
        raise RetrainError(f"{uri} holds {len(days)} day partitions ({days[0]} .. {days[-1]}); retrain takes one "
                           "day at a time: pass <logs>/day=YYYY-MM-DD or --day")
    if day is not None and days[0] != day:
        raise RetrainError(f"{uri} holds day {days[0]}, not {day}")
    return uri, days[0], files


def describe_run(run_dir: str) -> Dict[str, Any]:
    """What a previous run provides: days covered, prepared data, carry-over, next row id, checkpoints.

    ``run_dir`` is a retrain version or a `mtrec pipeline` run directory."""
    from mtrec_dist.data.prepare import MANIFEST_FILE, load_manifest
    from mtrec_dist.training.recommender import POINTER_FILE
    from mtrec_dist.training.reward import LATEST_POINTER

    d = Path(run_dir).resolve()
    layout = RunLayout(str(d))
    prepared = Path(layout.prepared)
    if not (prepared / MANIFEST_FILE).exists():
        raise RetrainError(f"previous run {d} has no {prepared.name}/{MANIFEST_FILE} (not a pipeline or retrain run)")
    manifest = load_manifest(str(prepared), any_version=True)
    info = json.loads((d / RUN_FILE).read_text()) if (d / RUN_FILE).exists() else {}
    if info and info.get("status") != "complete":
        raise RetrainError(f"previous run {d} is incomplete ({RUN_FILE} status {info.get('status')!r}); re-run "
                           "its day first")
    days = info.get("days") or sorted({s.get("partition_day") for s in manifest.get("source_files", [])
                                       if s.get("partition_day")})
    if not days:
        raise RetrainError(f"previous run {d}: its input has no day=YYYY-MM-DD partitions, so the day boundary "
                           "is unknown")
    m = VERSION_RE.match(d.name)
    reward_ptr = Path(layout.reward) / LATEST_POINTER
    rec_root = Path(layout.rec_root)
    recs = {}
    for p in sorted(rec_root.glob(f"*/{POINTER_FILE}")) if rec_root.is_dir() else []:
        recs[p.parent.name] = json.loads(p.read_text())["checkpoint_path"]
    return {
        "run_dir": str(d),
        "version": int(m.group(1)) if (m and info) else 0,
        "days": list(days),
        "prepared": str(prepared),
        "carry": layout.carry if Path(layout.carry).is_dir() else None,
        "state_len": int(manifest["state_len"]),
        "num_items": int(manifest["num_items"]),
        "num_users": int(manifest["num_users"]),
        "next_row_id": int(manifest.get("next_row_id", manifest.get("row_id_offset", 0) + manifest["rows_in"])),
        "reward_checkpoint": json.loads(reward_ptr.read_text())["checkpoint_path"] if reward_ptr.exists() else None,
        "rec_checkpoints": recs,
        "completed_at": info.get("completed_at") or manifest.get("created_at"),
        "previous": info.get("previous"),
        "schema_version": manifest.get("schema_version"),
    }


def reward_history(prev: Optional[Dict[str, Any]], cfg: PipelineConfig) -> List[str]:
    """Prepared data of the days before the new one whose return labels the new day can still complete:
    ``ceil(prepare.return_window_s / 1 day)`` of them, newest first, along the chain of previous runs
    (none when the reward does not read returns, or where a run's data predate return labels)."""
    from mtrec_dist.data.schema import SCHEMA_VERSION

    if cfg.reward.objective != "v2" or "return" not in cfg.reward.consequences:
        return []
    days = -(-cfg.prepare.return_window_s // 86400)
    out: List[str] = []
    run = prev
    while run is not None and len(out) < days and run.get("schema_version") == SCHEMA_VERSION:
        out.append(run["prepared"])
        run = describe_run(run["previous"]) if run.get("previous") else None
    return out


def _fingerprint(cfg: PipelineConfig, files: list, prev: Optional[Dict[str, Any]]) -> str:
    from mtrec_dist.training.checkpoint import config_hash

    conf = cfg.to_dict()
    conf.pop("run_dir", None)
    for k in ("progress",):
        conf["prepare"].pop(k, None)
    conf["eval"].pop("max_ranked_rows", None)  # offline ranking only, which retraining does not run
    for k in ("reward_train", "rec_train"):  # unset budgets leave the fingerprints of older versions unchanged
        if not any(v is not None for v in conf[k].values()):
            conf.pop(k)
    return config_hash({"input": [[f.display, f.size] for f in files],
                        "previous": [prev["run_dir"], prev["completed_at"]] if prev else None, "config": conf})


def _warm_source(prev_ckpt: Optional[str], new_spec: Dict[str, Any]) -> tuple[Optional[str], str]:
    """(checkpoint to warm-start from or None, why) for a model of ``new_spec``."""
    from mtrec_dist.training.checkpoint import read_checkpoint_meta

    if not prev_ckpt:
        return None, "no previous checkpoint of this model"
    old = read_checkpoint_meta(prev_ckpt).get("model_spec") or {}
    diff = sorted(k for k in set(old) | set(new_spec) if k != "num_items" and old.get(k) != new_spec.get(k))
    if diff:
        return None, f"model_spec changed since the previous run ({', '.join(diff)}): trained cold"
    if int(old.get("num_items", 0)) > int(new_spec["num_items"]):
        return None, "the catalog shrank: trained cold"
    return prev_ckpt, f"warm start from {prev_ckpt}"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def _previous_run(versions: List[Dict[str, Any]], previous: Optional[str], new_day: str,
                  cfg: PipelineConfig) -> Optional[Dict[str, Any]]:
    """The run the new day builds on (``None``: bootstrap), checked to be earlier and compatible."""
    if previous in (None, "auto"):
        earlier = [v for v in versions if v["status"] == "complete" and v["day"] < new_day]
        prev = describe_run(earlier[-1]["run_dir"]) if earlier else None
    elif previous == "none":
        prev = None
    else:
        prev = describe_run(previous)
    if prev is not None and new_day <= max(prev["days"]):
        raise RetrainError(f"day {new_day} is not after the previous run's days ({prev['days'][0]} .. "
                           f"{prev['days'][-1]}, {prev['run_dir']}): its events would be used twice")
    if prev is not None and prev["state_len"] != cfg.prepare.state_len:
        raise RetrainError(f"prepare.state_len is {cfg.prepare.state_len}, the previous run used {prev['state_len']}")
    return prev


def _new_version(versions: List[Dict[str, Any]], prev: Optional[Dict[str, Any]], new_day: str) -> tuple[int, str]:
    """(number, name) of the version to write; refused when a version at or after it exists (a fork)."""
    number = (prev["version"] + 1) if prev is not None else 1
    name = version_name(number, new_day)
    clash = [v["name"] for v in versions if v["name"] != name and (v["version"] >= number or v["day"] >= new_day)]
    if clash:
        raise RetrainError(f"cannot write {name}: version(s) {clash} already exist at or after it; re-running an "
                           "older day would fork the chain (retrain days in order, or use a new out_root)")
    return number, name


def _reusable(vdir: Path, name: str, fingerprint: str, force: bool,
              say: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    """The version's ``retrain.json`` when it is complete with the same inputs (and not ``force``), else None."""
    if not (vdir / RUN_FILE).exists() or force:
        return None
    done = json.loads((vdir / RUN_FILE).read_text())
    if done.get("status") == "complete" and done.get("fingerprint") == fingerprint:
        say(f"[retrain] {name} is already complete with the same inputs: reused")
        return done
    say(f"[retrain] {name} exists ({done.get('status')}, fingerprint "
        f"{'same' if done.get('fingerprint') == fingerprint else 'different'}): rebuilding it")
    return None


def _fresh_version_dir(cfg: PipelineConfig, vdir: Path, name: str) -> PipelineConfig:
    """Empty ``vdir`` and write its config: the run's own, with Ray Train storage in a per-version folder."""
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    run_cfg = dataclasses.replace(
        cfg, run_dir=str(vdir),
        train=dataclasses.replace(cfg.train, storage_path=(cfg.train.storage_path.rstrip("/") + "/" + name)
                                  if cfg.train.storage_path else ""))
    dump_config(run_cfg, RunLayout(str(vdir)).config_yaml)
    return run_cfg


def _completed_fields(done: Dict[str, Any], prev: Optional[Dict[str, Any]], cfg: PipelineConfig,
                      timings: Dict[str, Any]) -> Dict[str, Any]:
    """What ``retrain.json`` adds once the stages are done: rows, row ids, vocab growth, carry-over, models."""
    from mtrec_dist.data.prepare import load_carry

    manifest = done["prepare"]["manifest"]
    carry_in = done["prepare"]["setup"].get("carry_in")
    carried_users = int(load_carry(carry_in, cfg.prepare.state_len).num_rows) if carry_in else 0
    reward = done["train-reward"]
    recs = [_rec_record(rec_name(b, g), done[rec_stage_name(b, g)]) for b, g in rec_variants(cfg)]
    old_items = prev["num_items"] if prev else 0
    old_users = prev["num_users"] if prev else 0
    return {
        "status": "complete",
        "completed_at": _now(),
        "rows": {k: manifest[k] for k in ("rows_in", "rows_ok", "rows_rejected", "num_transitions",
                                          "rows_not_engaged")},
        "row_ids": [manifest.get("row_id_offset", 0), manifest.get("next_row_id", manifest["rows_in"])],
        "vocab": {"items_before": old_items, "items": manifest["num_items"], "new_items": manifest["num_items"] - old_items,
                  "users_before": old_users, "users": manifest["num_users"], "new_users": manifest["num_users"] - old_users},
        "carry": {"input": carry_in, "users_in": carried_users, **(manifest.get("carry") or {})},
        "reward": {"checkpoint_path": reward["checkpoint_path"], "warm_start": reward["warm_start"],
                   "warm_start_reason": reward["warm_start_reason"], "metrics": _numbers(reward["metrics"]),
                   # the earlier days it read for their completed return labels, and the rows with one
                   "earlier_prepared": reward.get("earlier_prepared", []),
                   "rows": reward.get("rows", manifest["num_transitions"]), "train_rows": reward.get("train_rows"),
                   "return_known_rows": reward.get("return_known_rows")},
        "recommenders": recs,
        "timings_s": timings,
    }


def _write_index(out_root: str) -> None:
    """``<out_root>/index.json``: the complete versions, oldest first, and the latest one."""
    complete = list_versions(out_root)
    _write_json(Path(out_root) / INDEX_FILE, {
        "versions": [{k: v.get(k) for k in ("name", "version", "day", "run_dir", "completed_at")} for v in complete],
        "latest": complete[-1]["name"] if complete else None})


def retrain_day(cfg: PipelineConfig, new_logs: str, out_root: str, previous: Optional[str] = "auto", *,
                day: Optional[str] = None, force: bool = False, progress: bool = True,
                say: Callable[[str], None] = _say) -> Dict[str, Any]:
    """Prepare one new day on top of ``previous``, warm-start both models, write ``<out_root>/vNNNN-<day>/``.

    ``previous``: ``"auto"``/``None`` (the newest complete version under ``out_root`` with an earlier day;
    none = bootstrap), ``"none"`` (bootstrap: cold models, fresh vocab) or a run directory.  Returns the
    version's ``retrain.json`` content plus ``reused`` (True when an identical complete version existed).
    """
    from mtrec_dist.runtime import init_ray

    cfg.validate()
    t_all = time.time()
    out_root = os.path.abspath(out_root)
    if "://" in out_root:
        raise RetrainError("retrain: out_root must be a local (or NFS) directory")
    os.makedirs(out_root, exist_ok=True)
    input_uri, new_day, files = input_day(new_logs, cfg.prepare.format, day)
    versions = list_versions(out_root, complete_only=False)
    prev = _previous_run(versions, previous, new_day, cfg)
    number, name = _new_version(versions, prev, new_day)
    vdir = Path(out_root) / name
    fingerprint = _fingerprint(cfg, files, prev)
    reused = _reusable(vdir, name, fingerprint, force, say)
    if reused is not None:
        return {**reused, "reused": True}

    run_cfg = _fresh_version_dir(cfg, vdir, name)
    summary: Dict[str, Any] = {
        "status": "running", "name": name, "version": number, "day": new_day,
        "days": (prev["days"] if prev else []) + [new_day], "input": input_uri,
        "input_files": [dict(path=f.display, bytes=f.size) for f in files],
        "previous": prev["run_dir"] if prev else None, "fingerprint": fingerprint,
        "started_at": _now(),
    }
    _write_json(vdir / RUN_FILE, summary)
    init_ray(cfg.ray_address, log_to_driver=False)
    say(f"[retrain] {name}: day {new_day} on top of {prev['run_dir'] if prev else 'nothing (bootstrap)'}")
    ctx = RunContext(run_cfg, progress=progress, say=say, tag="retrain")
    runner = StageRunner(ctx)
    done = runner.run(_retrain_stages(ctx, cfg, input_uri, prev))
    timings = {**runner.timings, "total": round(time.time() - t_all, 1)}
    summary.update(_completed_fields(done, prev, cfg, timings))
    _write_json(vdir / RUN_FILE, summary)
    _write_index(out_root)
    say(f"[retrain] {name} complete in {timings['total']}s: {done['prepare']['manifest']['num_transitions']:,} "
        f"transitions, {summary['vocab']['new_items']} new items, {summary['vocab']['new_users']} new users")
    return {**summary, "reused": False}


def _retrain_stages(ctx: RunContext, cfg: PipelineConfig, input_uri: str, prev: Optional[Dict[str, Any]]) -> list:
    """prepare (the new partition alone, carrying states, vocab and row ids over) -> the model stages, each
    model warm-started from the previous version's same model (:func:`_warm_source`)."""
    from mtrec_dist.data.prepare import VOCAB_DIR

    layout = ctx.layout

    def setup() -> Dict[str, Any]:
        carry_in = None
        if prev is not None:
            carry_in = prev["carry"] or _carry_from_pipeline_run(prev, layout.carry_previous)
        return {"vocab_dir": str(Path(prev["prepared"]) / VOCAB_DIR) if prev else None, "carry_in": carry_in,
                "carry_out": layout.carry, "row_id_offset": prev["next_row_id"] if prev else 0}

    def warm(key: str, spec: Dict[str, Any]) -> tuple[Optional[str], str]:
        old = (prev["reward_checkpoint"] if key == "reward" else prev["rec_checkpoints"].get(key)) if prev else None
        return _warm_source(old, spec)

    prep_cfg = dataclasses.replace(cfg.prepare, input="", output="", vocab_dir="")
    return [prepare_stage(ctx, input_uri, layout.prepared, prepare_cfg=prep_cfg, setup=setup),
            *model_stages(ctx, layout.prepared, warm=warm, always_score=False,
                          reward_history=reward_history(prev, cfg))]


def _carry_from_pipeline_run(prev: Dict[str, Any], out: str) -> str:
    """A `mtrec pipeline` run writes no carry-over: derive it from its prepared data into ``out``."""
    from mtrec_dist.data.prepare import load_vocab, save_carry, update_carry

    save_carry(update_carry(None, prev["prepared"], load_vocab(prev["prepared"]), prev["state_len"]), out)
    return out


def _numbers(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _rec_record(key: str, r: Dict[str, Any]) -> Dict[str, Any]:
    """One recommender's entry in retrain.json."""
    return {"name": key, "checkpoint_path": r["checkpoint_path"], "warm_start": r["warm_start"],
            "warm_start_reason": r["warm_start_reason"], "train_rows": r["train_rows"],
            "metrics": _numbers(r["metrics"])}
