"""The report writer produces the HTML table, the figures, metrics.json and TensorBoard events; the headline
prints each guided model's offline change beside its online gain."""
import json

import numpy as np
import pytest

from mtrec_dist.evaluation.report import write_report


def _results():
    ci = lambda m: {"mean": m, "lo": m - 0.01, "hi": m + 0.01}  # noqa: E731
    return {
        "title": "test report",
        "data": {"num_items": 10, "rows_in": 100},
        "reward": {
            "curve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
            "validity": {"spearman": 0.4, "auc": 0.7},
            "groups": {"clickbait": {"taus": [0.25, 0.75], "quantiles": [-1.0, 0.0], "n": 3},
                       "normal": {"taus": [0.25, 0.75], "quantiles": [0.5, 1.0], "n": 7}},
            "scatter": {"learned": [0.1, 0.2, 0.3], "truth": [0.0, 0.5, 1.0]},
        },
        "recommenders": [
            {"backbone": "sasrec", "guidance": g, "curve": [{"step": 1, "loss": 3.0}],
             "offline": {"all": {"HR@10": 0.3, "NDCG@10": 0.2}, "satisfied": {"HR@10": 0.25}},
             "online": {"ctr": ci(0.2), "satisfaction": ci(0.5), "watch_time": ci(3.0)}}
            for g in ("none", "reweight")
        ],
    }


def test_report_files_and_table(tmp_path):
    report = write_report(_results(), tmp_path, ks=[10])
    text = report.read_text()
    assert "<table>" in text and "reweight" in text and "0.5000 [0.4900, 0.5100]" in text
    for png in ("reward_fan.png", "reward_vs_truth.png", "training_curves.png", "online.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
        assert png in text
    assert json.loads((tmp_path / "metrics.json").read_text())["reward"]["validity"]["auc"] == 0.7
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_headline_prints_each_guided_models_offline_change_against_its_click_model():
    from mtrec_dist.evaluation.evaluate import headline

    def rec(backbone, guidance, hr, ndcg_sat):
        return {"backbone": backbone, "guidance": guidance,
                "offline": {"all": {"HR@10": hr}, "satisfied": {"HR@10": 0.1, "NDCG@10": ndcg_sat}, "sampled": {}}}

    lines = headline({"recommenders": [rec("sasrec", "none", 0.10, 0.050), rec("sasrec", "reweight", 0.076, 0.053),
                                       rec("gru4rec", "none", 0.0, 0.040), rec("gru4rec", "reweight", 0.02, 0.030),
                                       rec("nextitnet", "reweight", 0.05, 0.05), rec("caser", "none", 0.05, 0.05),
                                       rec("caser", "risk_averse", 0.0498, float("nan"))]})
    # 0.076 / 0.10 - 1 = -24%; 0.053 / 0.050 - 1 = +6%: each against its own backbone's click model
    assert lines[0].startswith("sasrec/none: HR@10 0.1000") and "offline vs" not in lines[0]
    assert lines[1].endswith("; offline vs sasrec/none: HR@10 -24%, NDCG@10 satisfied +6%")
    assert lines[3].endswith("; offline vs gru4rec/none: HR@10 n/a, NDCG@10 satisfied -25%")  # a base of 0
    assert "offline vs" not in lines[4]  # no click-trained nextitnet to compare with
    # a change under 0.5% prints +0%, not -0%; a metric the run lacks reads n/a
    assert lines[6].endswith("; offline vs caser/none: HR@10 +0%, NDCG@10 satisfied n/a")


def test_offline_change_ci_pairs_ranked_rows_and_the_headline_prints_it():
    import pyarrow as pa

    from mtrec_dist.evaluation.evaluate import headline, offline_change_ci

    # 4 held-out rows of 2 users; rows 1 and 3 satisfied (simulator satisfaction above the median)
    eval_table = pa.table({"row_id": [3, 1, 2, 0], "user_idx": [5, 4, 5, 4],
                           "eval_true_satisfaction": [2.0, 3.0, -1.0, -2.0]})
    click = pa.table({"row_id": [0, 1, 2, 3], "rank_full": [0, 1, 20, 3]})
    guided = pa.table({"row_id": [3, 2, 1, 0], "rank_full": [0, 5, 1, 30]})  # another row order: paired by id
    ci = offline_change_ci(guided, click, eval_table)
    # hits at 10: click 3 (rows 0, 1, 3), guided 3 (rows 1, 2, 3): +0%
    assert ci["HR@10"][0] == pytest.approx(0.0)
    # NDCG@10 on satisfied rows 1 and 3: click 1/log2(3) + 1/log2(5), guided 1/log2(3) + 1
    want = (1 / np.log2(3) + 1.0) / (1 / np.log2(3) + 1 / np.log2(5)) - 1
    assert ci["NDCG@10 satisfied"][0] == pytest.approx(want)
    assert ci["NDCG@10 satisfied"][1] <= want <= ci["NDCG@10 satisfied"][2]
    with pytest.raises(ValueError, match="different rows"):  # not the same rows: no pairs to compare
        offline_change_ci(guided.slice(0, 3), click, eval_table)

    def rec(guidance, hr, ndcg_sat, **extra):
        return {"backbone": "sasrec", "guidance": guidance, **extra,
                "offline": {"all": {"HR@10": hr}, "satisfied": {"HR@10": 0.1, "NDCG@10": ndcg_sat}, "sampled": {}}}

    lines = headline({"recommenders": [rec("none", 0.10, 0.050), rec("reweight", 0.09, 0.049, offline_change={
        "HR@10": [-0.1, -0.123, -0.081], "NDCG@10 satisfied": [-0.02, -0.061, 0.024]})]})
    assert lines[1].endswith("; offline vs sasrec/none: HR@10 -10% [-12%, -8%], NDCG@10 satisfied -2% [-6%, +2%]")


def test_evaluate_refuses_models_trained_with_another_held_out_share(tmp_path):
    """A larger share at evaluation than at training would measure on rows the models trained on."""
    from mtrec_dist.config import PipelineConfig
    from mtrec_dist.evaluation.evaluate import check_trained_share
    from mtrec_dist.training.reward import LATEST_POINTER

    cfg = PipelineConfig()
    share = cfg.eval.heldout_user_share
    recs = [{"backbone": "sasrec", "guidance": "none", "heldout_user_share": share}]
    (tmp_path / LATEST_POINTER).write_text(json.dumps({"heldout_user_share": share}))
    check_trained_share(cfg, str(tmp_path), recs)  # the same share everywhere: fine
    with pytest.raises(ValueError, match=r"sasrec/reweight \(0.0\)"):
        check_trained_share(cfg, str(tmp_path), recs + [{"backbone": "sasrec", "guidance": "reweight",
                                                         "heldout_user_share": 0.0}])
    (tmp_path / LATEST_POINTER).write_text(json.dumps({"checkpoint_path": "x"}))  # before the setting existed
    with pytest.raises(ValueError, match="the reward model \\(no share recorded\\)"):
        check_trained_share(cfg, str(tmp_path), recs)
