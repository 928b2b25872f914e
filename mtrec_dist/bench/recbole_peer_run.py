"""RecBole's side of `mtrec bench --peer recbole`, run BY THE PEER ENVIRONMENT's python (scripts/peer_recbole_env.sh).

It imports only RecBole, torch, numpy and the standard library (never ``mtrec_dist``: the two environments pin
different numpy / pandas).  It uses RecBole's low-level API, not ``quick_start``, which imports ray.tune.

    python recbole_peer_run.py PARAMS.json OUT.json

PARAMS (written by ``mtrec_dist.bench.peer.recbole_params``): model (RecBole name), dataset, data_path, epochs,
batch_size, state_len, dim, layers, heads, dropout, lr, threads, caser_h_filters, caser_v_filters,
nextitnet_dilations, nextitnet_kernel, seed.  OUT: samples/s (training sequences processed / seconds inside
the training epochs, evaluation excluded), full-ranking NDCG@10 and HR@10 on the test split, the settings.
"""
from __future__ import annotations

import json
import os
import sys
import time


def model_params(p: dict) -> dict:
    """RecBole's hyper-parameter names for the shared architecture (see the report for what cannot match)."""
    if p["model"] == "SASRec":
        # inner_size = hidden_size and relu: our feed-forward is d -> d -> d with ReLU
        return {"n_layers": p["layers"], "n_heads": p["heads"], "hidden_size": p["dim"], "inner_size": p["dim"],
                "hidden_dropout_prob": p["dropout"], "attn_dropout_prob": p["dropout"], "hidden_act": "relu",
                "layer_norm_eps": 1e-5}
    if p["model"] == "GRU4Rec":
        return {"embedding_size": p["dim"], "hidden_size": p["dim"], "num_layers": p["layers"],
                "dropout_prob": p["dropout"]}
    if p["model"] == "Caser":
        return {"embedding_size": p["dim"], "nh": p["caser_h_filters"], "nv": p["caser_v_filters"],
                "dropout_prob": p["dropout"], "reg_weight": 0.0}
    if p["model"] == "NextItNet":
        return {"embedding_size": p["dim"], "kernel_size": p["nextitnet_kernel"], "block_num": p["layers"],
                "dilations": list(p["nextitnet_dilations"]), "reg_weight": 0.0}
    raise ValueError(f"unknown model {p['model']!r}")


def config_dict(p: dict, out_dir: str) -> dict:
    """Leave-one-out by time (last = test, the one before = validation), full softmax, full-ranking
    evaluation, no early stopping and no validation during training (eval_step 0), CPU, no loader workers."""
    return {
        "data_path": p["data_path"], "checkpoint_dir": out_dir, "seed": p["seed"], "reproducibility": True,
        "use_gpu": False, "gpu_id": "", "worker": 0, "show_progress": False, "log_wandb": False,
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": p["state_len"], "loss_type": "CE", "train_neg_sample_args": None,
        "epochs": p["epochs"], "train_batch_size": p["batch_size"], "eval_batch_size": 1024,
        "learning_rate": p["lr"], "weight_decay": 0.0, "stopping_step": 10 ** 9, "eval_step": 0,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10",
        **model_params(p),
    }


def timed_epochs(trainer, seconds: list) -> None:
    """Wrap the trainer's epoch so that only training time is counted (fit also saves checkpoints)."""
    inner = trainer._train_epoch

    def epoch(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        seconds.append(time.perf_counter() - t)
        return out

    trainer._train_epoch = epoch


def run(p: dict, out_dir: str) -> dict:
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    t_all = time.time()
    config = Config(model=p["model"], dataset=p["dataset"], config_dict=config_dict(p, out_dir))
    init_seed(config["seed"], config["reproducibility"])
    torch.set_num_threads(p["threads"])  # after Config/init_seed, which may touch torch's settings
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    seconds: list = []
    timed_epochs(trainer, seconds)
    trainer.fit(train_data, valid_data=None, saved=False, show_progress=False)
    t = time.time()
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    per_epoch = len(train_data._dataset)
    return {"model": p["model"], "samples_per_s": per_epoch * len(seconds) / sum(seconds), "train_s": sum(seconds),
            "epoch_s": seconds, "train_samples": per_epoch * len(seconds), "train_samples_per_epoch": per_epoch,
            "ndcg10": float(test["ndcg@10"]), "hr10": float(test["hit@10"]), "eval_s": time.time() - t,
            "wall_s": time.time() - t_all, "params": sum(x.numel() for x in model.parameters()),
            "users": dataset.user_num - 1, "items": dataset.item_num - 1, "threads": torch.get_num_threads(),
            "eval_args": config["eval_args"],
            "settings": p}


def main(argv: list) -> int:
    params_path, out_path = argv[1], argv[2]
    with open(params_path) as f:
        p = json.load(f)
    result = run(p, os.path.dirname(os.path.abspath(out_path)))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
