"""QR-IQL v2 objectives: hand-computed references and a tabular truth test (method.md section 5).

The tabular world: states 0..S-1, actions 0..A-1, ``s' = a mod S``.  Consuming ``a`` in ``s`` gives a
private, stochastic mental reward ``m ~ N(mu(s,a), sd(s,a)^2)`` that is never logged; it shows only in
its consequences: the watch logit ``z = K_Y m + d_s + N(0, 1)``, staying ``P = sigmoid(m + W_s)``, and,
after leaving, returning ``P = sigmoid(m + WR_s)``.  Logged actions are uniform (the choice carries no
information about ``m``: everything must come from the consequences).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtrec_dist.evaluation.metrics import spearman
from mtrec_dist.objectives.mental_reward import (
    ConsequenceModel, choice_nll, consequence_nll, mental_return_target, order_nll, realised_mental_reward,
    shown_choice_nll, watch_logit,
)
from mtrec_dist.data.sessionize import later_in_session, with_later_items
from mtrec_dist.objectives.qr_iql import distributional_soft_target, quantile_huber_loss, quantile_midpoints

S, A, K_Y, GAMMA, N = 3, 6, 0.8, 0.6, 8


def _world(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return dict(mu=rng.normal(0, 1, (S, A)), sd=rng.uniform(0.05, 2.0, (S, A)),
                d=rng.normal(0, 0.5, S), W=rng.normal(1.0, 0.3, S), WR=rng.normal(0.0, 0.3, S))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _log(world: dict, n: int, seed: int = 1) -> dict:
    """``n`` logged transitions from episodes of uniform choices."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("s", "a", "s2", "m", "z", "stay", "ret", "known")}
    s = 0
    for _ in range(n):
        a = int(rng.integers(A))
        m = world["mu"][s, a] + world["sd"][s, a] * rng.standard_normal()
        stay = rng.random() < _sigmoid(m + world["W"][s])
        ret = rng.random() < _sigmoid(m + world["WR"][s])
        for k, v in zip(cols, (s, a, a % S, m, K_Y * m + world["d"][s] + rng.standard_normal(), stay, ret, not stay)):
            cols[k].append(v)
        s = a % S if stay else 0
    out = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in cols.items()}
    for k in ("s", "a", "s2"):
        out[k] = out[k].long()
    return out


def _true_return_sd(world: dict, n: int = 4000, horizon: int = 12, seed: int = 2) -> np.ndarray:
    """Monte Carlo std of the mental return ``G = m + gamma (1 - done) G'`` of each (s, a), a' uniform."""
    rng = np.random.default_rng(seed)
    sd = np.zeros((S, A))
    for s0 in range(S):
        for a0 in range(A):
            g = np.zeros(n)
            disc = np.ones(n)
            s, a, alive = np.full(n, s0), np.full(n, a0), np.ones(n, bool)
            for _ in range(horizon):
                m = world["mu"][s, a] + world["sd"][s, a] * rng.standard_normal(n)
                g += np.where(alive, disc * m, 0.0)
                alive &= rng.random(n) < _sigmoid(m + world["W"][s])
                disc *= GAMMA
                s, a = a % S, rng.integers(A, size=n)
            sd[s0, a0] = g.std()
    return sd


def _outcomes(log: dict) -> dict:
    return dict(z=log["z"], has_watch=torch.ones_like(log["z"]), stay=log["stay"], returned=log["ret"],
                return_known=log["known"])


def _tabular_model(p: dict, s: torch.Tensor) -> ConsequenceModel:
    """The consequence model of tabular parameters ``p`` at the rows' states ``s``."""
    return ConsequenceModel(d=p["d"][s], W=p["W"][s], W_r=p["WR"][s], k_y=p["log_k"].exp(),
                            sigma_y=p["log_sig"].exp())


def _fit_consequences(log: dict, steps: int = 600) -> dict:
    """Tabular Mbar[s, a] and state offsets fitted by :func:`consequence_nll` alone."""
    torch.manual_seed(0)
    p = {k: torch.zeros(shape, requires_grad=True) for k, shape in
         (("M", (S, A)), ("d", (S,)), ("W", (S,)), ("WR", (S,)), ("log_k", ()), ("log_sig", ()))}
    opt = torch.optim.Adam(p.values(), lr=0.05)
    out = _outcomes(log)
    for _ in range(steps):
        mbar = p["M"][log["s"], log["a"]]
        loss = consequence_nll(mbar, out, _tabular_model(p, log["s"]))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


# ---- hand-computed references ---------------------------------------------------------------------------
def test_watch_logit_clips_and_inverts_the_sigmoid():
    y = torch.tensor([0.0, 0.5, 0.880797, 1.0])
    z = watch_logit(y)
    assert torch.allclose(z[1:3], torch.tensor([0.0, 2.0]), atol=1e-4)
    assert torch.allclose(z[[0, 3]], torch.tensor([math.log(0.02 / 0.98), math.log(0.98 / 0.02)]))


def test_consequence_nll_matches_a_hand_computed_value():
    mbar = torch.tensor([0.5, -1.0])
    model = ConsequenceModel(d=torch.tensor([0.0, 1.0]), W=torch.tensor([0.0, 0.5]), W_r=torch.tensor([1.0, 0.0]),
                             k_y=torch.tensor(2.0), sigma_y=torch.tensor(1.0))
    out = dict(z=torch.tensor([1.0, 0.0]), has_watch=torch.tensor([1.0, 1.0]), stay=torch.tensor([1.0, 0.0]),
               returned=torch.tensor([0.0, 1.0]), return_known=torch.tensor([0.0, 1.0]))
    res = consequence_nll(mbar, out, model)
    # y: residuals 1 - 1 - 0 = 0 and 0 + 2 - 1 = 1 -> (0 + 0.5) / 2
    assert res["y"].item() == pytest.approx(0.25)
    # continue: -log sigmoid(0.5) and -log(1 - sigmoid(-0.5)), mean
    ref_c = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 - 1 / (1 + math.exp(0.5)))) / 2
    assert res["continue"].item() == pytest.approx(ref_c, rel=1e-5)
    # return: only row 2 is known: -log sigmoid(-1.0), divided by 2 real rows
    assert res["return"].item() == pytest.approx(-math.log(1 / (1 + math.exp(1.0))) / 2, rel=1e-5)


def test_realised_reward_is_the_gaussian_posterior_mean_when_only_watch_is_seen():
    mbar = torch.tensor([0.0])
    model = ConsequenceModel(d=torch.zeros(1), W=torch.full((1,), -50.0), W_r=torch.zeros(1),  # p_c ~ 0: no continue info
                             k_y=torch.tensor(1.0), sigma_y=torch.tensor(1.0))
    out = dict(z=torch.tensor([2.0]), has_watch=torch.ones(1), stay=torch.zeros(1), returned=torch.zeros(1),
               return_known=torch.zeros(1))
    m = realised_mental_reward(mbar, out, model, prior_sd=1.0)
    # prior N(0, 1), z = m + N(0, 1) observed at 2 -> posterior mean 1
    assert m.item() == pytest.approx(1.0, abs=1e-4)


def test_mental_return_target_and_choice_nll_by_hand():
    t = mental_return_target(torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 10.0], [5.0, 6.0]]),
                             torch.tensor([0.0, 1.0]), gamma=0.5)
    assert torch.equal(t, torch.tensor([[1.0, 6.0], [2.0, 2.0]]))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert choice_nll(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_slate_choice_nll_by_hand():
    # row 0: P(clicked) = 2 / (2 + 1 + 3); row 1: nothing else shown -> 0; row 2: 1 / (1 + e^0), one slot padded
    chosen = torch.tensor([math.log(2.0), 0.0, 0.0])
    shown = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0], [0.0, 9.0]])
    keep = torch.tensor([[1, 1], [0, 0], [1, 0]])
    assert shown_choice_nll(chosen, shown, keep).tolist() == pytest.approx([math.log(3.0), 0.0, math.log(2.0)])
    # rows on a slate use the slate's NLL, the others the catalog's: (log 3 + -log 0.75) / 2
    catalog = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    on_slate = torch.tensor([True, False])
    l_u = choice_nll(catalog, torch.tensor([1, 1]), None, shown_choice_nll(chosen[:2], shown[:2], keep[:2]), on_slate)
    assert l_u.item() == pytest.approx((math.log(3.0) - math.log(0.75)) / 2, rel=1e-6)


def _fit_item_utility(choice_sets: torch.Tensor, clicked: torch.Tensor, num_items: int, on_slate: bool) -> np.ndarray:
    """A per-item utility fitted by :func:`choice_nll`: over the slates shown (R2) or over the whole catalog."""
    u = torch.zeros(num_items, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.1)
    for _ in range(300):
        logits = u.expand(len(clicked), num_items)
        if on_slate:
            others = choice_sets != clicked.unsqueeze(1)
            nll = shown_choice_nll(u[clicked], u[choice_sets], others)
            loss = choice_nll(logits, clicked, None, nll, torch.ones_like(clicked, dtype=torch.bool))
        else:
            loss = choice_nll(logits, clicked)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return u.detach().numpy()


def test_slate_choice_recovers_appeal_that_the_catalog_confounds_with_exposure():
    """The logging policy shows some items far more often, whatever their appeal; clicks follow appeal within
    the slate.  Over the catalog a fitted utility ranks items by how often they were shown; over the slate it
    ranks them by appeal (R2: the shown slate is the choice set)."""
    rng = np.random.default_rng(0)
    n_items, n_slates, k = 30, 20000, 5
    appeal = rng.normal(0, 1, n_items)
    exposure = np.exp(2.0 * rng.normal(0, 1, n_items))  # independent of appeal
    p_show = exposure / exposure.sum()
    slates = np.stack([rng.choice(n_items, k, replace=False, p=p_show) for _ in range(n_slates)])
    p_click = np.exp(appeal[slates])
    p_click /= p_click.sum(1, keepdims=True)
    col = (rng.random((n_slates, 1)) > np.cumsum(p_click, 1)).sum(1)
    clicked = torch.as_tensor(slates[np.arange(n_slates), col])
    sets = torch.as_tensor(slates)
    slate_u = _fit_item_utility(sets, clicked, n_items, on_slate=True)
    catalog_u = _fit_item_utility(sets, clicked, n_items, on_slate=False)
    assert spearman(slate_u, appeal) > 0.9
    assert spearman(catalog_u, appeal) < 0.6
    assert spearman(catalog_u, exposure) > spearman(catalog_u, appeal)


def test_order_nll_by_hand():
    # row 0: P(first) = 2 / (2 + 1 + 3); row 1 has no later item (left out); row 2: 1 / (1 + 1), one slot padded
    first = torch.tensor([math.log(2.0), 0.0, 0.0])
    later = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0], [0.0, 9.0]])
    keep = torch.tensor([[1, 1], [0, 0], [1, 0]])
    assert order_nll(first, later, keep).item() == pytest.approx((math.log(3.0) + math.log(2.0)) / 2, rel=1e-6)
    masked = order_nll(first, later, keep, mask=torch.tensor([1.0, 1.0, 0.0]))
    assert masked.item() == pytest.approx(math.log(3.0), rel=1e-6)


def test_later_in_session_stops_at_the_session_end_and_skips_ties():
    action, done = np.array([1, 2, 3, 4, 5]), np.array([0, 0, 1, 0, 1])
    assert later_in_session(action, np.array([0, 1, 2, 3, 4]), done, 2).tolist() == [[2, 3], [3, 0], [0, 0], [5, 0], [0, 0]]
    # items 1 and 2 share a ts: neither was chosen before the other
    assert later_in_session(action, np.array([0, 0, 2, 3, 4]), done, 2).tolist() == [[3, 0], [3, 0], [0, 0], [5, 0], [0, 0]]
    assert later_in_session(np.array([7]), np.array([5]), np.array([1]), 3).tolist() == [[0, 0, 0]]


def test_with_later_items_orders_a_block_by_user_sequence_before_reading_sessions():
    import pyarrow as pa

    # user 4: session (items 1, 2, 3) then session (item 4); user 9: one session (items 5, 6); rows shuffled
    t = pa.table({"user_idx": [9, 4, 4, 9, 4, 4], "row_id": [21, 12, 10, 20, 11, 13], "action": [6, 3, 1, 5, 2, 4],
                  "ts": [70, 30, 10, 60, 20, 40], "done": [1, 1, 0, 0, 0, 1]})
    out = with_later_items(t, k=2)
    assert out.column("row_id").to_pylist() == [10, 11, 12, 13, 20, 21]
    assert out.column("later_items").to_pylist() == [[2, 3], [3, 0], [0, 0], [0, 0], [6, 0], [0, 0]]


def test_later_in_session_draws_one_item_per_stratum_of_a_long_session():
    later = later_in_session(np.arange(1, 101), np.arange(100), np.r_[np.zeros(99), 1], 4)
    first = later[0] - 1  # positions of the drawn later choices of row 0 (rest: rows 1..99)
    assert [1 + 99 * j // 4 <= p < 1 + 99 * (j + 1) // 4 + 1 for j, p in enumerate(first)] == [True] * 4


# ---- tabular truth --------------------------------------------------------------------------------------
def test_consequences_identify_the_mean_mental_reward():
    """Mbar fitted to consequences alone (uniform choices) ranks actions like the true mu within states,
    and the realised reward of an event tracks its hidden draw."""
    world = _world()
    log = _log(world, 20_000)
    p = _fit_consequences(log)
    rho = np.mean([spearman(p["M"][s].numpy(), world["mu"][s]) for s in range(S)])
    assert rho >= 0.8, rho
    m = realised_mental_reward(p["M"][log["s"], log["a"]], _outcomes(log), _tabular_model(p, log["s"]), prior_sd=1.0)
    assert np.corrcoef(m.numpy(), log["m"].numpy())[0, 1] > 0.6


def _fit_critic(log: dict, realised: torch.Tensor, target: str, steps: int = 1500, batch: int = 512) -> torch.Tensor:
    """Tabular quantile critic Z[s, a, :] trained with the v1 (circular) or v2 target."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(S, A, N, generator=gen) + torch.linspace(-1, 1, N)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    taus = quantile_midpoints(N)
    n = log["s"].shape[0]
    for _ in range(steps):
        i = torch.randint(0, n, (batch,), generator=gen)
        s, a, s2, done = log["s"][i], log["a"][i], log["s2"][i], 1.0 - log["stay"][i]
        with torch.no_grad():
            a2 = torch.randint(0, A, (batch,), generator=gen)
            z_next = z[s2, a2]
            if target == "v2":
                t = mental_return_target(realised[i], z_next, done, GAMMA)
            else:  # v1: r = Q - gamma (1-d) V(s'), a' ~ pi, alpha log pi = Qbar' - V'
                q = z.mean(-1)
                v2 = torch.logsumexp(q[s2], dim=1)
                pi = torch.softmax(q[s2], dim=1)
                a2 = torch.multinomial(pi, 1).squeeze(1)
                z_next = z[s2, a2]
                r = q[s, a] - GAMMA * (1 - done) * v2
                t = distributional_soft_target(r, z_next, q[s2, a2] - v2, done, GAMMA, 1.0)
        loss = quantile_huber_loss(z[s, a], t, taus)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return z.detach()


def test_v2_critic_spread_tracks_the_true_return_spread_and_v1_collapses():
    world = _world()
    log = _log(world, 20_000)
    p = _fit_consequences(log)
    realised = realised_mental_reward(p["M"][log["s"], log["a"]], _outcomes(log), _tabular_model(p, log["s"]),
                                      prior_sd=1.0)
    true_sd = _true_return_sd(world).ravel()
    spread = lambda z: (z[..., -2] - z[..., 1]).ravel().numpy()  # noqa: E731  (inner quantile range)
    z2 = _fit_critic(log, realised, "v2")
    z1 = _fit_critic(log, realised, "v1")
    assert spearman(spread(z2), true_sd) >= 0.7, (spread(z2), true_sd)
    # v1's target contains nothing observed: its only fixed point has every quantile equal
    assert spread(z1).mean() < 0.2 * spread(z2).mean(), (spread(z1).mean(), spread(z2).mean())


def test_order_term_recovers_item_preference_from_self_directed_sessions():
    """A judgement log (no consequences): each session's items are chosen in Plackett-Luce order of a hidden
    per-item preference. The per-item level, fitted to that order alone, ranks items like the preference,
    and with no consequences the state part of the mental reward stays 0 (nothing to fit it to)."""
    from mtrec_dist.config import ModelConfig, RewardConfig
    from mtrec_dist.models.reward_model import QRIQLModel

    rng = np.random.default_rng(0)
    n_items, L, sess_len = 20, 3, 6
    pref = rng.normal(size=n_items + 1)
    actions, ts, done = [], [], []
    for s in range(600):
        items = rng.choice(np.arange(1, n_items + 1), sess_len, replace=False)
        order = items[np.argsort(-(pref[items] + rng.gumbel(size=sess_len)))]
        actions += order.tolist()
        ts += list(range(s * 100, s * 100 + sess_len))
        done += [0] * (sess_len - 1) + [1]
    action, ts, done = np.array(actions), np.array(ts), np.array(done, np.float32)
    later = later_in_session(action, ts, done, 4)
    torch.manual_seed(0)
    cfg = RewardConfig(num_quantiles=4, consequences=[], order_items=4)
    model = QRIQLModel(n_items, ModelConfig(embedding_dim=8, encoder="gru4rec", num_layers=1, dropout=0.0), cfg, L)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = torch.zeros(len(action), L, dtype=torch.long)
    for step in range(150):
        idx = torch.from_numpy(rng.integers(0, len(action), 256))
        batch = dict(state_items=state[idx], state_feedback=torch.ones(256, L), next_state_items=state[idx],
                     next_state_feedback=torch.ones(256, L), action=torch.from_numpy(action)[idx],
                     done=torch.from_numpy(done)[idx], later_items=torch.from_numpy(later)[idx])
        out = model.losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    level = model.item_level(torch.arange(1, n_items + 1)).detach().numpy()
    assert spearman(level, pref[1:]) >= 0.8
    assert model.reward_weight.abs().max() == 0 and model.reward_item_bias.abs().max() == 0
    scores = model.reward_quantiles(state[:2], torch.ones(2, L), torch.arange(1, n_items + 1).expand(2, -1))
    assert torch.allclose(scores, torch.from_numpy(level).float().view(1, -1, 1).expand_as(scores), atol=1e-5)
