"""Controls for the tilt row ("F tilt", mtrec_dist/serving_tilt.py) on the held-out users of a real log: at a
given strength, the click SASRec (row A) tilted by F's reward, by F's reward shuffled over items, by row C's
supervised leave/return classifier (the regressor of the same observable feedback), and by the true item like-rate
(the training users' withheld labels, smoothed): how much of what a tilt can gain the reward has.

It rebuilds row A's model and F's reward exactly as `mtrec ablate` does at ``--seed`` (the same figures to the last
digit), so run it with the strength the ablation chose at that seed (its table lists them).  The data is read by
path and never committed (MovieLens: no redistribution); prepare it first with `mtrec ablate` or `mtrec prepare`.

    .venv/bin/python bench/ml1m_tilt_controls.py --seed 0 --strength 0.1 \\
        --set prepare.input=/path/to/ratings_users0001-2999.dat [--config configs/ml1m.yaml] [--out controls.json]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mtrec_dist.ablation import click_sasrec, fit, row_scorer
from mtrec_dist.config import load_config
from mtrec_dist.data.heldout import split_rows
from mtrec_dist.data.prepare import default_paths
from mtrec_dist.evaluation.metrics import hr_ndcg_all_and_satisfied
from mtrec_dist.real_data import prepared_data
from mtrec_dist.serving_tilt import TILTED_REWARD, tilted_ranks

LIKE_RATE_PRIOR_ROWS = 20  # the like-rate of an item shrunk toward the mean by this many pseudo-rows


def like_rate(data, train: np.ndarray, num_items: int) -> torch.Tensor:
    """Each item's share of satisfied targets among the training rows that chose it, shrunk toward the mean."""
    sat = data["satisfied"][train].astype(float)
    chosen = data["action"][train] - 1
    count = np.bincount(chosen, minlength=num_items)
    liked = np.bincount(chosen, weights=sat, minlength=num_items)
    return torch.from_numpy((liked + LIKE_RATE_PRIOR_ROWS * sat.mean()) / (count + LIKE_RATE_PRIOR_ROWS)).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ml1m.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, required=True, help="the training seed (train.seed + k of the ablation)")
    p.add_argument("--strength", type=float, required=True, help="the tilt's strength beta")
    p.add_argument("--out", default="", help="also write the results here (JSON)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the ablation's units: the same figures
    cfg = load_config(args.config, args.set)
    data = prepared_data(default_paths(cfg)[1], cfg.reward.order_items)
    n = int(data["action"].max())
    train, test = split_rows(data["user"], cfg.eval.heldout_user_share)
    rec = fit(click_sasrec(cfg, n, data["state_items"].shape[1]), data, train, cfg.ablation, args.seed,
              cfg.ablation.rec_epochs)
    reward = row_scorer(TILTED_REWARD, cfg, None, None, data, train, n, args.seed, {})
    perm = torch.from_numpy(np.random.default_rng(args.seed).permutation(n))
    rate = like_rate(data, train, n)
    tilts = {"F": reward,
             "F shuffled over items": lambda s, fb, c, idx: reward(s, fb, c, idx)[:, perm],  # item c gets perm[c]'s
             "C leave/return classifier": row_scorer("C", cfg, None, None, data, train, n, args.seed, {}),
             "true item like-rate": lambda s, fb, c, idx: rate[c - 1].unsqueeze(-1)}
    res = {"seed": args.seed, "strength": args.strength}
    for name, by in tilts.items():
        ranks = tilted_ranks(rec, by, data, test, n, [0.0, args.strength])
        res[name] = {f"{b:g}": hr_ndcg_all_and_satisfied(r, data["satisfied"][test]) for b, r in ranks.items()}
        print(name, json.dumps(res[name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
