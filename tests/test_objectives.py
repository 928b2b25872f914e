"""Unit tests of the pure objective functions against hand-computed values, and of QRIQLModel's wiring."""
from __future__ import annotations

import math

import pytest
import torch

from mtrec_dist.config import ModelConfig, RewardConfig
from mtrec_dist.models.reward_model import NegativeSampler, QRIQLModel, catalog_gumbel_argmax
from mtrec_dist.objectives.qr_iql import (
    catalog_soft_value,
    cvar,
    cvar_along,
    distributional_soft_target,
    implied_reward,
    iq_chi2_loss,
    qr_iql_loss,
    quantile_huber_loss,
    quantile_midpoints,
    soft_value,
)
from mtrec_dist.objectives.ranking import chunked_logsumexp, full_softmax_ce, masked_mean, sampled_softmax_ce

torch.set_num_threads(1)
T = torch.tensor
LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# ---- soft value, implied reward, IQ ------------------------------------------------------------------


def test_quantile_midpoints():
    assert close(quantile_midpoints(4), [0.125, 0.375, 0.625, 0.875])


def test_soft_value_hand_values():
    assert close(soft_value(T([[0.0, LN3]]), 1.0), [LN4])  # log(1 + 3)
    assert close(soft_value(T([[0.0, 2 * LN3]]), 2.0), [2 * LN4])  # 2 log(1 + e^{ln 3})
    # log-q correction: log(e^{0 - ln 2} + e^{0 - 0}) = log 1.5
    assert close(soft_value(T([[0.0, 0.0]]), 1.0, log_q=T([LN2, 0.0])), [math.log(1.5)])
    # a masked candidate is ignored
    assert close(soft_value(T([[0.0, LN3, 100.0]]), 1.0, mask=T([[True, True, False]])), [LN4])


def test_catalog_soft_value_chunked_equals_dense_with_gradients():
    torch.manual_seed(0)
    q1 = torch.randn(3, 4, requires_grad=True)
    e1 = torch.randn(11, 4, requires_grad=True)
    q2, e2 = q1.detach().clone().requires_grad_(), e1.detach().clone().requires_grad_()
    dense = 0.5 * torch.logsumexp(q1 @ e1.T / 0.5, dim=1)
    chunked = catalog_soft_value(q2, e2, alpha=0.5, chunk=3)
    assert close(dense, chunked)
    dense.sum().backward()
    chunked.sum().backward()
    assert close(q1.grad, q2.grad) and close(e1.grad, e2.grad)
    assert close(chunked_logsumexp(q1, e1, chunk=100), torch.logsumexp(q1 @ e1.T, 1))


def test_implied_reward():
    assert close(implied_reward(T([2.0, 2.0]), T([3.0, 3.0]), T([0.0, 1.0]), 0.5), [0.5, 2.0])


def test_iq_chi2_loss_hand_value_and_mask():
    q, vs, vn = T([2.0, 1.0, 9.0]), T([3.0, 2.0, -7.0]), T([1.0, 5.0, 4.0])
    done, mask = T([0.0, 1.0, 0.0]), T([1.0, 1.0, 0.0])
    # r = [1.5, 1]; V(s) - g(1-d)V(s') = [2.5, 2]; (1/(4c)) E r^2 = 0.5 * (2.25 + 1) / 2
    expected = -1.25 + 2.25 + 0.8125
    assert close(iq_chi2_loss(q, vs, vn, done, 0.5, 0.5, mask), expected)
    assert close(iq_chi2_loss(q[:2], vs[:2], vn[:2], done[:2], 0.5, 0.5), expected)


def test_iq_chi2_debiased_value_and_gradient():
    q = T([2.0, 1.0], requires_grad=True)
    vs, vn, done = T([3.0, 2.0]), T([1.0, 5.0]), T([0.0, 1.0])
    rhat = T([1.0, 2.0])
    loss = iq_chi2_loss(q, vs, vn, done, 0.5, 0.5, expected_reward=rhat)
    # reg = 2 rhat r - rhat^2 = [2, 0] -> 0.5 * mean = 0.5
    assert close(loss, -1.25 + 2.25 + 0.5)
    loss.backward()
    # dL/dq_b = (-1 + (1/(2c)) rhat_b) / B = [0, 0.5]
    assert close(q.grad, [0.0, 0.5])
    # equals the plain form when rhat is the realised reward itself
    r = T([1.5, 1.0])
    assert close(iq_chi2_loss(q, vs, vn, done, 0.5, 0.5, expected_reward=r), iq_chi2_loss(q, vs, vn, done, 0.5, 0.5))


# ---- quantile regression ---------------------------------------------------------------------------


def test_quantile_huber_loss_hand_values():
    pred, target, taus = T([[0.0, 1.0]]), T([[0.5, 3.0]]), T([0.25, 0.75])
    # u = [[0.5, 3], [-0.5, 2]]; rho = [[.25*.125, .25*2.5], [.25*.125, .75*1.5]]; sum_i mean_j
    assert close(quantile_huber_loss(pred, target, taus, kappa=1.0), 0.90625)
    # kappa = 2: huber_2 = [[.125, 4], [.125, 2]] / 2
    assert close(quantile_huber_loss(pred, target, taus, kappa=2.0), 0.640625)
    # padding rows contribute nothing
    pred2, target2 = torch.cat([pred, T([[50.0, -50.0]])]), torch.cat([target, T([[0.0, 0.0]])])
    assert close(quantile_huber_loss(pred2, target2, taus, mask=T([1.0, 0.0])), 0.90625)


def test_quantile_huber_minimiser_is_the_quantiles():
    torch.manual_seed(0)
    samples = torch.linspace(0.0, 1.0, 201).view(1, -1)  # uniform on [0, 1]
    taus = quantile_midpoints(4)
    pred = torch.zeros(1, 4, requires_grad=True)
    opt = torch.optim.Adam([pred], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        quantile_huber_loss(pred, samples, taus, kappa=0.01).backward()
        opt.step()
    assert close(pred.detach()[0], taus, tol=0.03)


def test_distributional_soft_target():
    t = distributional_soft_target(T([1.0, 1.0]), T([[0.0, 2.0], [0.0, 2.0]]), T([-LN2, -LN2]), T([0.0, 1.0]), 0.5, 1.0)
    assert close(t[0], [1 + 0.5 * LN2, 1 + 0.5 * (2 + LN2)])
    assert close(t[1], [1.0, 1.0])
    assert not t.requires_grad


def test_cvar_hand_values():
    q = T([4.0, 1.0, 3.0, 2.0])
    assert close(cvar(q, 0.5), 1.5)
    assert close(cvar(q, 0.25), 1.0)
    assert close(cvar(q, 0.375), (0.25 * 1 + 0.125 * 2) / 0.375)
    assert close(cvar(q, 1.0), 2.5)
    with pytest.raises(ValueError):
        cvar(q, 0.0)


def test_tail_chunks_fit_the_cache_on_cpu_only():
    from mtrec_dist.models.reward_model import BASELINE_CHUNK_ELEMENTS, TAIL_CHUNK_ELEMENTS, tail_chunk_items

    assert tail_chunk_items(8192, 512 * 16, torch.device("cpu")) == TAIL_CHUNK_ELEMENTS // (512 * 16)
    assert tail_chunk_items(8192, 1, torch.device("cpu")) == 8192 and tail_chunk_items(8192, 0, torch.device("cpu")) == 8192
    assert tail_chunk_items(8192, 10 ** 9, torch.device("cpu")) == 1
    assert tail_chunk_items(8192, 512 * 16, torch.device("meta")) == 8192  # not a CPU: one launch per chunk
    assert tail_chunk_items(8192, 512, torch.device("cpu"), BASELINE_CHUNK_ELEMENTS) == BASELINE_CHUNK_ELEMENTS // 512


def test_cvar_along_hand_values():
    q = T([[4.0, 1.0, 3.0, 2.0]]).T  # the quantile axis first
    assert close(cvar_along(q, 0.5, dim=0), [1.5])
    assert close(cvar_along(q, 0.25, dim=0), [1.0])
    assert close(cvar_along(q, 0.375, dim=0), [(0.25 * 1 + 0.125 * 2) / 0.375])
    assert close(cvar_along(q, 1.0, dim=0), [2.5])
    with pytest.raises(ValueError):
        cvar_along(q, 0.0, dim=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 16, 17])
def test_cvar_along_matches_the_sorted_formula(n):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(7, 6, n, generator=g)
    q[0] = q[0, :, :1]  # ties: every quantile of these rows the same
    q[1, :, : n // 2] = 0.5  # and half of them tied
    for level in (0.05, 0.25, 0.3, 0.5, 0.9, 1.0):
        want = cvar(q, level)
        assert close(cvar_along(q, level), want, tol=1e-5)
        assert close(cvar_along(q.movedim(-1, 1), level, dim=1), want, tol=1e-5)


def test_qr_iql_total_composes_terms():
    torch.manual_seed(0)
    b, n = 5, 4
    args = dict(q_sa=torch.randn(b), v_s=torch.randn(b), v_next=torch.randn(b), done=T([0.0, 1, 0, 0, 1]),
                critic_quantiles=torch.randn(b, n), critic_targets=torch.randn(b, n),
                reward_quantiles=torch.randn(b, n), realised_reward=torch.randn(b), taus=quantile_midpoints(n),
                gamma=0.9, chi2_c=0.5, kappa=1.0, lambda_qr=0.3, lambda_r=2.0, mask=T([1.0, 1, 1, 0, 1]))
    out = qr_iql_loss(**args)
    iq = iq_chi2_loss(args["q_sa"], args["v_s"], args["v_next"], args["done"], 0.9, 0.5, args["mask"])
    qr = quantile_huber_loss(args["critic_quantiles"], args["critic_targets"], args["taus"], 1.0, args["mask"])
    rl = quantile_huber_loss(args["reward_quantiles"], args["realised_reward"].view(-1, 1), args["taus"], 1.0, args["mask"])
    assert close(out["loss"], iq + 0.3 * qr + 2.0 * rl)
    assert close(out["iq"], iq) and close(out["qr"], qr) and close(out["r"], rl)


# ---- cross-entropy ---------------------------------------------------------------------------------


def test_full_softmax_ce_hand_values():
    logits = T([[0.0, LN3], [0.0, LN3]])
    assert close(full_softmax_ce(logits, T([1, 0])), (math.log(4 / 3) + LN4) / 2)
    assert close(full_softmax_ce(logits, T([1, 0]), mask=T([1.0, 0.0])), math.log(4 / 3))
    assert close(full_softmax_ce(logits, T([1, 0]), weights=T([2.0, 0.0])), math.log(4 / 3))


def test_sampled_softmax_ce_log_q_and_accidental_hits():
    pos, neg = T([0.0]), T([[0.0, 0.0]])
    lq_pos, lq_neg = T([0.0]), T([LN2, LN2])
    assert close(sampled_softmax_ce(pos, neg, lq_pos, lq_neg), LN2)  # log(1 + .5 + .5)
    assert close(sampled_softmax_ce(pos, neg, lq_pos, lq_neg, neg_valid=T([[True, False]])), math.log(1.5))
    assert close(sampled_softmax_ce(pos, neg), math.log(3))


def test_masked_mean_all_padding_is_zero():
    assert close(masked_mean(T([5.0, 7.0]), T([0.0, 0.0])), 0.0)


# ---- the model ---------------------------------------------------------------------------------------

MODEL_CFG = ModelConfig(embedding_dim=8, encoder="sasrec", num_layers=1, num_heads=2, dropout=0.0)


def _batch(num_items: int, b: int = 6, L: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, num_items + 1, (b, L), generator=g)
    s[0] = 0  # an empty state (first action of a session)
    a = torch.randint(1, num_items + 1, (b,), generator=g)
    return {"state_items": s, "state_feedback": torch.rand(b, L, generator=g), "action": a,
            "next_state_items": torch.cat([s[:, 1:], a.view(-1, 1)], 1), "next_state_feedback": torch.rand(b, L, generator=g),
            "done": (torch.arange(b) % 3 == 0).float(), "mask": torch.ones(b)}


@pytest.mark.parametrize("num_negatives,sampler", [(0, "uniform"), (5, "uniform"), (5, "popularity")])
@pytest.mark.parametrize("objective", ["v1", "v2"])
def test_qriql_model_losses_finite_and_backprop(num_negatives, sampler, objective):
    torch.manual_seed(0)
    counts = torch.arange(21.0) if sampler == "popularity" else None
    rc = RewardConfig(num_quantiles=4, num_negatives=num_negatives, negative_sampler=sampler, catalog_chunk=7,
                      objective=objective)
    model = QRIQLModel(20, MODEL_CFG, rc, state_len=3, item_counts=counts)
    out = model(_batch(20))
    keys = (("iq", "value", "expert_logp") if objective == "v1" else ("choice", "consequence", "critic_spread"))
    for k in ("loss", "qr", "r", "reward_mean", "reward_spread") + keys:
        assert torch.isfinite(out[k]), k
    out["loss"].backward()
    assert model.critic_weight.grad is not None and model.reward_weight.grad is not None
    assert model.target_critic_weight.grad is None and all(p.grad is None for p in model.target_encoder.parameters())
    table = next(model.item_embedding.parameters())
    assert table.grad is not None and torch.isfinite(table.grad).all()


@pytest.mark.parametrize("objective", ["v1", "v2"])
def test_qriql_padding_rows_contribute_nothing(objective):
    torch.manual_seed(0)
    model = QRIQLModel(20, MODEL_CFG, RewardConfig(num_quantiles=4, objective=objective), state_len=3)
    batch = _batch(20, b=4)
    padded = {k: torch.cat([v, v[:2]]) for k, v in batch.items()}
    padded["mask"] = T([1.0, 1, 1, 1, 0, 0])
    torch.manual_seed(1)
    a = model(batch)
    torch.manual_seed(1)
    b = model(padded)
    for k in ("iq" if objective == "v1" else "consequence", "r", "reward_mean"):
        assert close(a[k], b[k], tol=1e-5), k


def test_qriql_target_polyak_and_sync():
    model = QRIQLModel(10, MODEL_CFG, RewardConfig(num_quantiles=4, polyak=0.25), state_len=3)
    assert torch.equal(model.critic_weight, model.target_critic_weight)
    with torch.no_grad():
        model.critic_weight.add_(1.0)
    before = model.target_critic_weight.clone()
    model.update_target()
    assert close(model.target_critic_weight, before + 0.25)
    model.update_target(tau=1.0)
    assert torch.equal(model.critic_weight, model.target_critic_weight)
    model.train()
    assert model.encoder.training and not model.target_encoder.training


@pytest.mark.parametrize("objective, order_items, tail_floats, prior", [
    ("v1", 0, 1 << 18, False), ("v2", 0, 1 << 18, False), ("v2", 4, 1 << 18, False), ("v2", 4, 20, False),
    ("v2", 0, 1 << 18, True), ("v2", 4, 20, True)])
def test_qriql_scoring_shapes_and_baseline_consistency(objective, order_items, tail_floats, prior, monkeypatch):
    import mtrec_dist.models.reward_model as reward_model

    monkeypatch.setattr(reward_model, "TAIL_CHUNK_ELEMENTS", tail_floats)  # 20 floats: 1 item per step
    torch.manual_seed(0)
    rc = RewardConfig(num_quantiles=4, catalog_chunk=4, alpha=0.7, objective=objective, order_items=order_items,
                      item_prior=prior)
    # the item prior's level, like the order term's, shifts every quantile of an item: the baseline must add it
    levels = {"level": torch.linspace(0.4, -0.4, 10).numpy(), "watch_level": torch.zeros(10).numpy()}
    model = QRIQLModel(9, MODEL_CFG, rc, state_len=3, item_prior=levels if prior else None).eval()
    assert model.uses_item_prior == prior
    if order_items:  # a per-item level, so the baseline must add it to every quantile
        with torch.no_grad():
            model.reward_item_level.copy_(torch.linspace(-0.05, 0.05, 10))
    b = _batch(9, b=3)
    s, fb = b["state_items"], b["state_feedback"]
    cands = torch.arange(1, 10).view(1, -1).expand(3, -1)
    with torch.no_grad():
        rq = model.reward_quantiles(s, fb, cands)
        sc = model.score(s, fb, cands)
        base = model.catalog_reward_baseline(s, fb)
    assert rq.shape == (3, 9, 4) and sc["q"].shape == (3, 9)
    pi = torch.softmax(sc["q"] / 0.7, dim=1)
    assert close(base["reward_baseline"], (pi * rq.mean(-1)).sum(1), tol=1e-5)
    assert close(base["reward_cvar_baseline"], (pi * cvar(rq, rc.cvar_alpha)).sum(1), tol=1e-5)
    assert close(base["value"], 0.7 * torch.logsumexp(sc["q"] / 0.7, 1), tol=1e-5)
    # over a drawn set (repeats allowed): the soft policy renormalised over that set, the same for every row
    drawn = torch.tensor([2, 5, 5, 9])
    with torch.no_grad():
        sub = model.reward_baseline_over(s, fb, drawn)
        sc = model.score(s, fb, drawn.view(1, -1).expand(3, -1))
    pi = torch.softmax(sc["q"] / 0.7, dim=1)
    assert close(sub["reward_baseline"], (pi * sc["reward_q"].mean(-1)).sum(1), tol=1e-5)
    assert close(sub["reward_cvar_baseline"], (pi * cvar(sc["reward_q"], rc.cvar_alpha)).sum(1), tol=1e-5)


def test_policy_draws_are_the_inverse_cdf_at_evenly_spaced_points():
    """Hand-computed: pi = [0.5, 0.25, 0.25], K = 4 points 1/8, 3/8, 5/8, 7/8 against the CDF [0.5, 0.75, 1]
    land on items 0, 0, 1, 2; seen in chunks of 2 items and 1 item, the same.  A row whose sum falls short of
    the last point (rounding) gives it the last item of positive probability, not the set's last item."""
    from mtrec_dist.models.reward_model import PolicyDraws

    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0], [0.3, 0.5, 0.0, 0.0]])
    expected = torch.tensor([[0, 0, 1, 2], [2, 2, 2, 2], [0, 1, 1, 1]])  # row 3 sums to 0.8 < 7/8
    for step in (4, 2, 1):
        draws = PolicyDraws(3, 4, 4, probs.device, probs.dtype)
        for start in range(0, 4, step):
            draws.add(probs[:, start:start + step], start)
        assert torch.equal(draws.positions(), expected), step


@pytest.mark.parametrize("order_items, budget", [(0, None), (4, None), (4, 256), (4, 2600)])
def test_sampled_cvar_baseline_is_close_to_exact(order_items, budget, monkeypatch):
    """Above ``cvar_draws`` items the CVaR baseline is the exact mean baseline plus the mean of CVaR - mean over
    the items at the policy's evenly spaced CDF points: equal to that formula computed directly, the mean
    baseline unchanged, and its error against the exact CVaR baseline no larger than the standard error of 64
    independent draws (systematic draws of items in no particular order are about as good as independent ones;
    the control variate makes that error small).  With a small CPU ``budget`` the catalog runs in chunks and
    the drawn items in blocks of rows: 256 floats, 8 items and 1 row per step; 2,600 floats, 81 items and 5 rows,
    each loop ending on a short step.  The same formula."""
    import mtrec_dist.models.reward_model as reward_model
    from mtrec_dist.objectives.qr_iql import cvar

    if budget:
        monkeypatch.setattr(reward_model, "BASELINE_CHUNK_ELEMENTS", budget)
    torch.manual_seed(0)
    n_items, draws = 400, 64
    model = QRIQLModel(n_items, MODEL_CFG, RewardConfig(num_quantiles=8, alpha=0.5, order_items=order_items),
                       state_len=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # spread the quantiles and the policy beyond their init
    b = _batch(n_items, b=32)
    s, fb, logged = b["state_items"], b["state_feedback"], b["action"].view(-1, 1)
    catalog = torch.arange(1, n_items + 1).expand(32, -1)
    with torch.no_grad():
        exact = model.catalog_reward_baseline(s, fb, candidate_items=logged)
        sampled = model.catalog_reward_baseline(s, fb, candidate_items=logged, cvar_draws=draws)
        sc = model.score(s, fb, catalog)  # q [B, C], reward_q [B, C, N] (item level included)
    rq = torch.sort(sc["reward_q"], -1).values
    shape = cvar(rq, 0.25) - rq.mean(-1)  # [B, C]: CVaR - mean of every (row, item)
    cdf = torch.softmax(sc["q"] / 0.5, dim=1).cumsum(1)
    points = ((torch.arange(draws) + 0.5) / draws).expand(32, -1).contiguous()
    picked = torch.searchsorted(cdf, points).clamp_max(n_items - 1)
    direct = exact["reward_baseline"] + shape.gather(1, picked).mean(1)
    assert close(sampled["reward_cvar_baseline"], direct, tol=1e-4)
    assert close(sampled["reward_baseline"], exact["reward_baseline"], tol=1e-5)
    assert close(sampled["reward_q"], exact["reward_q"], tol=0)
    assert close(exact["reward_q"], model.reward_quantiles(s, fb, logged), tol=1e-6)
    err = sampled["reward_cvar_baseline"] - exact["reward_cvar_baseline"]
    rmse = err.pow(2).mean().sqrt()
    assert rmse < 1.2 * shape.std() / math.sqrt(draws), (rmse, shape.std())
    assert rmse > 0  # an estimate, not the exact path taken by mistake


def test_sampled_soft_value_approaches_full_catalog():
    """The log-q-corrected estimate over many uniform negatives is close to the exact soft value."""
    torch.manual_seed(0)
    n, m = 50, 4000
    q = torch.randn(n)
    exact = torch.logsumexp(q, 0)
    sampler = NegativeSampler(n, "uniform")
    neg = sampler.sample(m, torch.device("cpu"))
    est = soft_value(q[neg - 1].view(1, -1), 1.0, log_q=sampler.log_expected_count(neg, m))
    assert abs(float(est) - float(exact)) < 0.05


def test_gumbel_sampler_matches_softmax():
    torch.manual_seed(0)
    items = torch.randn(5, 3)
    query = torch.randn(1, 3).expand(4000, -1)
    idx = catalog_gumbel_argmax(query, items, alpha=1.0, chunk=2)
    freq = torch.bincount(idx, minlength=5).float() / 4000
    assert close(freq, torch.softmax(query[0] @ items.T, 0), tol=0.03)


def test_draw_per_row_follows_each_rows_weights():
    """Each row's draws follow its own (unnormalised) weights within 5 standard errors; weight 0 is never drawn,
    in the middle or at either end of a row, and a row's scale does not matter."""
    from mtrec_dist.models.sampling import draw_per_row

    torch.manual_seed(0)
    weights = T([[0.0, 1.0, 0.0, 3.0, 0.0], [5.0, 0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0, 2e-3]])
    n = 20000
    idx = draw_per_row(weights.repeat(n, 1)).view(n, 3)
    for row in range(3):
        p = weights[row] / weights[row].sum()
        freq = torch.bincount(idx[:, row], minlength=5).float() / n
        assert (freq[p == 0] == 0).all()
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (row, freq, p)
    probs = torch.softmax(torch.randn(64, 1000), 1)
    assert draw_per_row(probs).shape == (64,) and draw_per_row(probs).dtype == torch.int64


def test_negative_sampler_validation():
    with pytest.raises(ValueError, match="item_counts"):
        NegativeSampler(5, "popularity")
    with pytest.raises(ValueError, match="length"):
        NegativeSampler(5, "popularity", item_counts=[1, 2, 3])
    s = NegativeSampler(5, "popularity", item_counts=[0, 10, 0, 0, 0, 0])
    draws = s.sample(2000, torch.device("cpu"))
    assert draws.min() >= 1 and draws.max() <= 5
    assert (draws == 1).float().mean() > 0.6  # (10+1)/(10+5) = 0.73


def test_qriql_builds_on_meta_and_dmp_materialises_it(tmp_path):
    """Build on `meta`, wrap in a one-process DistributedModelParallel (gloo), check init + a step."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    meta = QRIQLModel(20, MODEL_CFG, RewardConfig(num_quantiles=4), state_len=3, device=torch.device("meta"))
    assert all(p.is_meta for p in meta.parameters())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharder = EmbeddingCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                           "learning_rate": 0.05})
        dmp = DistributedModelParallel(meta, device=torch.device("cpu"), sharders=[sharder])
        model = dmp.module
        dense = [p for n, p in model.named_parameters() if "item_embedding" not in n]
        assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in dense)
        assert torch.equal(model.critic_weight, model.target_critic_weight)
        assert all(torch.equal(a, b) for a, b in zip(model.encoder.parameters(), model.target_encoder.parameters()))
        out = dmp(_batch(20))
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        assert model.critic_weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_consumption_implied_reward_is_the_inverse_of_a_soft_binary_choice():
    from mtrec_dist.objectives.qr_iql import consumption_implied_reward, realised_reward_target

    y = torch.tensor([0.5, 0.75, 1.0, 0.0])
    # alpha * logit(y): logit(0.5) = 0, logit(0.75) = ln 3, and y is clipped to [0.02, 0.98]: ln 49.
    expected = 2.0 * torch.tensor([0.0, math.log(3.0), math.log(49.0), -math.log(49.0)])
    torch.testing.assert_close(consumption_implied_reward(y, alpha=2.0), expected)
    # sigmoid(r_c / alpha) recovers the watch ratio inside the clip range
    torch.testing.assert_close(torch.sigmoid(consumption_implied_reward(y[:2], 2.0) / 2.0), y[:2])
    implied = torch.tensor([1.0, -1.0, 0.5, 0.0], requires_grad=True)
    spec = realised_reward_target(implied, y, 2.0, choice_weight=1.0, consumption_weight=0.0)
    torch.testing.assert_close(spec, implied.detach())
    mixed = realised_reward_target(implied, y, 2.0, choice_weight=0.5, consumption_weight=1.0)
    torch.testing.assert_close(mixed, 0.5 * implied.detach() + expected)
    assert not mixed.requires_grad  # a regression target: no gradient into the critic


@pytest.mark.parametrize("num_negatives", [0, 5])
def test_v2_choice_term_reads_the_slate_where_a_row_has_one(num_negatives):
    """Rows with a slate are fitted to the click among the slate (R2), the others to the catalog choice; a
    row of padding means no slate, the clicked item inside its own slate is not its own competitor, and a
    slate that does not hold the clicked item is not its choice set."""
    torch.manual_seed(0)
    rc = RewardConfig(num_quantiles=4, num_negatives=num_negatives, objective="v2")
    model = QRIQLModel(20, MODEL_CFG, rc, state_len=3)
    batch = _batch(20)
    torch.manual_seed(1)
    without = model(batch)["choice"]
    slate = torch.zeros(6, 4, dtype=torch.long)
    slate[1] = torch.tensor([batch["action"][1].item(), 3, 4, 0])  # shown with items 3 and 4
    slate[2, 0] = batch["action"][2]  # shown alone: no choice among others, the catalog stays
    others = [i for i in range(1, 21) if i != batch["action"][3].item()][:3]
    slate[3, :3] = torch.tensor(others)  # a slate without the clicked item: the catalog stays
    torch.manual_seed(1)
    out = model({**batch, "slate_items": slate})
    assert torch.isfinite(out["loss"])
    # by hand: row 1's catalog NLL replaced by its slate NLL
    with torch.no_grad():
        s, fb = batch["state_items"], batch["state_feedback"]
        emb = model.item_embedding({"state": s})["state"]
        h = model._encode(model.encoder, emb, s, fb)
        u = model.policy_projection(h) @ model.item_embedding({"catalog": model.catalog_ids(s.device)})["catalog"].T
        a = batch["action"]
        slate_nll = torch.logsumexp(u[1, torch.stack([a[1], torch.tensor(3), torch.tensor(4)]) - 1], 0) - u[1, a[1] - 1]
        catalog_rows = torch.nn.functional.cross_entropy(u, a - 1, reduction="none")
    if num_negatives == 0:
        assert without.item() == pytest.approx(catalog_rows.mean().item(), rel=1e-5)
        expected = (catalog_rows.sum() - catalog_rows[1] + slate_nll) / 6
        assert out["choice"].item() == pytest.approx(expected.item(), rel=1e-5)
    else:  # sampled catalog rows: only row 1 can differ from the run without slates
        assert out["choice"].item() != pytest.approx(without.item())
    off = RewardConfig(num_quantiles=4, num_negatives=num_negatives, objective="v2", slate_choice=False)
    model_off = QRIQLModel(20, MODEL_CFG, off, state_len=3)
    model_off.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    assert model_off({**batch, "slate_items": slate})["choice"].item() == pytest.approx(without.item(), rel=1e-6)
