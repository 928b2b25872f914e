"""`mtrec plan` / mtrec_dist.planning: the real TorchRec planner on target topologies we do not have."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from mtrec_dist import cli
from mtrec_dist.models.embeddings import DEFAULT_FEATURES
from mtrec_dist.planning import ALL_TO_ALL_FORMULA, GIB, CapacityError, format_plan, plan_capacity


def test_small_cpu_topology_plans_quickly_and_accounts_every_row():
    t0 = time.perf_counter()
    r = plan_capacity(num_items=1001, embedding_dim=32, world_size=2, compute_device="cpu", ddr_gb_per_rank=1,
                      batch_size_per_rank=64, ids_per_sample=21)
    assert time.perf_counter() - t0 < 30
    plan = r["plan"]
    # On CPU only what gloo runs is allowed (fused kernel; row/table/column-wise).
    assert plan["compute_kernel"] == "fused"
    assert plan["sharding_type"] in ("row_wise", "table_wise", "column_wise")
    rows = sum(s["sizes"][0] for s in plan["shards"] if s["offsets"][1] == 0)
    assert rows == 1001
    # Per-rank memory comes from the planner's shard storage and lands in DDR on CPU.
    assert sum(d["ddr_bytes"] for d in r["ranks"]) == sum(s["ddr_bytes"] for s in plan["shards"])
    assert all(d["hbm_bytes"] == 0 for d in r["ranks"])
    assert r["summary"]["max_ddr_bytes"] >= 1001 * 32 * 4 / 2  # at least its share of the fp32 weights
    text = format_plan(r)
    assert "sharding=" in text and "All-to-all per step" in text and ALL_TO_ALL_FORMULA in text


def test_row_wise_all_to_all_matches_the_closed_form():
    B, n, d, W, F = 128, 21, 64, 4, len(DEFAULT_FEATURES)  # every declared feature sends its lengths
    r = plan_capacity(num_items=4000, embedding_dim=d, world_size=W, compute_device="cpu", ddr_gb_per_rank=1,
                      batch_size_per_rank=B, ids_per_sample=n, sharding="row_wise")
    assert r["plan"]["sharding_type"] == "row_wise" and r["plan"]["num_shards"] == W
    a2a = r["all_to_all"]
    # Rows split evenly: each rank sends ids + lengths to the W-1 others and gradients for their rows, and
    # serves the W-1 others' lookups of its own rows.
    ids = B * n * (W - 1) / W * 8 + B * F * 4 * (W - 1)
    emb = B * n * (W - 1) / W * d * 4
    for rank in range(W):
        assert a2a["sent_bytes"][rank] == pytest.approx(ids + 2 * emb, rel=1e-3)
        assert a2a["received_bytes"][rank] == pytest.approx(ids + 2 * emb, rel=1e-3)
    assert a2a["cluster_bytes_per_step"] == pytest.approx(W * (ids + 2 * emb), rel=1e-3)


def test_table_wise_concentrates_traffic_on_the_owner():
    r = plan_capacity(num_items=4000, embedding_dim=32, world_size=4, compute_device="cpu", ddr_gb_per_rank=1,
                      sharding="table_wise", batch_size_per_rank=64, ids_per_sample=10)
    assert r["plan"]["sharding_type"] == "table_wise" and r["plan"]["num_shards"] == 1
    owner = r["plan"]["shards"][0]["rank"]
    recv = r["all_to_all"]["received_bytes"]
    assert recv[owner] == max(recv) and all(recv[owner] > 2 * recv[q] for q in range(4) if q != owner)
    assert r["ranks"][owner]["ddr_bytes"] > 0
    assert all(r["ranks"][q]["ddr_bytes"] == 0 for q in range(4) if q != owner)


def test_huge_table_on_tiny_topology_gives_a_clear_error():
    with pytest.raises(CapacityError) as e:
        plan_capacity(num_items=10**9, embedding_dim=128, world_size=2, compute_device="cpu", ddr_gb_per_rank=4)
    msg = str(e.value)
    assert "does not fit" in msg and "476.8 GiB" in msg and "--world-size" in msg and "TorchRec planner" in msg


def test_the_suggested_world_size_does_fit():
    kw = dict(num_items=10**9, embedding_dim=128, local_world_size=8, hbm_gb_per_rank=16, ddr_gb_per_rank=8,
              compute_device="cuda")
    with pytest.raises(CapacityError) as e:
        plan_capacity(world_size=8, **kw)
    suggested = int(re.search(r"at least --world-size (\d+)", str(e.value)).group(1))
    assert suggested % 8 == 0 and suggested > 8
    r = plan_capacity(world_size=suggested, **kw)
    assert r["summary"]["max_hbm_used_fraction"] <= 1.0


def test_64_gpus_80gb_1e9_items_128_dims(capsys):
    t0 = time.perf_counter()
    r = plan_capacity(num_items=10**9, embedding_dim=128, world_size=64, local_world_size=8,
                      hbm_gb_per_rank=80, ddr_gb_per_rank=128, compute_device="cuda",
                      batch_size_per_rank=256, ids_per_sample=21)
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"planner took {seconds:.1f} s"
    assert r["inputs"]["nodes"] == 8
    plan = r["plan"]
    assert len(plan["ranks"]) == 64
    assert sum(s["sizes"][0] for s in plan["shards"] if s["offsets"][1] == 0) == 10**9
    # Weights + row-wise Adagrad state spread over 64 GPUs: ~7.5 GiB each, well under 80 GiB * 0.85.
    weights_share = 10**9 * 128 * 4 / 64
    assert weights_share <= r["summary"]["max_hbm_bytes"] < 0.85 * 80 * GIB
    assert r["summary"]["max_hbm_used_fraction"] < 1.0
    assert r["all_to_all"]["max_sent_bytes_per_rank"] > 0
    print(format_plan(r))
    out = capsys.readouterr().out
    assert "0-63" in out  # 64 identical ranks collapse into one row


def test_cli_json_output_and_exit_codes(tmp_path, capsys):
    dest = tmp_path / "out" / "plan.json"
    rc = cli.main(["plan", "--items", "10^4", "--dim", "16", "--world-size", "2", "--device", "cpu",
                   "--ddr-gb", "1", "--json", "--output", str(dest)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(dest.read_text()) == printed
    assert printed["inputs"]["num_items"] == 10_000
    # Defaults come from the config: items = simulator.num_items + 1, dim = model.embedding_dim.
    rc = cli.main(["plan", "--set", "simulator.num_items=499", "--set", "model.embedding_dim=8",
                   "--world-size", "2", "--device", "cpu", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["inputs"]["num_items"] == 500 and printed["inputs"]["embedding_dim"] == 8
    # Does not fit -> exit 3 with the explanation on stderr.
    rc = cli.main(["plan", "--items", "1e9", "--dim", "128", "--world-size", "2", "--device", "cpu",
                   "--ddr-gb", "1"])
    assert rc == 3
    assert "does not fit" in capsys.readouterr().err
    # Malformed topology -> clear message, non-zero.
    rc = cli.main(["plan", "--items", "100", "--world-size", "6", "--local-world-size", "4"])
    assert rc == 3
    assert "multiple of --local-world-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["plan", "--items", "1.5"])


def test_sharding_choices_match_what_the_sharder_offers():
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    from mtrec_dist.planning import SHARDING_CHOICES

    assert set(SHARDING_CHOICES) - {"auto"} == set(EmbeddingCollectionSharder().sharding_types("cuda"))
    with pytest.raises(CapacityError, match="does not run on CPU"):
        plan_capacity(num_items=100, embedding_dim=8, world_size=2, compute_device="cpu", sharding="data_parallel")
    r = plan_capacity(num_items=100, embedding_dim=8, world_size=4, compute_device="cuda", hbm_gb_per_rank=1,
                      sharding="data_parallel")
    assert r["plan"]["sharding_type"] == "data_parallel" and not r["all_to_all"]["applies"]
    assert r["all_to_all"]["gradient_allreduce_bytes_per_rank"] == int(2 * 3 / 4 * 100 * 8 * 4)


@pytest.mark.parametrize("config,sets", [
    ("tiny.yaml", []),
    ("tiny.yaml", ["train.num_workers=4", "train.sharding=column_wise"]),
    ("demo.yaml", ["train.sharding=table_wise"]),
    ("demo.yaml", ["train.num_workers=4"]),
])
def test_the_plan_for_the_training_configuration_is_the_plan_training_gets(config, sets, capsys):
    """`mtrec plan` on a config's defaults (CPU ranks) against the plan training computes for the same
    config: training's own planning step (training/sharding.plan_model, as shard_model calls it, in one
    process instead of collectively) on the real reward model and recommender built on meta."""
    import torch

    from mtrec_dist.config import load_config
    from mtrec_dist.models.embeddings import ITEM_TABLE
    from mtrec_dist.training.recommender import rec_model_spec, recommender_factory
    from mtrec_dist.training.reward import model_spec, reward_model_factory
    from mtrec_dist.training.sharding import plan_model, plan_summary

    path = str(Path(__file__).resolve().parents[1] / "configs" / config)
    flags = [a for s in sets for a in ("--set", s)]
    assert cli.main(["plan", "--config", path, *flags, "--device", "cpu", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["plan"]
    planned = {"sharding_type": planned["sharding_type"], "compute_kernel": planned["compute_kernel"],
               "ranks": [s["rank"] for s in planned["shards"]], "shard_sizes": [s["sizes"] for s in planned["shards"]]}

    cfg = load_config(path, sets)
    # the catalog `mtrec plan` assumes by default: every simulated item (+ the padding row)
    manifest = {"num_items": cfg.simulator.num_items, "state_len": cfg.prepare.state_len}
    W = cfg.train.num_workers
    for factory in (reward_model_factory(model_spec(cfg, manifest)),
                    recommender_factory(rec_model_spec(cfg, manifest, cfg.rec.backbones[0], "none"))):
        _, plan, _ = plan_model(factory(torch.device("meta")), cfg.train, torch.device("cpu"), W, W)
        assert plan_summary(plan)[ITEM_TABLE] == planned
