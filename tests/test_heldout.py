"""The held-out users (mtrec_dist/data/heldout.py): one rule in numpy, pyarrow and Ray Data expressions."""
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from mtrec_dist.data.heldout import (
    heldout_expr, heldout_mask, split_rows, split_validation, training_expr, user_bucket, validation_buckets,
)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.3, 0.55])
def test_the_mask_is_the_ablations_hash_and_the_arrow_filters_agree(share):
    users = np.arange(0, 30_000, dtype=np.int64)
    mask = heldout_mask(users, share)
    # the rule the ablations used before it had a module of its own (their splits must not move)
    np.testing.assert_array_equal(mask, (users * 2654435761 % 1000) < share * 1000)
    assert abs(mask.mean() - share) < 1e-9  # each block of 1,000 consecutive indices holds out exactly the share
    table = pa.table({"user_idx": users, "row": np.arange(users.size)})
    held = pads.dataset(table).to_table(filter=heldout_expr(share)).column("row").to_numpy()
    kept = pads.dataset(table).to_table(filter=training_expr(share)).column("row").to_numpy()
    np.testing.assert_array_equal(held, np.flatnonzero(mask))
    np.testing.assert_array_equal(kept, np.flatnonzero(~mask))


def test_no_overflow_for_large_user_indices():
    users = np.array([3_500_000_000, 2**40 + 7, 2**62], dtype=np.int64)  # u * 2654435761 would overflow int64
    table = pa.table({"user_idx": users})
    want = [(int(u) * 2654435761 % 1000) < 200 for u in users]  # Python ints: exact
    assert heldout_mask(users, 0.2).tolist() == want
    assert pads.dataset(table).count_rows(filter=heldout_expr(0.2)) == sum(want)


def test_split_rows_partitions_the_rows_and_refuses_a_share_of_zero():
    users = np.array([5, 0, 7, 0, 12, 5, 3])
    train, test = split_rows(users, 0.5)
    assert sorted(train.tolist() + test.tolist()) == list(range(users.size))
    assert heldout_mask(users[test], 0.5).all() and not heldout_mask(users[train], 0.5).any()
    assert 1 in test and 3 in test  # user 0 hashes to bucket 0: held out at any share > 0
    with pytest.raises(ValueError, match="eval.heldout_user_share is 0"):
        split_rows(users, 0.0)


@pytest.mark.integration
def test_ray_data_filters_the_same_rows(ray_cluster):
    import ray.data

    users = np.arange(0, 5_000, dtype=np.int64)
    ds = ray.data.from_arrow(pa.table({"user_idx": users}))
    got = sorted(r["user_idx"] for r in ds.filter(expr=heldout_expr(0.2, "ray")).take_all())
    assert got == users[heldout_mask(users, 0.2)].tolist()
    assert ds.filter(expr=training_expr(0.2, "ray")).count() == int((~heldout_mask(users, 0.2)).sum())


def test_the_popularity_sampler_counts_only_the_training_users_rows(tmp_path):
    """action_counts over a prepared dataset: with the training filter, the held-out users' actions are not
    counted; without it every row is; entry 0 (padding) stays 0; an action outside the catalog is refused."""
    import pyarrow.dataset as pads

    from helpers_training import write_prepared
    from mtrec_dist.data.heldout import heldout_mask, training_expr
    from mtrec_dist.data.pipeline import action_counts

    root = write_prepared(tmp_path / "prep", num_items=40, num_users=30, rows=601)
    t = pads.dataset(str(root / "transitions"), format="parquet").to_table(columns=["user_idx", "action"])
    users, actions = t.column("user_idx").to_numpy(), t.column("action").to_numpy()
    held = heldout_mask(users, 0.2)
    assert 0 < held.sum() < len(users)
    every = action_counts([str(root)], 40)
    train = action_counts([str(root)], 40, training_expr(0.2))
    assert every.shape == (41,) and every[0] == 0 and every.sum() == len(actions)
    assert np.array_equal(train, np.bincount(actions[~held], minlength=41))
    assert np.array_equal(action_counts([str(root), str(root)], 40), 2 * every)  # earlier days add up
    top = int(actions.max())
    with pytest.raises(ValueError, match=f"outside 1..{top - 1}"):
        action_counts([str(root)], top - 1)


def test_ranking_loads_the_histories_of_the_held_out_users_only(tmp_path):
    from helpers_training import write_prepared
    from mtrec_dist.data.heldout import heldout_mask
    from mtrec_dist.evaluation.offline import user_histories

    root = write_prepared(tmp_path / "prep", num_items=40, num_users=30, rows=601)
    every = user_histories(str(root))
    held = user_histories(str(root), heldout_expr(0.2))
    users = np.array(sorted(every))
    assert sorted(held) == users[heldout_mask(users, 0.2)].tolist() and 0 < len(held) < len(every)
    assert all(np.array_equal(np.sort(held[u]), np.sort(every[u])) for u in held)


def test_a_ranked_share_holds_out_a_subset_of_the_held_out_users():
    from mtrec_dist.data.heldout import ranked_share

    assert ranked_share(0.2, 1000, 0) == 0.2 and ranked_share(0.2, 1000, 5000) == 0.2  # no cap, or under it
    users = np.arange(100_000)
    held = heldout_mask(users, 0.2)
    sub = ranked_share(0.2, int(held.sum()), int(held.sum()) // 4)
    assert sub == 0.05
    ranked = heldout_mask(users, sub)
    assert not (ranked & ~held).any() and abs(ranked.sum() / held.sum() - 0.25) < 0.02
    assert ranked_share(0.2, 10 ** 9, 1) == 0.001  # at least one bucket of users


def test_validation_users_are_training_users_the_same_at_every_share_split():
    users = np.repeat(np.arange(3000), 2)
    train, held = split_rows(users, 0.2)
    fit, validation = split_validation(users[train], 0.2, 0.15)
    fit, validation = train[fit], train[validation]
    assert sorted(np.concatenate([fit, validation]).tolist()) == sorted(train.tolist())  # a partition of train
    assert not set(users[validation]) & set(users[held]) and not set(users[validation]) & set(users[fit])
    assert abs(len(set(users[validation])) / 3000 - 0.15) < 0.03
    # the same hash: validation users at 0.15 are among those at 0.25 (and never held out at 0.2)
    _, wider = split_validation(users, 0.2, 0.25)
    assert set(users[validation]) <= set(users[wider])
    with pytest.raises(ValueError, match="validation share"):
        split_validation(users, 0.2, 0.8)


@pytest.mark.parametrize("heldout,validation", [(0.2, 0.15), (0.01, 0.05), (0.07, 0.29), (0.3, 0.1), (0.001, 0.001)])
def test_validation_buckets_are_whole_and_follow_the_held_out_ones(heldout, validation):
    users = np.arange(20_000)
    lo, hi = validation_buckets(heldout, validation)
    assert hi - lo == round(validation * 1000)  # float shares (0.01 + 0.05 = 0.060000000000000005) lose no bucket
    held = heldout_mask(users, heldout)
    assert user_bucket(users[held]).max() == lo - 1 and user_bucket(users[~held]).min() == lo
    _, val = split_validation(users, heldout, validation)
    assert sorted(set(user_bucket(users[val]).tolist())) == list(range(lo, hi))


@pytest.mark.parametrize("validation", [0.0004, 0.8])
def test_a_validation_share_without_a_bucket_or_leaving_none_to_fit_is_refused(validation):
    with pytest.raises(ValueError, match="validation share"):
        validation_buckets(0.2, validation)


@pytest.mark.parametrize("overrides, key", [
    (["ablation.tilt_strengths=[0.1]"], "ablation.tilt_strengths"),  # the simulator has no tilt row
    (["source=logs", "ablation.tilt_strengths=[0.1]", "ablation.validation_user_share=0.8"],
     "ablation.validation_user_share"),  # with 20% held out, no user would be left to fit on
    (["source=logs", "ablation.tilt_strengths=[0]"], "ablation.tilt_strengths"),  # 0 is always a candidate
])
def test_the_tilt_rows_settings_are_checked_when_loaded(overrides, key):
    from mtrec_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)
