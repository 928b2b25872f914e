"""`mtrec bench`'s baselines compute the library's results (issue 9).  No timing assertions here: speed
goals live in the benchmark's report, never in tests.

Fast tier: the plain models give the library's losses (QR-IQL v2 by default, v1, sampled negatives;
SASRec full and sampled softmax), the checksum, the steady-state / breakdown arithmetic, the report and
the command's registration.  Integration (Ray): the pandas prepare writes the library's transitions
and eval rows on logs with rejects in them, and a tiny whole `mtrec bench` run passes every check.
"""
from __future__ import annotations

import functools

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from helpers_training import write_prepared
from mtrec_dist.bench.checksum import transition_checksum
from mtrec_dist.bench.plain_models import check_same_loss, plain_copy
from mtrec_dist.bench.report import append_results, collect_ratios, markdown, training_rows
from mtrec_dist.bench.sizes import QUICK, BenchSizes, bench_config, choose_sizes
from mtrec_dist.bench.steady import steady_state, time_breakdown
from mtrec_dist.bench.train_bench import check_model, library_model
from mtrec_dist.config import PipelineConfig
from mtrec_dist.data.dataset import load_manifest

TINY = BenchSizes(users=40, items=60, days=1, steps=6, report_every=2, warmup_intervals=1)


def tiny_config(**sections) -> PipelineConfig:
    """Small model and batch so each loss check takes milliseconds."""
    cfg = PipelineConfig()
    cfg.model = dataclasses.replace(cfg.model, embedding_dim=8, num_layers=1, num_heads=2)
    cfg.train = dataclasses.replace(cfg.train, batch_size=32)
    for name, fields in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **fields))
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("bench") / "prepared", num_items=40, num_users=20, state_len=4,
                          rows=300)


# ---- same loss on one batch ----------------------------------------------------------------------------

def test_default_reward_objective_is_the_one_benchmarked():
    assert PipelineConfig().reward.objective == "v2"


@pytest.mark.parametrize("reward", [{}, {"num_negatives": 16}, {"objective": "v1"}, {"objective": "v1", "num_negatives": 16}],
                         ids=["v2-full", "v2-sampled", "v1-full", "v1-sampled"])
def test_plain_qriql_gives_the_library_loss(prepared, reward):
    cfg = tiny_config(reward=reward)
    check = check_model("qriql", cfg, TINY, prepared, load_manifest(str(prepared)))
    assert check["max_abs_diff"] == 0.0
    assert check["terms_compared"] >= 8  # the total and every term, not just "loss"
    assert check["library_loss"] == check["plain_loss"] and np.isfinite(check["plain_loss"])


@pytest.mark.parametrize("rec", [{}, {"num_negatives": 16}], ids=["full-softmax", "sampled"])
def test_plain_sasrec_gives_the_library_loss(prepared, rec):
    cfg = tiny_config(rec=rec)
    check = check_model("sasrec", cfg, TINY, prepared, load_manifest(str(prepared)))
    assert check["max_abs_diff"] == 0.0 and check["terms_compared"] >= 3


def test_plain_copy_has_no_torchrec_table_and_the_same_weights(prepared):
    lib = library_model("qriql", bench_config(tiny_config(), TINY), load_manifest(str(prepared)))
    plain = plain_copy(lib)
    assert isinstance(plain.item_embedding.table, torch.nn.Embedding)
    assert "ec" not in dict(plain.named_modules()).get("item_embedding")._modules
    table = lib.item_embedding.ec.embeddings["item_table"].weight
    assert torch.equal(plain.item_embedding.table.weight, table)
    assert lib.item_embedding.ec.embeddings["item_table"].weight is table  # the library model is untouched


def test_loss_check_catches_a_different_model(prepared):
    manifest = load_manifest(str(prepared))
    lib = library_model("sasrec", bench_config(tiny_config(), TINY), manifest)
    plain = plain_copy(lib)
    with torch.no_grad():
        plain.item_embedding.table.weight.add_(0.01 * torch.randn_like(plain.item_embedding.table.weight))
    from mtrec_dist.bench.plain_train import iter_batches, load_transitions

    batch = next(iter_batches(load_transitions(prepared, manifest["state_len"]), 32))
    with pytest.raises(AssertionError, match="plain model"):
        check_same_loss(lib, plain, batch)


# ---- checksum, steady state, report --------------------------------------------------------------------

def _transitions(users, actions, states) -> pa.Table:
    return pa.table({"user_idx": pa.array(users, pa.int64()), "action": pa.array(actions, pa.int64()),
                     "state_items": pa.array(states, pa.list_(pa.int64()))})


def test_checksum_ignores_row_order_and_sees_any_change():
    checksum = functools.partial(transition_checksum, columns=("user_idx", "action", "state_items"))
    t = _transitions([0, 0, 1], [3, 4, 5], [[0, 1], [1, 3], [0, 0]])
    base = checksum(t)
    assert checksum(t.take([2, 0, 1])) == base
    assert checksum(_transitions([0, 0, 1], [3, 4, 5], [[0, 1], [3, 1], [0, 0]])) != base  # state order
    assert checksum(_transitions([0, 1, 1], [3, 4, 5], [[0, 1], [1, 3], [0, 0]])) != base  # a user
    assert checksum(t.slice(0, 2)) != base


def test_steady_state_pools_intervals_after_the_warm_up():
    history = [{"event": "start", "time": 100.0, "worker_entered": 99.0, "setup_s": 1.0}]
    for step, rate, wait in ((10, 100.0, 0.9), (20, 200.0, 0.1), (30, 400.0, 0.2), (30, 400.0, 0.2)):
        history.append({"event": "metrics", "step": step, "interval_rows": 1000, "samples_per_s": rate,
                        "data_wait_frac": wait, "time": 100.0 + step, "loss": 1.0})
    history.append({"event": "end", "time": 135.0, "rows_seen": 3000})
    s = steady_state(history, warmup_intervals=1)  # the repeated final interval counts once
    assert s["samples_per_s"] == pytest.approx(2000 / 7.5)
    assert s["step_time_s"] == pytest.approx(7.5 / 20)
    assert s["data_wait_frac"] == pytest.approx((0.1 * 5 + 0.2 * 2.5) / 7.5)
    b = time_breakdown(history, 90.0, 140.0)
    assert (b["wall_s"], b["launch_s"], b["setup_s"], b["first_interval_s"]) == (50.0, 9.0, 1.0, 10.0)
    assert (b["first_data_wait_s"], b["train_s"], b["final_s"], b["shutdown_s"]) == (9.0, 30.0, 5.0, 5.0)


def test_sizes_refuse_a_run_without_steady_steps():
    assert choose_sizes(True) == QUICK
    assert choose_sizes(True, steps=500).steps == 500
    with pytest.raises(ValueError, match="steady"):
        choose_sizes(True, steps=QUICK.warmup_steps)


def test_bench_config_overrides_the_stage_budgets():
    cfg = PipelineConfig()
    cfg.reward_train = dataclasses.replace(cfg.reward_train, max_steps=7, batch_size=64)
    out = bench_config(cfg, QUICK, workers=2)
    assert out.stage_train("reward").max_steps == QUICK.steps and out.stage_train("reward").batch_size == 64
    assert out.stage_train("rec").num_workers == 2 and out.stage_train("rec").max_steps == QUICK.steps


def _fake_result() -> dict:
    run = {"samples_per_s": 900.0, "step_time_s": 0.3, "data_wait_frac": 0.25, "rows": 2400,
           "end_to_end_samples_per_s": 100.0,
           "breakdown": {"wall_s": 24.0, "launch_s": 10.0, "setup_s": 1.0, "first_interval_s": 3.0,
                         "first_data_wait_s": 2.0, "train_s": 9.0, "final_s": 1.0, "shutdown_s": 2.0}}
    plain = {"samples_per_s": 1000.0, "step_time_s": 0.25, "data_wait_frac": 0.01, "wall_s": 3.0, "read_s": 0.1,
             "build_s": 0.1, "end_to_end_samples_per_s": 800.0}
    model = {"check": {"plain_loss": 1.5, "max_abs_diff": 0.0},
             "runs": {"plain_before": plain, "plain_after": plain, "ray_1": run, "ray_2": dict(run, samples_per_s=1350.0),
                      "ray_1_memory": dict(run, samples_per_s=1000.0)},
             "ratios": {"plain_samples_per_s": 1000.0, "one_worker_vs_plain": 0.9, "one_worker_vs_plain_end_to_end": 0.125,
                        "two_workers_vs_one": 1.5, "streaming_vs_memory": 0.9}}
    return {"command": "mtrec bench --quick", "started": "2026-01-01 00:00 UTC", "total_s": 100.0,
            "load_before": {"1m": 1.0, "5m": 2.0, "15m": 3.0}, "load_after": {"1m": 4.0, "5m": 5.0, "15m": 6.0},
            "machine": {"cores": 2, "torch": "t", "ray": "r", "python": "p", "commit": "abc"},
            "sizes": {**QUICK.__dict__, "warmup_steps": QUICK.warmup_steps}, "world": {"events": 1000},
            "stages": {"prepare": {"events": 1000, "check": {"library": {"transitions": 990, "checksum": "00ff"}},
                                   "library": {"wall_s": 4.0, "stages_s": {"read_validate": 1.0}},
                                   "ratios": {"plain_s": 1.0, "library_vs_plain": 0.25, "plain_read_validate_s": 0.5,
                                              "read_validate_vs_plain": 0.5}},
                       "qriql": model, "sasrec": {"error": "OutputMismatch: x"},
                       "scoring": {"library": {"rows": 1000, "wall_s": 2.0, "rows_per_s": 500.0, "baseline": "full_catalog",
                                               "actors": 1, "scoring_actor_s": 0.5, "rows_per_actor_s": 2000.0},
                                   "plain": {"seconds": 1.0, "rows_per_s": 1000.0},
                                   "check": {"max_abs_diff": {"reward_mean": 0.0}}}}}


def test_report_puts_every_ratio_side_by_side(tmp_path):
    result = _fake_result()
    result["ratios"] = collect_ratios(result)
    keys = [r["key"] for r in result["ratios"]]
    assert keys == ["prepare_library_vs_plain", "prepare_read_validate_vs_plain", "qriql_one_worker_vs_plain", "qriql_two_workers_vs_one", "qriql_streaming_vs_memory",
                    "qriql_one_worker_vs_plain_end_to_end", "sasrec_one_worker_vs_plain", "scoring_vs_training",
                    "scoring_vs_training_end_to_end", "scoring_vs_plain"]
    by_key = {r["key"]: r for r in result["ratios"]}
    assert by_key["qriql_two_workers_vs_one"]["met"] is True and by_key["qriql_one_worker_vs_plain"]["met"] is False
    assert by_key["sasrec_one_worker_vs_plain"]["value"] is None  # a failed check has no ratio
    assert by_key["scoring_vs_training"]["value"] == pytest.approx(2000 / 900)  # steady: rows per scoring second
    assert by_key["scoring_vs_training"]["met"] is True
    assert by_key["scoring_vs_training_end_to_end"]["value"] == pytest.approx(500 / 100)  # wall: start-up included
    assert by_key["qriql_streaming_vs_memory"]["met"] is False  # 900 vs 1,000 samples/s: below 0.95
    text = markdown(result)
    assert "| QR-IQL | 1 worker, fed from memory | 24.0 |" in text
    assert "Load average before 1.0 / 2.0 / 3.0, after 4.0 / 5.0 / 6.0" in text and "**0.90x**" in text
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    append_results(text, results)
    append_results(text, results)
    assert results.read_text().count("## `mtrec bench` runs") == 1
    assert results.read_text().count("### `mtrec bench --quick`") == 2


def test_streamed_over_memory_pairs_whichever_run_was_streamed():
    """The default feed may resolve to memory: the bench then times a streamed run beside it, and the ratio
    divides streamed by held whichever of the two was the default."""
    from mtrec_dist.bench.train_bench import training_ratios

    runs = _fake_result()["stages"]["qriql"]["runs"]
    held = dict(runs, ray_1=dict(runs["ray_1"], feed="memory", samples_per_s=1000.0),
                ray_2=dict(runs["ray_2"], feed="memory"))
    held["ray_1_stream"] = dict(held.pop("ray_1_memory"), feed="stream", samples_per_s=800.0)
    ratios = training_ratios(held)
    assert ratios["streaming_vs_memory"] == pytest.approx(0.8)
    model = {"check": {"plain_loss": 1.5, "max_abs_diff": 0.0}, "runs": held, "ratios": ratios}
    by_key = {r["key"]: r for r in training_rows("qriql", model)}
    assert "800 vs 1,000 samples/s steady (train.feed stream / memory)" in by_key["qriql_streaming_vs_memory"]["detail"]
    assert "(train.feed memory / memory)" in by_key["qriql_two_workers_vs_one"]["detail"]
    # scaling feed for feed: 2 held workers against the held 1-worker run, whichever was the default
    streamed_default = dict(runs, ray_1=dict(runs["ray_1"], feed="stream", samples_per_s=800.0),
                            ray_1_memory=dict(runs["ray_1_memory"], feed="memory", samples_per_s=1000.0),
                            ray_2=dict(runs["ray_2"], feed="memory", samples_per_s=1350.0))
    assert training_ratios(streamed_default)["two_workers_vs_one"] == pytest.approx(1.35)
    assert training_ratios(held)["two_workers_vs_one"] == pytest.approx(1.35)
    result = _fake_result()
    result["stages"]["qriql"] = model
    result["ratios"] = collect_ratios(result)
    text = markdown(result)
    assert "| QR-IQL | 1 worker, train.feed memory | 24.0 |" in text and "| QR-IQL | 1 worker, streamed | 24.0 |" in text


def test_rounds_are_judged_on_their_median():
    from mtrec_dist.bench.rounds import median_ratios, median_round

    assert median_round([0.9, 1.2, 1.0]) == 2 and median_round([1.0]) == 0
    assert median_round([1.1, 0.9, 1.3, 1.0]) == 3  # an even count: the lower of the two middle rounds
    ratios = median_ratios([{"a": 0.9, "b": 2.0}, {"a": 1.2, "b": 1.0}, {"a": 1.0}])
    assert ratios == {"a": 1.0}  # a ratio that a round did not measure has no median


def test_report_shows_every_round_and_judges_the_median():
    """Three rounds of the QR-IQL runs: each training row is its median round's, every round's value listed."""
    from mtrec_dist.bench.train_bench import training_ratios

    result = _fake_result()
    model = result["stages"]["qriql"]
    rounds = []
    for speed in (1100.0, 900.0, 1000.0):  # 1 worker / plain: 1.10, 0.90, 1.00
        runs = dict(model["runs"], ray_1=dict(model["runs"]["ray_1"], samples_per_s=speed))
        rounds.append({"runs": runs, "ratios": training_ratios(runs)})
    model.update(runs=rounds[-1]["runs"], rounds=rounds)
    result["sizes"]["rounds"] = 3
    result["ratios"] = collect_ratios(result)
    row = {r["key"]: r for r in result["ratios"]}["qriql_one_worker_vs_plain"]
    assert row["value"] == pytest.approx(1.0) and row["met"] is True
    assert row["detail"].startswith("median of 3 rounds (1.10, 0.90, 1.00); its round: 1,000 vs 1,000 samples/s")
    text = markdown(result)
    assert "3 rounds of each model's runs, each training ratio their median" in text
    assert "Where the time goes (the last round)" in text
    # scoring against training divides by the 1-worker run of the median round: make it a round other than the last
    rounds[1]["runs"]["ray_1"]["samples_per_s"] = 1050.0  # now the median of 1,100 / 1,050 / 1,000
    by_key = {r["key"]: r for r in collect_ratios(result)}
    assert by_key["scoring_vs_training"]["value"] == pytest.approx(2000 / 1050)


def test_bench_is_a_registered_command():
    from mtrec_dist import cli

    args = cli.build_parser().parse_args(["bench", "--quick", "--steps", "80", "--stages", "prepare"])
    assert args.command == "bench" and args.quick and args.steps == 80
    from mtrec_dist.commands.bench import _command_line

    # the command as recorded with the results: a user retyping it runs the same stages
    assert _command_line(args) == "mtrec bench --quick --steps 80 --stages prepare"
    args = cli.build_parser().parse_args(["bench", "--rounds", "3"])
    assert _command_line(args) == "mtrec bench --rounds 3"


# ---- with Ray ---------------------------------------------------------------------------------------------

def _add_rejects(logs: Path) -> None:
    """One more day-partitioned file with what prepare must refuse or skip: a duplicate event, an event
    earlier than its session's previous one, a not-engaged row, a negative item, a missing watch ratio."""
    first = sorted(logs.rglob("*.parquet"))[0]
    t = pq.read_table(first)
    rows = t.slice(0, 5).to_pylist()
    dup = dict(rows[0])
    late = dict(rows[1], item_id=rows[1]["item_id"] + 1, ts=rows[0]["ts"] - 1)
    skipped = dict(rows[2], item_id=rows[2]["item_id"] + 2, ts=rows[2]["ts"] + 1, click=0)
    negative = dict(rows[3], item_id=-5)
    no_watch = dict(rows[4], item_id=rows[4]["item_id"] + 3, ts=rows[4]["ts"] + 2, watch_ratio=None)
    extra = pa.Table.from_pylist([dup, late, skipped, negative, no_watch], schema=t.schema)
    pq.write_table(extra, first.parent / "part-99999.parquet")


@pytest.mark.integration
@pytest.mark.slow
def test_plain_prepare_writes_the_library_transitions(ray_cluster, tmp_path):
    from mtrec_dist.bench.plain_prepare import plain_prepare
    from mtrec_dist.bench.prepare_bench import same_transitions
    from mtrec_dist.bench.checksum import summarize_transitions
    from mtrec_dist.bench.world import prepare_config, simulate_world
    from mtrec_dist.data.prepare import prepare_dataset
    from mtrec_dist.data.schema import TRANSITION_COLUMNS

    base = PipelineConfig()
    world = simulate_world(base, dataclasses.replace(TINY, days=2), tmp_path, say=lambda m: None)
    _add_rejects(world.logs)
    cfg = prepare_config(base)
    manifest = prepare_dataset(cfg, str(world.logs), str(world.prepared), progress=lambda m: None)
    plain = plain_prepare(cfg, world.logs, world.plain_prepared)
    assert manifest["rows_rejected"] >= 3 and plain["rows_rejected"] == manifest["rows_rejected"]
    assert (plain["num_items"], plain["num_users"]) == (manifest["num_items"], manifest["num_users"])
    same_transitions(summarize_transitions(world.prepared), summarize_transitions(world.plain_prepared))
    for sub, cols in (("transitions", TRANSITION_COLUMNS), ("eval", None)):  # every column, not just the checksum's
        lib, pln = (pads.dataset(str(d / sub), format="parquet", ignore_prefixes=["_", "."]).to_table(columns=cols)
                    .sort_by("row_id") for d in (world.prepared, world.plain_prepared))
        assert lib.num_rows == manifest["num_transitions"]
        assert lib.equals(pln), sub


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_bench_run_passes_every_check(ray_cluster, tmp_path):
    """Every stage on tiny sizes with one Ray Train worker: each baseline computes the library's result,
    the result holds every ratio (their values are not asserted) and the report renders."""
    from mtrec_dist.bench.runner import failed_stages, run_bench

    result = run_bench(tiny_config(), TINY, tmp_path / "work", workers=(1,), memory_feed=False, say=lambda m: None)
    assert failed_stages(result) == []
    assert result["stages"]["prepare"]["check"]["library"] == result["stages"]["prepare"]["check"]["plain"]
    for model in ("qriql", "sasrec"):
        assert result["stages"][model]["check"]["max_abs_diff"] == 0.0
        assert set(result["stages"][model]["runs"]) == {"plain_before", "ray_1", "plain_after"}
        assert result["stages"][model]["runs"]["ray_1"]["rows"] == TINY.steps * 32
    assert max(result["stages"]["scoring"]["check"]["max_abs_diff"].values()) <= 1e-4
    assert result["stages"]["scoring"]["library"]["rows_per_actor_s"] > result["stages"]["scoring"]["library"]["rows_per_s"]
    assert len(result["ratios"]) == 9 and all(r["value"] is not None for r in result["ratios"])
    assert {"1m", "5m", "15m"} <= set(result["load_before"]) and result["machine"]["cores"] >= 1
    assert "| prepare: library / plain pandas+pyarrow |" in markdown(result)


def test_catalog_runs_cover_sampled_and_full_soft_values_smallest_first():
    from mtrec_dist.bench.catalog_steps import plan_runs

    assert plan_runs([200, 50], negatives=8, full_max=100) == [(50, 8), (50, 0), (200, 8)]  # no full above full_max


def test_ranks_agree_on_the_steps_that_fit_the_budget():
    from mtrec_dist.bench.catalog_steps import agreed_steps

    assert agreed_steps(0.5, budget_s=10.0, min_steps=3, max_steps=200) == 20
    assert agreed_steps(30.0, budget_s=10.0, min_steps=3, max_steps=200) == 3  # at least min_steps
    assert agreed_steps(1e-6, budget_s=10.0, min_steps=3, max_steps=200) == 200


def test_catalog_run_takes_the_slowest_rank_and_keeps_each_ranks_memory():
    from mtrec_dist.bench.catalog_steps import merge_ranks

    ranks = [{"items": 10, "soft_value": "sampled 8", "rank": r, "step_s_median": 0.1 + r, "steps": 5,
              "warmup_s": 1.0, "peak_rss_mb": 100.0 + r, "shard_rows": 5, "shard_mb": 2.0} for r in range(2)]
    merged = merge_ranks(ranks)
    assert merged["step_s_median"] == 1.1 and merged["workers"] == 2
    assert [k["peak_rss_mb"] for k in merged["ranks"]] == [100.0, 101.0]


@pytest.mark.integration
@pytest.mark.slow
def test_catalog_steps_shard_the_table_over_two_workers(ray_cluster, tmp_path):
    from mtrec_dist.bench.catalog_steps import bench_catalog

    out = bench_catalog(tiny_config(), [50, 200], state_len=4, work=tmp_path, negatives=8, full_max=100,
                        budget_s=0.05, say=lambda m: None)
    assert [(r["items"], r["soft_value"]) for r in out["runs"]] == [
        (50, "sampled 8"), (50, "full catalog"), (200, "sampled 8")]
    for run in out["runs"]:
        assert run["steps"] >= 3 and run["step_s_median"] > 0 and [k["rank"] for k in run["ranks"]] == [0, 1]
        # row-wise: the two shards hold the whole table (items + the padding row), each a part of it
        rows = [k["shard_rows"] for k in run["ranks"]]
        assert sum(rows) == run["items"] + 1 and min(rows) > 0
        assert run["ranks"][0]["shard_mb"] == pytest.approx(rows[0] * 8 * 4 / 2**20)
        assert all(k["peak_reset"] and k["peak_gpu_mb"] is None for k in run["ranks"])
    assert (out["ratios"]["smallest"], out["ratios"]["largest"]) == (50, 200)


def _scale_result() -> dict:
    def prepare(events, library_s, plain_s):
        return {"events": events, "check": {"library": {"transitions": events - 1, "checksum": "ab"}},
                "library": {"wall_s": library_s, "stages_s": {"read_validate": 1.0, "sessionize": 2.0, "write": 3.0}},
                "ratios": {"plain_s": plain_s, "library_vs_plain": plain_s / library_s}}

    ranks = lambda peak: [{"rank": r, "peak_rss_mb": peak + r, "shard_mb": peak / 4, "step_s_median": 0.05} for r in (0, 1)]
    catalog = {"workers": 2, "runs": [
        {"items": 10_000, "soft_value": "sampled 256", "step_s_median": 0.050, "ranks": ranks(400.0)},
        {"items": 10_000, "soft_value": "full catalog", "step_s_median": 0.100, "ranks": ranks(410.0)},
        {"items": 10_000_000, "soft_value": "sampled 256", "step_s_median": 0.060, "ranks": ranks(1200.0)}],
        "ratios": {"sampled_speed_largest_vs_smallest": 0.05 / 0.06, "smallest": 10_000, "largest": 10_000_000}}
    result = _fake_result()
    result["stages"] = {"catalog": catalog, "prepare_scale": {
        "runs": [prepare(1_000_000, 20.0, 4.0), {"error": "X: y"}, prepare(10_000_000, 60.0, 50.0)], "errors": ["X: y"]}}
    return result


def test_scale_report_rows_and_tables():
    from mtrec_dist.bench.report import scale_lines

    result = _scale_result()
    rows = {r["key"]: r for r in collect_ratios(result)}
    assert rows["prepare_scale_library_vs_plain"]["value"] == pytest.approx(50 / 60)
    assert rows["prepare_scale_library_vs_plain"]["met"] is False and "10,000,000 events" in rows[
        "prepare_scale_library_vs_plain"]["label"]
    assert "1 world(s) failed: X: y" in rows["prepare_scale_library_vs_plain"]["detail"]
    assert rows["prepare_scale_linearity"]["value"] == pytest.approx(10 / (60 / 20))  # 10x the events in 3x the time
    assert rows["catalog_sampled_speed"]["met"] is True and "1,200 MiB (shard 300.0)" in rows["catalog_sampled_speed"]["detail"]
    text = "\n".join(scale_lines(result))
    assert "| 10,000,000 | sampled 256 | 60.0 | 1,200 (shard 300.0), 1,201 (shard 300.0) |" in text
    assert "| 10,000,000 | 60.00 | 50.00 | 0.83x |" in text and "| – | failed: X: y |" in text
    small_world = _scale_result()
    small_world["stages"]["prepare_scale"]["runs"].pop()  # the largest world is now 10^6 events: no goal
    assert {r["key"]: r for r in collect_ratios(small_world)}["prepare_scale_library_vs_plain"]["met"] is None


def test_scale_plot_is_drawn_only_when_there_are_curves(tmp_path):
    from mtrec_dist.bench.plots import plot_scale

    path = plot_scale(_scale_result(), tmp_path / "scale.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_scale(_fake_result(), tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_size_lists_name_the_flag_on_bad_input():
    from mtrec_dist.commands.bench import _int_list

    assert _int_list("--prepare-scale", "40000, 400_000") == [40000, 400000]
    with pytest.raises(ValueError, match="--catalog-sizes '1e4'"):
        _int_list("--catalog-sizes", "1e4")
    with pytest.raises(ValueError, match="must be >= 1"):
        _int_list("--prepare-scale", "0")


def test_sharded_scoring_report_puts_each_worker_next_to_its_shard():
    from mtrec_dist.bench.report import sharded_scoring_rows

    key = "model.item_embedding.ec.embeddings.item_table.weight"
    stage = {"items": 999, "rows": 100, "table_mb": 1000.0, "one_actor_peak_rss_mb": 2000.0,
             "runs": {"sharded": {"rows_per_s": 50.0, "baseline": "sampled_1024",
                                  "ranks": [{"peak_rss_mb": 1200.0, "end_rss_mb": 900.0, "shard_sizes": {key: [[500, 32]]}},
                                            {"peak_rss_mb": 1100.0, "end_rss_mb": 800.0,
                                             "shard_sizes": {key: [[500, 32]]}}]},
                      "actors": {"rows_per_s": 100.0}},
             "ratios": {"actor_rss_vs_worker_rss": 2000 / 1200, "sharded_vs_actors_speed": 0.5}}
    memory, speed = sharded_scoring_rows(stage)
    assert memory["value"] == pytest.approx(2000 / 1200) and speed["value"] == 0.5
    assert "workers 1,200 MiB (shard 500.0; 900 at the end), 1,100 MiB (shard 500.0; 800 at the end); one actor 2,000" in memory["detail"]
    assert sharded_scoring_rows({"error": "RuntimeError: x"})[0]["value"] is None


@pytest.mark.integration
@pytest.mark.slow
def test_sharded_bench_scores_every_pair_both_ways_and_ranks_sharded(ray_cluster, tmp_path):
    from mtrec_dist.bench.sharded_bench import bench_sharded_ranking, bench_sharded_scoring
    from mtrec_dist.training.scoring import read_scores

    cfg = tiny_config(train={"batch_size": 32, "score_batch_size": 32})  # 150 pairs: 5 blocks for 2 workers
    out = bench_sharded_scoring(cfg, 300, 150, 4, tmp_path, say=lambda m: None)
    ranks = out["runs"]["sharded"]["ranks"]
    assert [r["rows"] > 0 for r in ranks] == [True, True] and sum(r["rows"] for r in ranks) == 150
    assert out["runs"]["actors"]["rows"] == 150 and out["one_actor_peak_rss_mb"] > 0
    sharded, actors = (read_scores(str(tmp_path / "sharded_scoring_300" / f"scores_{r}")).sort_by("query")
                       for r in ("sharded", "actors"))
    np.testing.assert_allclose(sharded.column("reward_mean").to_numpy(), actors.column("reward_mean").to_numpy(),
                               rtol=1e-5, atol=1e-6)
    ranking = bench_sharded_ranking(cfg, 300, 40, 4, tmp_path, say=lambda m: None)
    assert ranking["rows"] == 40 and len(ranking["ranks"]) == 2 and 0 <= ranking["median_rank_full"] < 300
