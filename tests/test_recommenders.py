"""Sequential recommenders: every backbone's forward/backward, scoring shapes and a tiny overfit."""
from __future__ import annotations

import pytest
import torch

from mtrec_dist.config import ModelConfig, RecConfig
from mtrec_dist.models.recommender import BACKBONES, SequentialRecommender

torch.set_num_threads(1)
N_ITEMS, L, D = 30, 4, 16
MODEL_CFG = ModelConfig(embedding_dim=D, num_layers=1, num_heads=2, dropout=0.0, caser_h_filters=4,
                        caser_v_filters=2, nextitnet_dilations=[1, 2])


def make_batch(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, N_ITEMS + 1, (b, L), generator=g)
    s[0] = 0
    a = torch.randint(1, N_ITEMS + 1, (b,), generator=g)
    return {"state_items": s, "state_feedback": torch.rand(b, L, generator=g), "action": a,
            "action_feedback": torch.rand(b, generator=g),
            "next_state_items": torch.cat([s[:, 1:], a.view(-1, 1)], 1),
            "next_state_feedback": torch.rand(b, L, generator=g), "done": torch.zeros(b), "mask": torch.ones(b),
            "reward_mean": torch.randn(b, generator=g), "reward_baseline": torch.zeros(b),
            "reward_cvar": torch.randn(b, generator=g)}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("num_negatives", [0, 8])
def test_forward_backward_and_scoring_shapes(backbone, num_negatives):
    torch.manual_seed(0)
    rec = SequentialRecommender(N_ITEMS, backbone, MODEL_CFG, RecConfig(num_negatives=num_negatives), state_len=L)
    batch = make_batch()
    out = rec(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in rec.encoder.parameters())
    assert torch.isfinite(next(rec.item_embedding.parameters()).grad).all()
    with torch.no_grad():
        s, fb = batch["state_items"], batch["state_feedback"]
        assert rec.score_items(s, fb, torch.randint(1, N_ITEMS + 1, (16, 7))).shape == (16, 7)
        full = rec.score_catalog(s, fb, torch.arange(1, N_ITEMS + 1))
        assert full.shape == (16, N_ITEMS)
        # score_items and score_catalog agree on the same items
        ids = torch.arange(1, 6).view(1, -1).expand(16, -1)
        assert torch.allclose(rec.score_items(s, fb, ids), full[:, :5], atol=1e-5)


def test_full_softmax_equals_reference_ce():
    torch.manual_seed(0)
    rec = SequentialRecommender(N_ITEMS, "gru4rec", MODEL_CFG, RecConfig(), state_len=L).eval()
    batch = make_batch()
    out = rec(batch)
    with torch.no_grad():
        logits = rec.score_catalog(batch["state_items"], batch["state_feedback"], torch.arange(1, N_ITEMS + 1))
        ref = torch.nn.functional.cross_entropy(logits, batch["action"] - 1)
    assert torch.allclose(out["ce"], ref, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tiny_overfit(backbone):
    torch.manual_seed(0)
    rec = SequentialRecommender(N_ITEMS, backbone, MODEL_CFG, RecConfig(), state_len=L)
    opt = torch.optim.Adam(rec.parameters(), lr=0.02)
    batches = [make_batch(b=8, seed=i) for i in range(2)]
    first = float(rec(batches[0])["ce"])
    for _ in range(60):
        for batch in batches:
            loss = rec(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    final = max(float(rec(b)["ce"]) for b in batches)
    assert final < 0.3 * first, (first, final)


def test_padding_rows_are_ignored():
    torch.manual_seed(0)
    rec = SequentialRecommender(N_ITEMS, "sasrec", MODEL_CFG, RecConfig(guidance="reweight"), state_len=L).eval()
    batch = make_batch(b=6)
    padded = {k: torch.cat([v, v[:3]]) for k, v in batch.items()}
    padded["mask"] = torch.tensor([1.0] * 6 + [0.0] * 3)
    padded["action"][6:] = 0  # padding rows may carry the padding item
    padded["reward_mean"][6:] = 1e6  # and garbage scores
    a, b = rec(batch), rec(padded)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-5)


def test_guided_mode_without_reward_columns_names_them():
    rec = SequentialRecommender(N_ITEMS, "sasrec", MODEL_CFG, RecConfig(guidance="reweight"), state_len=L)
    batch = make_batch()
    del batch["reward_baseline"]
    with pytest.raises(KeyError, match="reward_baseline"):
        rec(batch)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        SequentialRecommender(N_ITEMS, "bert4rec", MODEL_CFG, RecConfig(), state_len=L)


def test_actor_critic_head_only_in_that_mode():
    plain = SequentialRecommender(N_ITEMS, "gru4rec", MODEL_CFG, RecConfig(guidance="reweight"), state_len=L)
    ac = SequentialRecommender(N_ITEMS, "gru4rec", MODEL_CFG, RecConfig(guidance="actor_critic"), state_len=L)
    assert plain.q_head is None and ac.q_head is not None
    out = ac(make_batch())
    assert torch.isfinite(out["td"])
    out["loss"].backward()
    assert ac.q_head.weight.grad is not None
