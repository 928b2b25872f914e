"""Simulator properties: clicks and satisfaction disagree, determinism, chunking, the online API."""
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from mtrec_dist.config import ConfigError, SimulatorConfig, load_config
from mtrec_dist.data import simulator as sim
from mtrec_dist.data.schema import EVENT_SCHEMA


def _small(**kw) -> SimulatorConfig:
    base = dict(num_users=300, num_items=300, days=1, max_session_len=10, seed=5)
    base.update(kw)
    return SimulatorConfig(**base)


def _read(d: Path, sub: str) -> pa.Table:
    files = sorted((d / sub).rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _digests(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file() and f.name != "summary.json"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A moderately sized run (one day of the default world) shared by the statistical tests."""
    cfg = SimulatorConfig(days=1, seed=11)
    out = tmp_path_factory.mktemp("sim")
    summary = sim.simulate_logs(cfg, str(out), progress=lambda m: None)
    return cfg, out, summary


def test_logs_follow_the_event_schema_and_the_layout(demo):
    cfg, out, summary = demo
    parts = sorted((out / "logs").rglob("*.parquet"))
    assert [p.parent.name for p in parts] == ["day=2026-01-01"]
    logs = _read(out, "logs")
    assert logs.schema == EVENT_SCHEMA
    assert logs.num_rows == summary["events"] > 0
    assert (logs.column("click").to_numpy() == 1).all()  # engaged events only
    wr = logs.column("watch_ratio").to_numpy()
    assert (wr >= 0).all() and (wr <= 1).all()
    ts = logs.column("ts").to_numpy()
    start = sim.day_start_ts(cfg, 0)
    assert start == 1767225600 and (ts >= start).all() and (ts < start + 86400).all()
    sat = logs.column("eval_true_satisfaction").to_numpy()
    assert np.array_equal(logs.column("eval_long_view").to_numpy(), (sat > sim.LONG_VIEW_SATISFACTION).astype(np.int8))
    for t in ("items", "users"):
        assert (out / "truth" / f"{t}.parquet").exists()
    items = pq.read_table(out / "truth" / "items.parquet")
    assert items.num_rows == cfg.num_items and "is_clickbait" in items.column_names


def test_clickbait_has_higher_ctr_and_lower_satisfaction(demo):
    cfg, out, _ = demo
    truth = pq.read_table(out / "truth" / "items.parquet")
    cb = truth.column("is_clickbait").to_numpy(zero_copy_only=False)
    exposures = _read(out, "impressions")
    shown = pc.list_flatten(exposures.column("items")).to_numpy()
    impressions = np.bincount(shown, minlength=cfg.num_items)
    logs = _read(out, "logs")
    item = logs.column("item_id").to_numpy()
    clicks = np.bincount(item, minlength=cfg.num_items)
    sat = logs.column("eval_true_satisfaction").to_numpy()
    ctr_cb, ctr_other = clicks[cb].sum() / impressions[cb].sum(), clicks[~cb].sum() / impressions[~cb].sum()
    sat_cb, sat_other = sat[cb[item]].mean(), sat[~cb[item]].mean()
    assert ctr_cb > 1.5 * ctr_other
    assert sat_cb < sat_other - 0.5
    # the log's click count agrees with the exposures' click index
    assert (exposures.column("click_index").to_numpy() >= 0).sum() == logs.num_rows


def test_satisfaction_drives_watch_ratio_leaving_and_varies_by_item(demo):
    cfg, out, _ = demo
    logs = _read(out, "logs")
    sat = logs.column("eval_true_satisfaction").to_numpy()
    wr = logs.column("watch_ratio").to_numpy()
    # v2 world: the watch ratio is a partial, biased signal of satisfaction (method.md section 5)
    assert 0.3 <= sim.spearman(wr, sat) <= 0.5
    sess = logs.column("session_id").to_numpy()
    last_in_session = np.append(sess[1:] != sess[:-1], True)  # logs are sorted by (user, ts)
    assert sat[last_in_session].mean() < sat[~last_in_session].mean() - 0.3
    # item-specific spread: the empirical std of satisfaction tracks the item's true noise std
    truth = sim.make_item_truth(cfg)
    item = logs.column("item_id").to_numpy()
    counts = np.bincount(item, minlength=cfg.num_items)
    many = np.flatnonzero(counts >= 30)
    emp = np.array([sat[item == i].std() for i in many])
    assert np.corrcoef(emp, truth.noise_std[many])[0, 1] > 0.5
    assert truth.noise_std.min() < 0.3 * truth.noise_std.mean() < truth.noise_std.max() / 5


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sim.simulate_logs(_small(), str(a), progress=lambda m: None)
    sim.simulate_logs(_small(), str(b), progress=lambda m: None)
    sim.simulate_logs(_small(seed=6), str(c), progress=lambda m: None)
    assert _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)


def test_chunked_generation_equals_one_shot(tmp_path):
    one, chunked = tmp_path / "one", tmp_path / "chunked"
    s1 = sim.simulate_logs(_small(chunk_users=10_000), str(one), progress=lambda m: None)
    s2 = sim.simulate_logs(_small(chunk_users=96), str(chunked), progress=lambda m: None)
    assert len(list((chunked / "logs" / "day=2026-01-01").glob("*.parquet"))) == 4  # ceil(300 / 96)
    for sub in ("logs", "impressions"):
        a = pds.dataset(one / sub, partitioning="hive").to_table().sort_by([("user_id", "ascending"), ("ts", "ascending")])
        b = pds.dataset(chunked / sub, partitioning="hive").to_table().sort_by([("user_id", "ascending"), ("ts", "ascending")])
        assert a.num_rows > 0 and a.equals(b), sub
    assert pq.read_table(one / "truth" / "users.parquet").equals(pq.read_table(chunked / "truth" / "users.parquet"))
    for k in ("events", "sessions", "slates"):
        assert s1[k] == s2[k], k
    for group in ("clickbait", "other"):  # float sums accumulate in a different order per chunk
        assert s1[group] == pytest.approx(s2[group], rel=1e-9), group


def test_online_env_uses_the_same_world_and_rewards_quality(tmp_path):
    cfg = _small(num_items=200, clickbait_fraction=0.25)
    truth = sim.make_item_truth(cfg)
    env = sim.SimulatorEnv(cfg, item_truth=truth, seed=1)
    obs = env.reset(np.arange(120), warmup_items=3)
    assert obs["user_id"].tolist() == list(range(120))
    assert np.mean([len(h) >= 3 for h in obs["history_items"]]) > 0.9
    assert not obs["done"].any()
    # users keep their offline tastes: the env's expected satisfaction uses the same tastes
    assert np.allclose(env.taste, sim.user_tastes(cfg, np.arange(120)))

    def run(policy):
        env.reset(np.arange(120), warmup_items=3)
        clicks = shown = 0
        sats = []
        while not env.done.all():
            live = ~env.done
            out = env.step(policy())
            shown += live.sum()
            clicks += (out["click_index"] >= 0).sum()
            sats += out["satisfaction"][out["click_index"] >= 0].tolist()
            assert (out["click_index"][~live] == -1).all()
        return clicks / shown, np.mean(sats)

    size, catalog = cfg.slate_size, np.broadcast_to(np.arange(cfg.num_items), (120, cfg.num_items))
    w = cfg.click_satisfaction_weight
    click_pull = sim.relevance(cfg, env.taste, truth, catalog) + (1 - w) * truth.appeal + w * truth.quality
    ctr_clicky, sat_clicky = run(lambda: np.argsort(-click_pull, 1)[:, :size])
    ctr_best, sat_best = run(lambda: np.argsort(-env.expected_satisfaction(np.arange(cfg.num_items)), 1)[:, :size])
    assert ctr_clicky > ctr_best  # the click-maximising policy wins on clicks ...
    assert sat_best > sat_clicky + 0.5  # ... and loses on satisfaction


def test_item_truth_round_trips_through_its_table():
    truth = sim.make_item_truth(_small())
    back = sim.ItemTruth.from_table(truth.to_table())
    for f in ("topic", "vectors", "quality", "appeal", "is_clickbait", "noise_std", "duration_s"):
        assert np.array_equal(getattr(back, f), getattr(truth, f)), f
    assert truth.is_clickbait.sum() == round(0.2 * truth.num_items)
    assert truth.quality[truth.is_clickbait].mean() < truth.quality[~truth.is_clickbait].mean()
    assert truth.appeal[truth.is_clickbait].mean() > truth.appeal[~truth.is_clickbait].mean()


def test_env_step_rejects_bad_slates():
    env = sim.SimulatorEnv(_small(), seed=0)
    env.reset(4, warmup_items=1)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 10), dtype=np.int64))
    with pytest.raises(ValueError, match="item id 300 is not in the catalog"):
        env.step(np.full((4, 10), 300))
    with pytest.raises(ValueError, match="integer"):
        env.step(np.zeros((4, 10), dtype=np.float32))


def test_hash_random_numbers_are_uniform_and_keyed():
    u = sim.hash_uniform(0, 1, np.arange(200_000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert np.histogram(u, bins=10)[0].min() > 19_000
    assert np.array_equal(sim.hash_uniform(0, 1, np.arange(5)), sim.hash_uniform(0, 1, np.arange(5)))
    assert not np.array_equal(sim.hash_uniform(0, 1, np.arange(5)), sim.hash_uniform(0, 2, np.arange(5)))


def test_simulator_config_is_validated():
    with pytest.raises(ConfigError, match="simulator.start_ts"):
        load_config(overrides=["simulator.start_ts=1767225601"])
    with pytest.raises(ConfigError, match="simulator.slate_size"):
        load_config(overrides=["simulator.num_items=5"])
    with pytest.raises(ConfigError, match="simulator.logging_explore"):
        load_config(overrides=["simulator.logging_explore=1.5"])


def test_bad_items_show_in_watch_ratio_or_only_later(demo):
    """Clickbait is abandoned early (the watch ratio exposes it); compulsive items are watched long but
    regretted: their satisfaction is as low as clickbait's, and that shows only as leaving."""
    cfg, out, summary = demo
    other, cb, comp = summary["other"], summary["clickbait"], summary["compulsive"]
    assert cb["mean_watch_ratio"] < other["mean_watch_ratio"] - 0.15
    assert comp["mean_watch_ratio"] > other["mean_watch_ratio"]
    assert comp["mean_satisfaction"] < other["mean_satisfaction"] - 0.8
    assert cb["mean_satisfaction"] < other["mean_satisfaction"] - 0.8


def test_retention_follows_satisfaction(tmp_path):
    """Users come back the next day more often after satisfying days; the return rate is reported."""
    cfg = SimulatorConfig(num_users=1500, num_items=400, days=3, seed=2)
    summary = sim.simulate_logs(cfg, str(tmp_path), progress=lambda m: None)
    assert 0.5 < summary["next_day_return_rate"] < 0.95
    users = np.arange(cfg.num_users)
    sat_sum = np.linspace(-3, 3, cfg.num_users)
    back = sim.next_day_active(cfg, users, 0, sat_sum, np.ones(cfg.num_users))
    assert back[users >= 1000].mean() > back[users < 500].mean() + 0.3
    idle = sim.next_day_active(cfg, users, 0, np.zeros(cfg.num_users), np.zeros(cfg.num_users))
    assert abs(idle.mean() - cfg.reactivation) < 0.05
