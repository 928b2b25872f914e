"""The item prior (objectives/item_prior.py): hand-computed statistics, the posterior against plain 2x2
Gaussian algebra, recovery of item levels under a sparse pull, and the reward model carrying it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mtrec_dist.config import ModelConfig, RewardConfig
from mtrec_dist.evaluation.metrics import spearman
from mtrec_dist.objectives.item_prior import (
    STAY_PSEUDO_ROWS, ItemSums, SparsePullFit, fit_sparse_pull, item_prior, item_prior_of_rows, item_stats,
    sparse_pull_posterior,
)


def test_item_stats_by_hand():
    # item 1: two rows, item 2: one row, item 3: none; duration 0 everywhere, so the slope is 0
    action = np.array([1, 1, 2])
    stay = np.array([1.0, 0.0, 1.0])
    z = np.array([1.0, 3.0, -1.0])
    st = item_stats(action, stay, z, np.zeros(3), num_items=3)
    assert st.n.tolist() == [0, 2, 1, 0]
    assert st.w_raw[1] == pytest.approx(2.0) and st.w_raw[2] == pytest.approx(-1.0)
    assert st.w_raw[3] == pytest.approx(1.0)  # no rows: the overall mean
    within = ((1 - 2) ** 2 + (3 - 2) ** 2 + 0.0) / (3 - 2)  # residuals about each item's mean, n - items seen
    assert st.vw[1] == pytest.approx(within / 2) and st.vw[2] == pytest.approx(within / 1)
    pbar, s = 2 / 3, STAY_PSEUDO_ROWS
    p1 = (1 + s * pbar) / (2 + s)
    assert st.c[1] == pytest.approx(np.log(p1 / (1 - p1)))
    assert st.lam[1] == pytest.approx(2 / (2 + s))
    assert st.vc[1] == pytest.approx(2 / ((2 + s) ** 2 * p1 * (1 - p1)))


def test_item_sums_over_batches_equal_one_pass():
    rng = np.random.default_rng(4)
    a, stay, z, ld = rng.integers(1, 8, 500), rng.random(500) < 0.8, rng.normal(size=500), rng.normal(size=500)
    sums = ItemSums(7)
    for part in np.array_split(np.arange(500), 7):
        sums.add(a[part], stay[part], z[part], ld[part])
    batched, whole = sums.stats(), item_stats(a, stay, z, ld, 7)
    for got, want in zip(batched, whole):
        assert np.allclose(got, want)
    # the within-item variance, against a direct computation
    b = np.polyfit(ld, z, 1)[0]
    r = z - b * ld
    means = np.array([r[a == i].mean() for i in range(1, 8)])
    within = ((r - means[a - 1]) ** 2).sum() / (500 - 7)
    assert whole.vw[1] == pytest.approx(within / (a == 1).sum())


def test_item_stats_remove_the_duration_slope():
    rng = np.random.default_rng(0)
    action = rng.integers(1, 6, 2000)
    ld = np.log(np.array([0, 20, 60, 120, 300, 600.0]) / 60.0 + 1e-9)[action]
    z = -0.8 * ld + rng.normal(0, 0.1, 2000)  # watch falls with length and with nothing else
    st = item_stats(action, np.ones(2000) * 0.9, z, ld, num_items=5)
    assert np.ptp(st.w[1:]) < 0.05 and np.ptp(st.w_raw[1:]) > 1.0


def test_posterior_matches_two_by_two_gaussian_algebra():
    rng = np.random.default_rng(1)
    n = 6
    st = item_stats(rng.integers(1, n + 1, 300), rng.random(300) < 0.8, rng.normal(0, 1, 300), np.zeros(300), n)
    fit = SparsePullFit(s_m=0.2, pi=0.3, t=1.5, k=0.7, log_lik=0.0)
    post = sparse_pull_posterior(st, fit)
    seen = st.n > 0
    x = np.stack([st.w - np.average(st.w[seen], weights=st.n[seen]), st.c - np.average(st.c[seen], weights=st.n[seen])], 1)
    for a in np.flatnonzero(seen):
        # x = (k, lam) M + (pull, 0) + noise: the covariance of (M, x) and of x, written out
        load = np.array([fit.k, st.lam[a]])
        s0 = fit.s_m * np.outer(load, load) + np.diag([st.vw[a], st.vc[a]])
        s1 = s0 + np.array([[fit.t, 0.0], [0.0, 0.0]])
        dens = [np.exp(-0.5 * x[a] @ np.linalg.solve(S, x[a])) / (2 * np.pi * np.sqrt(np.linalg.det(S))) for S in (s0, s1)]
        p = fit.pi * dens[1] / ((1 - fit.pi) * dens[0] + fit.pi * dens[1])
        cov_mx = fit.s_m * load
        m = (1 - p) * cov_mx @ np.linalg.solve(s0, x[a]) + p * cov_mx @ np.linalg.solve(s1, x[a])
        assert post["p_pull"][a] == pytest.approx(p, rel=1e-9)
        assert post["level"][a] == pytest.approx(m, rel=1e-9, abs=1e-12)
    assert post["level"][0] == 0.0


def _sparse_pull_log(seed: int = 0, items: int = 300, rows_per_item: int = 60, k: float = 1.0):
    """Items with a level M (continuation logit) and, for 30%, a pull on the watch logit of either sign that
    goes with a low level (the hard case: clickbait and compulsive items are both bad)."""
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 0.35, items + 1)
    pulled = rng.random(items + 1) < 0.3
    level[pulled] -= 0.5
    pull = np.where(pulled, rng.choice([-1.5, 1.5], items + 1), 0.0)
    action = np.repeat(np.arange(1, items + 1), rows_per_item)
    stay = rng.random(len(action)) < 1 / (1 + np.exp(-(1.8 + level[action])))
    z = k * level[action] + pull[action] + rng.normal(0, 1.2, len(action))
    return action, stay.astype(float), z, level, pulled


def test_the_prior_reads_both_signals_and_flags_pulled_items():
    action, stay, z, level, pulled = _sparse_pull_log()
    prior = item_prior(action, stay, z, np.zeros(len(action)), num_items=300, k=1.0)
    st = item_stats(action, stay, z, np.zeros(len(action)), 300)
    truth = level[1:]
    got = spearman(prior["level"][1:], truth)
    assert got > spearman(st.w[1:], truth) + 0.1  # the watch level, pull and all
    assert got > spearman(st.c[1:], truth) + 0.05  # continuation alone: a noisy count
    assert prior["p_pull"][1:][pulled[1:]].mean() > prior["p_pull"][1:][~pulled[1:]].mean() + 0.3
    assert np.allclose(prior["watch_level"], st.w_raw, atol=1e-5)
    assert prior["level"][0] == 0.0 and prior["fit"]["pi"] <= 0.5


def test_fit_recovers_the_share_of_pulled_items():
    """30% of the items carry a pull of +-1.5 (variance 2.25): the grid's best fit says so."""
    action, stay, z, _, _ = _sparse_pull_log(seed=2, items=400, rows_per_item=200)
    fit = fit_sparse_pull(item_stats(action, stay, z, np.zeros(len(action)), 400), k=1.0)
    assert fit.pi in (0.2, 0.3, 0.4) and fit.t in (1.0, 2.0, 4.0)


def test_without_a_watch_signal_the_level_comes_from_continuation():
    action, stay, _, level, _ = _sparse_pull_log(seed=5)
    z = np.full(len(action), 3.89)  # every watch ratio 1.0: a log with no watch signal
    prior = item_prior(action, stay, z, np.zeros(len(action)), 300, k=1.0)
    st = item_stats(action, stay, z, np.zeros(len(action)), 300)
    assert spearman(prior["level"][1:], st.c[1:]) > 0.99  # the level follows the stay rate alone
    assert prior["level"][1:].std() > 0.05


def test_item_prior_of_rows_reads_the_schema_columns():
    action, stay, z, _, _ = _sparse_pull_log(seed=3, items=40, rows_per_item=20)
    wr = 1 / (1 + np.exp(-np.clip(z, -3.8, 3.8)))  # inside watch_logit's clip: the logit comes back exactly
    rows = dict(action=action, done=1.0 - stay, action_feedback=wr.astype(np.float32),
                action_log_duration=np.zeros(len(action), np.float32))
    got = item_prior_of_rows(rows, 40, k=1.0)
    want = item_prior(action, stay, np.log(wr / (1 - wr)), np.zeros(len(action)), 40, k=1.0)
    assert np.allclose(got["level"], want["level"], atol=1e-4)


MODEL_CFG = ModelConfig(embedding_dim=8, encoder="gru4rec", num_layers=1, dropout=0.0)


def _prior(n_items: int) -> dict:
    return {"level": np.linspace(-0.5, 0.5, n_items + 1).astype(np.float32),
            "watch_level": np.linspace(1.0, 2.0, n_items + 1).astype(np.float32)}


def test_reward_model_adds_the_prior_level_and_keeps_it_in_its_state():
    from mtrec_dist.models.reward_model import QRIQLModel

    n, L = 9, 3
    rc = RewardConfig(num_quantiles=4)
    assert rc.uses_item_prior and not RewardConfig(consequences=["continue"]).uses_item_prior
    torch.manual_seed(0)
    plain = QRIQLModel(n, MODEL_CFG, RewardConfig(num_quantiles=4, item_prior=False), L).eval()
    torch.manual_seed(0)
    model = QRIQLModel(n, MODEL_CFG, rc, L, item_prior=_prior(n)).eval()
    s, fb = torch.randint(1, n + 1, (2, L)), torch.rand(2, L)
    cands = torch.arange(1, n + 1).expand(2, -1)
    with torch.no_grad():
        diff = model.reward_quantiles(s, fb, cands) - plain.reward_quantiles(s, fb, cands)
    assert torch.allclose(diff, torch.from_numpy(_prior(n)["level"][1:]).view(1, -1, 1).expand_as(diff), atol=1e-5)
    # a model rebuilt for scoring has no prior of its own: its checkpoint's state brings it back
    scorer = QRIQLModel(n, MODEL_CFG, rc, L)
    assert scorer.item_prior_level.abs().max() == 0
    scorer.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(scorer.item_prior_watch_level, model.item_prior_watch_level)
    # a warm start copies every tensor of the earlier checkpoint; the hook puts this run's prior back
    with torch.no_grad():
        model.item_prior_level.zero_()
    model.after_warm_start()
    assert torch.allclose(model.item_prior_level, torch.from_numpy(_prior(n)["level"]))


def test_reward_model_built_on_meta_gets_its_prior_when_materialised():
    from mtrec_dist.models.reward_model import QRIQLModel
    from mtrec_dist.training.sharding import materialize_dense

    n = 9
    model = QRIQLModel(n, MODEL_CFG, RewardConfig(num_quantiles=4), 3, device=torch.device("meta"),
                       item_prior=_prior(n))
    materialize_dense(model, torch.device("cpu"))
    assert torch.allclose(model.item_prior_watch_level, torch.from_numpy(_prior(n)["watch_level"]))
    with pytest.raises(ValueError, match="levels for 5 items"):
        QRIQLModel(5, MODEL_CFG, RewardConfig(), 3, item_prior=_prior(n))
    # built on meta for scoring (no prior of its own): zeros until its checkpoint is loaded, not stale memory
    scorer = QRIQLModel(n, MODEL_CFG, RewardConfig(num_quantiles=4), 3, device=torch.device("meta"))
    materialize_dense(scorer, torch.device("cpu"))
    assert scorer.item_prior_level.abs().max() == 0 and scorer.item_prior_watch_level.abs().max() == 0


def test_the_watch_term_sees_only_what_varies_within_an_item():
    """With the prior, the watch link's item offset is ``watch_level - k_y level``: an item whose rows sit at
    its watch level leaves no watch residual for the network's mean reward to explain, whatever its level."""
    from mtrec_dist.models.reward_model import QRIQLModel

    n, L, b = 9, 3, 16
    torch.manual_seed(0)
    model = QRIQLModel(n, MODEL_CFG, RewardConfig(num_quantiles=4, consequences=["watch", "continue"]), L,
                       item_prior=_prior(n))
    action = torch.randint(1, n + 1, (b,))
    wr = torch.sigmoid(torch.from_numpy(_prior(n)["watch_level"])[action])
    batch = dict(state_items=torch.randint(1, n + 1, (b, L)), state_feedback=torch.rand(b, L),
                 next_state_items=torch.randint(1, n + 1, (b, L)), next_state_feedback=torch.rand(b, L),
                 action=action, action_feedback=wr, done=torch.zeros(b))
    with torch.no_grad():  # zero the network's mean reward and the state's watch offset: Mbar = the prior level
        model.reward_weight.zero_()
        model.reward_item_bias.zero_()
        model.state_offsets.weight.zero_()
        model.state_offsets.bias.zero_()
        model.log_watch_link.copy_(torch.tensor([np.log(1.7), 0.0]))  # k_y = 1.7, not the prior's k
    out = model.losses(batch)
    # residual 0 on every row: L_y = log sigma_y = 0
    assert abs(float(out["cons_watch"])) < 1e-4


def test_a_checkpoint_spec_from_before_the_item_prior_rebuilds_a_model_without_it():
    from mtrec_dist.training.reward import reward_model_factory

    spec = {"kind": "qr_iql_reward_model", "num_items": 9, "state_len": 3,
            "model": dataclasses.asdict(MODEL_CFG), "reward": dataclasses.asdict(RewardConfig(num_quantiles=4))}
    assert reward_model_factory(spec, for_inference=True)(torch.device("cpu")).uses_item_prior
    del spec["reward"]["item_prior"], spec["reward"]["item_prior_watch_slope"]
    old = reward_model_factory(spec, for_inference=True)(torch.device("cpu"))
    assert not old.uses_item_prior and not hasattr(old, "item_prior_level")
