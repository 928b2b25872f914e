"""Daily retraining (`mtrec retrain`) on three simulated days.

Day 1's logs lose every event of the last ``NEW_ITEMS`` items, so those items first appear on day 2 (the
simulator itself has a fixed catalog).  The chain v0001 (bootstrap, cold) -> v0002 -> v0003 is built once
per module; the tests check that every event is used exactly once, that states carry over the day
boundary, that the vocab and the item tables grow with old rows kept, idempotent re-runs, and that the
warm-started recommender beats cold training with the same step budget on the new day.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch

from mtrec_dist.config import PipelineConfig, from_dict
from mtrec_dist.data.prepare import load_carry, load_manifest, load_vocab
from mtrec_dist.data.simulator import day_label, simulate_logs
from mtrec_dist.retrain import RetrainError, describe_run, list_versions, retrain_day
from mtrec_dist.training.checkpoint import (checkpoint_tensor_shapes, load_unsharded_model, read_checkpoint_meta,
                                            warm_start_module)
from mtrec_dist.training.loop import read_history
from mtrec_dist.training.recommender import recommender_factory, train_recommender
from mtrec_dist.training.sharding import TrainingModule

torch.set_num_threads(1)

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # several Ray Train runs (minutes on 2 CPUs)

NUM_ITEMS, NEW_ITEMS, L = 120, 20, 5
TABLE = "model.item_embedding.ec.embeddings.item_table.weight"


def _cfg(run_dir: Path) -> PipelineConfig:
    cfg = from_dict(PipelineConfig, {
        "run_dir": str(run_dir),
        "simulator": {"num_users": 200, "num_items": NUM_ITEMS, "days": 3, "seed": 1},
        "prepare": {"state_len": L, "progress": False},
        "model": {"embedding_dim": 16, "num_layers": 1, "num_heads": 2},
        "reward": {"num_quantiles": 8},
        "rec": {"backbones": ["sasrec"], "guidances": ["none"]},
        "train": {"num_workers": 2, "batch_size": 128, "epochs": 2, "max_steps": 0, "report_every": 1,
                  "checkpoint_every": 1000, "collective_timeout_s": 120, "lr": 0.01, "sparse_lr": 0.1},
    })
    cfg.validate()
    return cfg


def _table(path) -> "pa.Table":  # noqa: F821
    return pds.dataset(str(path), format="parquet").to_table()


@pytest.fixture(scope="module")
def chain(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    cfg = _cfg(root / "run")
    simulate_logs(cfg.simulator, str(root / "sim"), progress=lambda m: None)
    logs = root / "sim" / "logs"
    days = [day_label(cfg.simulator, d) for d in range(3)]
    for f in sorted((logs / f"day={days[0]}").glob("*.parquet")):  # the last items are new on day 2
        t = pq.read_table(f)
        pq.write_table(t.filter(pc.less(t.column("item_id"), NUM_ITEMS - NEW_ITEMS)), f)
    out = root / "versions"
    runs = [retrain_day(cfg, str(logs / f"day={d}"), str(out), progress=False) for d in days]
    return {"cfg": cfg, "logs": logs, "days": days, "out": out, "runs": runs, "root": root}


def _version_dir(chain, k: int) -> Path:
    return chain["out"] / chain["runs"][k]["name"]


def test_versions_are_chained_and_every_event_is_used_once(chain):
    runs, days = chain["runs"], chain["days"]
    assert [r["name"] for r in runs] == [f"v000{k + 1}-{d}" for k, d in enumerate(days)]
    assert [r["previous"] for r in runs] == [None, str(_version_dir(chain, 0)), str(_version_dir(chain, 1))]
    assert [v["name"] for v in list_versions(str(chain["out"]))] == [r["name"] for r in runs]
    assert json.loads((chain["out"] / "versions.json").read_text())["latest"] == runs[-1]["name"]

    vocab = load_vocab(str(_version_dir(chain, 2) / "prepared"))  # the last vocab indexes every day's ids
    seen_rows, seen_events = [], []
    for k, d in enumerate(days):
        raw = _table(chain["logs"] / f"day={d}")
        m = load_manifest(str(_version_dir(chain, k) / "prepared"))
        tr = _table(_version_dir(chain, k) / "prepared" / "transitions")
        rejects = m["rows_rejected"]
        # every raw row of the day is accounted for: a transition, a reject or a non-engaged row
        assert m["rows_in"] == raw.num_rows == m["num_transitions"] + rejects + m["rows_not_engaged"]
        assert tr.num_rows == m["num_transitions"] == runs[k]["rows"]["num_transitions"]
        # only this day's events: no old event re-emitted as a transition
        ts = tr.column("ts").to_numpy()
        assert ts.min() >= chain["cfg"].simulator.start_ts + 86_400 * k
        assert ts.max() < chain["cfg"].simulator.start_ts + 86_400 * (k + 1)
        # row ids of the day lie in the version's range, which starts where the previous one ended
        rid = tr.column("row_id").to_numpy()
        lo, hi = runs[k]["row_ids"]
        assert lo == (runs[k - 1]["row_ids"][1] if k else 0) and hi - lo == m["rows_in"]
        assert rid.min() >= lo and rid.max() < hi
        seen_rows.append(rid)
        users = vocab.user_raw[tr.column("user_idx").to_numpy()]
        items = vocab.item_raw_id(tr.column("action").to_numpy())
        seen_events += list(zip(users.tolist(), items.tolist(), ts.tolist()))
        # ... and they are the day's accepted engaged events, each once
        ok = raw.filter(pc.field("click") != 0) if "click" in raw.column_names else raw
        expected = set(zip(ok.column("user_id").to_pylist(), ok.column("item_id").to_pylist(),
                           ok.column("ts").to_pylist()))
        assert len(expected) == m["num_transitions"]  # the simulator's events are clean (no duplicates)
        assert set(zip(users.tolist(), items.tolist(), ts.tolist())) == expected
    all_rows = np.concatenate(seen_rows)
    assert np.unique(all_rows).size == all_rows.size  # unique across days
    assert len(set(seen_events)) == len(seen_events)  # no event used twice across versions


def test_the_reward_model_reads_earlier_days_for_the_return_labels_a_day_completes(chain):
    runs = chain["runs"]
    prepared = [str(describe_run(str(_version_dir(chain, k)))["prepared"]) for k in range(3)]
    # a one-day partition is shorter than the 36 h return window: no session end of a day has its label in
    # that day's own data
    for p in prepared:
        assert pc.sum(_table(Path(p) / "transitions").column("return_known")).as_py() == 0
    assert runs[0]["reward"]["earlier_prepared"] == [] and runs[0]["reward"]["return_known_rows"] is None
    # ceil(36 h / 1 day) = 2 earlier days, newest first, and their labels completed by the newer days
    assert runs[1]["reward"]["earlier_prepared"] == prepared[:1]
    assert runs[2]["reward"]["earlier_prepared"] == [prepared[1], prepared[0]]
    assert runs[2]["reward"]["rows"] == sum(r["rows"]["num_transitions"] for r in runs)
    assert 0 < runs[1]["reward"]["return_known_rows"] < runs[2]["reward"]["return_known_rows"]


def test_earlier_days_give_the_same_training_rows_in_the_driver_and_on_ray_data(chain):
    """Two days' transitions, each joined to its own slates, labels completed over both: the driver's pyarrow
    path (a small set, train.driver_read_mb) and Ray Data's (joins, hash shuffle by user) agree.  (Two days, not
    three: each day's join on Ray Data starts its own actors; three took 65 s on the 2-core box.)"""
    import pyarrow as pa
    import ray

    from mtrec_dist.training.reward import training_transitions

    prepared = [str(describe_run(str(_version_dir(chain, k)))["prepared"]) for k in range(2)]
    rows, train_rows = chain["runs"][1]["reward"]["rows"], chain["runs"][1]["reward"]["train_rows"]
    log_end = load_manifest(prepared[1])["log_end"]
    got = {}
    for driver_read_mb in (256.0, 0.0):
        cfg = chain["cfg"]
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, driver_read_mb=driver_read_mb))
        ds = training_transitions(cfg, prepared[1], rows, [prepared[0]], log_end)
        got[driver_read_mb] = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("row_id")
    driver, distributed = got[256.0], got[0.0]
    assert driver.num_rows == distributed.num_rows == train_rows < rows  # the held-out users' rows left out
    assert sorted(driver.column_names) == sorted(distributed.column_names)
    # the same types, not only values (Ray Data's join marks every field nullable; collate does not read that)
    assert [f.type for f in driver.schema] == [f.type for f in distributed.select(driver.column_names).schema]
    assert "slate_items" in driver.column_names and pc.sum(driver.column("return_known")).as_py() > 0
    for name in distributed.column_names:
        assert driver.column(name).to_pylist() == distributed.column(name).to_pylist(), name


def test_states_carry_over_the_day_boundary(chain):
    vocab = load_vocab(str(_version_dir(chain, 2) / "prepared"))
    carry: dict = {}  # raw user -> (last L raw items, feedback), as it should be after each day
    checked = 0
    for k in range(3):
        tr = _table(_version_dir(chain, k) / "prepared" / "transitions").sort_by([("user_idx", "ascending"),
                                                                                   ("ts", "ascending")])
        u = vocab.user_raw[tr.column("user_idx").to_numpy()]
        state = np.array(tr.column("state_items").to_pylist())
        sfb = np.array(tr.column("state_feedback").to_pylist(), dtype=np.float32)
        nxt = np.array(tr.column("next_state_items").to_pylist())
        nfb = np.array(tr.column("next_state_feedback").to_pylist(), dtype=np.float32)
        pos = tr.column("pos_from_end").to_numpy()
        first = np.r_[True, u[1:] != u[:-1]]
        for i in np.flatnonzero(first):
            want_items, want_fb = carry.get(int(u[i]), (np.full(L, -1), np.zeros(L, np.float32)))
            got = vocab.item_raw_id(state[i])
            assert got.tolist() == want_items.tolist(), (k, u[i])
            np.testing.assert_allclose(sfb[i], want_fb)
            checked += int(k > 0 and (want_items >= 0).any())
        for i in np.flatnonzero(pos == 0):
            carry[int(u[i])] = (vocab.item_raw_id(nxt[i]), nfb[i])
        # the version's carry/ table is exactly that state, for every user seen so far
        ct = load_carry(str(_version_dir(chain, k) / "carry"), L)
        assert ct.num_rows == len(carry)
        for row in ct.to_pylist():
            assert row["state_raw"] == carry[row["user_id"]][0].tolist()
    assert checked > 100  # most users' day-2/3 sequences really started from carried items


def test_new_items_get_embedding_rows_and_old_rows_are_warm_started(chain):
    runs = chain["runs"]
    v = [r["vocab"] for r in runs]
    assert v[0]["items"] <= NUM_ITEMS - NEW_ITEMS and v[0]["new_items"] == v[0]["items"]
    assert v[1]["new_items"] > 0 and v[1]["items"] == v[0]["items"] + v[1]["new_items"]
    v1_vocab = load_vocab(str(_version_dir(chain, 0) / "prepared"))
    v2_vocab = load_vocab(str(_version_dir(chain, 1) / "prepared"))
    # old indices kept, new ids appended (the new items are the ones day 1 never saw)
    assert np.array_equal(v2_vocab.item_raw[:v1_vocab.num_items], v1_vocab.item_raw)
    assert (v2_vocab.item_raw[v1_vocab.num_items:] >= NUM_ITEMS - NEW_ITEMS).all()

    assert runs[0]["reward"]["warm_start"] is None and runs[0]["recommenders"][0]["warm_start"] is None
    for k in (1, 2):
        prev_run, run = runs[k - 1], runs[k]
        models = [("reward", prev_run["reward"]["checkpoint_path"], run["reward"]["checkpoint_path"],
                   _version_dir(chain, k) / "reward")]
        models.append(("rec", prev_run["recommenders"][0]["checkpoint_path"],
                       run["recommenders"][0]["checkpoint_path"], _version_dir(chain, k) / "rec" / "sasrec-none"))
        for kind, old_ckpt, new_ckpt, out_dir in models:
            assert checkpoint_tensor_shapes(new_ckpt)[TABLE] == (run["vocab"]["items"] + 1, 16)
            assert checkpoint_tensor_shapes(old_ckpt)[TABLE] == (prev_run["vocab"]["items"] + 1, 16)
            (start,) = [e for e in read_history(str(out_dir)) if e["event"] == "start"]
            ws = start["warm_start"]
            assert ws["checkpoint"] == old_ckpt and ws["max_abs_diff"] == 0.0 and not ws["fresh"], kind
            if run["vocab"]["new_items"]:
                assert ws["grown"][TABLE] == [prev_run["vocab"]["items"] + 1, run["vocab"]["items"] + 1]

    # the same warm start on a plain model from the real 2-rank row-wise checkpoints: old rows equal the
    # previous checkpoint's, new rows keep their fresh initialisation, dense weights equal
    old_ckpt = runs[0]["recommenders"][0]["checkpoint_path"]
    old_spec = read_checkpoint_meta(old_ckpt)["model_spec"]
    new_spec = dict(old_spec, num_items=runs[1]["vocab"]["items"])
    old = TrainingModule(load_unsharded_model(recommender_factory(old_spec, for_inference=True), old_ckpt))
    torch.manual_seed(0)
    new = TrainingModule(recommender_factory(new_spec, for_inference=True)(torch.device("cpu")))
    fresh = new.state_dict()[TABLE].clone()
    report = warm_start_module(new, old_ckpt)
    n_old = old_spec["num_items"] + 1
    assert report["max_abs_diff"] == 0.0 and report["rows_copied"] == {TABLE: n_old}
    sd_new, sd_old = new.state_dict(), old.state_dict()
    assert torch.equal(sd_new[TABLE][:n_old], sd_old[TABLE])
    assert torch.equal(sd_new[TABLE][n_old:], fresh[n_old:])
    for key, value in sd_old.items():
        if key != TABLE:
            assert torch.equal(sd_new[key], value), key


def test_rerunning_a_day_is_idempotent_and_old_days_are_refused(chain):
    cfg, logs, days, out = chain["cfg"], chain["logs"], chain["days"], chain["out"]
    before = sorted(p.name for p in out.iterdir())
    again = retrain_day(cfg, str(logs), str(out), day=days[2], progress=False)  # logs root + day
    assert again["reused"] and again["name"] == chain["runs"][2]["name"]
    assert again["fingerprint"] == chain["runs"][2]["fingerprint"]
    assert sorted(p.name for p in out.iterdir()) == before  # no new version, nothing rebuilt
    with pytest.raises(RetrainError, match="fork"):  # day 2 again while v0003 builds on it
        retrain_day(cfg, str(logs / f"day={days[1]}"), str(out), progress=False)
    with pytest.raises(RetrainError, match="not after"):  # day 2's events are already in v0002
        retrain_day(cfg, str(logs / f"day={days[1]}"), str(out), previous=str(_version_dir(chain, 1)),
                    progress=False)
    with pytest.raises(RetrainError, match="one\\s+day at a time|3 day partitions"):
        retrain_day(cfg, str(logs), str(out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == before


def _next_item_metrics(spec: dict, ckpt: str, prepared: Path, share: float, ks=(10,)) -> dict:
    """Full-catalog NLL and HR@k of every transition of the day's held-out users."""
    from mtrec_dist.data.heldout import heldout_expr

    model = load_unsharded_model(recommender_factory(spec, for_inference=True), ckpt)
    tr = _table(prepared / "transitions").filter(heldout_expr(share))
    s = torch.tensor(tr.column("state_items").to_pylist())
    f = torch.tensor(tr.column("state_feedback").to_pylist())
    a = torch.tensor(tr.column("action").to_numpy())
    with torch.no_grad():
        logits = model.score_catalog(s, f, torch.arange(1, spec["num_items"] + 1))
    nll = torch.nn.functional.cross_entropy(logits, a - 1).item()
    rank = (logits > logits.gather(1, (a - 1)[:, None])).sum(1)
    return {"nll": nll, "n": int(a.numel()), **{f"HR@{k}": float((rank < k).float().mean()) for k in ks}}


def _progressive_loss(output_dir: Path) -> float:
    """Row-weighted mean training loss over the first epoch: each batch's loss is computed before the model
    has trained on it in this run, so it is an out-of-sample estimate on the new day (~1,700 rows)."""
    ev = [e for e in read_history(str(output_dir)) if e["event"] == "metrics" and e["epoch"] == 0]
    rows = np.array([e["interval_rows"] for e in ev])
    return float((np.array([e["loss"] for e in ev]) * rows).sum() / rows.sum())


def test_warm_start_beats_cold_training_with_the_same_budget(chain, tmp_path):
    cfg, run = chain["cfg"], chain["runs"][2]
    vdir = _version_dir(chain, 2)
    prepared = vdir / "prepared"
    warm = run["recommenders"][0]
    assert warm["warm_start"] is not None
    run_cfg = dataclasses.replace(cfg, run_dir=str(vdir))
    cold = train_recommender(run_cfg, str(prepared / "transitions"), str(prepared), str(tmp_path / "cold"),
                             backbone="sasrec", guidance="none", progress=False)
    assert cold["metrics"]["step"] == warm["metrics"]["step"]  # the same budget on the new day
    spec = read_checkpoint_meta(warm["checkpoint_path"])["model_spec"]
    w = _next_item_metrics(spec, warm["checkpoint_path"], prepared, cfg.eval.heldout_user_share)
    c = _next_item_metrics(spec, cold["checkpoint_path"], prepared, cfg.eval.heldout_user_share)
    w["progressive_loss"] = _progressive_loss(vdir / "rec" / "sasrec-none")
    c["progressive_loss"] = _progressive_loss(tmp_path / "cold")
    print(f"\nwarm {w}\ncold {c}")
    (chain["root"] / "warm_vs_cold.json").write_text(json.dumps({"warm": w, "cold": c}))
    # on the new day's rows before they are trained on, and on the held-out users' rows that neither model
    # ever trained on
    assert w["progressive_loss"] < c["progressive_loss"]
    assert w["nll"] <= c["nll"]
    assert w["HR@10"] >= c["HR@10"]
