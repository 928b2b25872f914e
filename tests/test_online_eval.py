"""Online evaluation in the simulator separates a satisfaction-seeking policy from a clickbait-seeking one."""
import numpy as np
import torch

from mtrec_dist.config import SimulatorConfig
from mtrec_dist.data.simulator import make_item_truth
from mtrec_dist.evaluation.online import evaluate_online, histories_to_state, recommender_policy, vocab_maps


def test_histories_to_state_left_pads_and_maps_unknown_to_zero():
    raw_to_idx = np.array([0, 5, 6, 0])  # raw 0 and 3 unknown
    items, fb = histories_to_state([np.array([1, 2, 3]), np.array([], dtype=np.int64)],
                                   [np.array([0.1, 0.2, 0.3], np.float32), np.array([], np.float32)], raw_to_idx, 4)
    assert items.tolist() == [[0, 5, 6, 0], [0, 0, 0, 0]]
    assert np.allclose(fb.numpy()[0], [0, 0.1, 0.2, 0.0])


def test_quality_policy_beats_clickbait_policy_on_satisfaction_not_ctr():
    cfg = SimulatorConfig(num_users=300, num_items=200, max_session_len=8, clickbait_fraction=0.25, seed=3)
    truth = make_item_truth(cfg)
    raw = np.arange(cfg.num_items)
    raw_to_idx, idx_to_raw = vocab_maps(raw, raw + 1, cfg.num_items)

    def by(values):
        row = torch.cat([torch.zeros(1), torch.as_tensor(values, dtype=torch.float32)])
        return lambda items, fb: row.expand(items.shape[0], -1)

    policies = {
        "clickbait_first": recommender_policy(by(truth.appeal), raw_to_idx, idx_to_raw, 5, cfg.slate_size),
        "quality_first": recommender_policy(by(truth.quality), raw_to_idx, idx_to_raw, 5, cfg.slate_size),
    }
    res = evaluate_online(policies, cfg, truth, seeds=[0, 1, 2], num_users=60)
    q, c = res["quality_first"], res["clickbait_first"]
    assert q["satisfaction"]["mean"] > c["satisfaction"]["mean"]
    assert c["ctr"]["mean"] > q["ctr"]["mean"]
    gain = q["paired_gain"]["satisfaction"]
    assert gain["lo"] > 0, gain  # the CI of the paired gain excludes 0
    assert len(q["ctr"]["per_seed"]) == 3
