"""`mtrec bench --peer recbole`: our four sequence recommenders against RecBole 1.2.1's on the same MovieLens-1M
subset, the same split, architecture and budget; training samples/s and full-ranking NDCG@10 side by side.

RecBole runs in its own virtual environment (``scripts/peer_recbole_env.sh``; it pins old numpy / pandas / scipy
and is never part of our install), through :mod:`.recbole_peer_run` in a subprocess of that environment's python.

Protocol, both sides: each user's ratings ordered by time (ties in file order); the last is the test case, the
one before it is validation (unused), the rest are training targets, each predicted from the up to
``state_len`` items before it (a user's first item is never a target: it has no history).  Full softmax
(cross-entropy over the whole catalog).  NDCG@10 over the whole catalog with the user's other items masked,
as RecBole's full-sort evaluation does.  Samples/s = training targets processed / training seconds
(start-up and evaluation excluded).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.layout import RunLayout

ROOT = Path(__file__).resolve().parents[2]
PEER_MODELS = ("sasrec", "gru4rec", "caser", "nextitnet")
RECBOLE_NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser", "nextitnet": "NextItNet"}
DEFAULT_RATINGS = "/work/shared/data/ml-1m/ratings_users0001-2999.dat"
ENV_COMMAND = "bash scripts/peer_recbole_env.sh"
DATASET = "ml1m_peer"  # RecBole dataset name: <work>/recbole/ml1m_peer/ml1m_peer.inter


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (environment not built, data absent); the message says what to do."""


@dataclasses.dataclass
class PeerSettings:
    """What both sides share: data, architecture and budget.  ``batch_size`` is global (ours splits it over
    ``workers``); ``threads`` is torch threads per Ray worker, RecBole gets ``workers * threads``."""

    models: Sequence[str] = PEER_MODELS
    epochs: int = 1
    batch_size: int = 256
    state_len: int = 50
    dim: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    lr: float = 1e-3
    sparse_lr: float = 0.05
    workers: int = 2
    threads: int = 1
    recbole_threads: int = 0  # 0 = workers * threads (the cores ours uses); on a loaded machine 1 can be faster
    max_users: int = 0  # 0 = every user in the file; N = the N smallest user ids (a smaller, same subset)
    caser_h_filters: int = 16
    caser_v_filters: int = 4
    nextitnet_dilations: Sequence[int] = (1, 2, 4)
    nextitnet_kernel: int = 3
    seed: int = 0
    ratings: str = dataclasses.field(default_factory=lambda: os.environ.get("MTREC_ML1M_RATINGS", DEFAULT_RATINGS))
    venv: str = dataclasses.field(default_factory=lambda: os.environ.get("MTREC_PEER_VENV",
                                                                        str(ROOT / ".venv-peer-recbole")))


def peer_python(venv: str) -> Path:
    """The peer environment's python, or :class:`PeerUnavailable` naming the one command that builds it."""
    python = Path(venv) / "bin" / "python"
    if not python.exists() or not (Path(venv) / ".peer-stamp").exists():
        raise PeerUnavailable(f"the RecBole peer environment is not built ({venv}); build it once with "
                              f"`{ENV_COMMAND}` (a separate venv, never part of mtrec's install), then rerun")
    return python


def check_ratings(path: str) -> None:
    if not os.path.exists(path):
        raise PeerUnavailable(f"{path} not found; MovieLens-1M is not redistributed with the project "
                              "(GroupLens licence). Pass --peer-ratings PATH or set MTREC_ML1M_RATINGS")


def read_ratings(path: str, max_users: int = 0) -> List[tuple]:
    """``(user, item, rating, ts)`` of a MovieLens ``ratings.dat`` in file order (the N smallest user ids only,
    where ``max_users`` > 0)."""
    rows = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            parts = line.strip().split("::")
            if len(parts) == 4:
                rows.append((int(parts[0]), int(parts[1]), float(parts[2]), int(parts[3])))
    if max_users > 0:
        keep = set(sorted({r[0] for r in rows})[:max_users])
        rows = [r for r in rows if r[0] in keep]
    return rows


def write_ratings(rows: Sequence[tuple], path: Path) -> Path:
    """The subset in MovieLens format, for our ``prepare`` (both sides then read exactly the same events)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u}::{i}::{r:g}::{t}\n" for u, i, r, t in rows))
    return path


def write_inter(rows: Sequence[tuple], recbole_dir: Path, name: str = DATASET) -> Path:
    """RecBole atomic ``<recbole_dir>/<name>/<name>.inter``, sorted by user, time and file order: RecBole's
    stable sort by (user, time) then keeps our tie order, so both sides see the same sequences."""
    order = sorted(range(len(rows)), key=lambda k: (rows[k][0], rows[k][3], k))
    out = recbole_dir / name / f"{name}.inter"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float\n"]
    lines += [f"{rows[k][0]}\t{rows[k][1]}\t{rows[k][2]:g}\t{rows[k][3]}\n" for k in order]
    out.write_text("".join(lines))
    return out


# ---- our side -----------------------------------------------------------------------------------


def prepare_ours(ratings: Path, work: Path, state_len: int) -> Dict[str, Any]:
    """``mtrec prepare`` (format movielens) of the subset: temporal leave-last-out, states of ``state_len``."""
    from mtrec_dist.config import PrepareConfig
    from mtrec_dist.data.prepare import prepare_dataset

    return prepare_dataset(PrepareConfig(format="movielens", state_len=state_len, overwrite=True, progress=False),
                           str(ratings), RunLayout(str(work)).prepared, progress=lambda msg: None)


def training_input(prepared: Path, out: Path) -> Path:
    """A copy of the prepared transitions that ``train_recommender`` reads as its (unscored) input, with the
    validation rows and the empty-state rows (a user's first item) marked ``pos_from_end = 0`` so that training
    (``train_recommender(..., skip_last=True)``) skips them like test rows: RecBole trains on neither, so both
    sides train on the same targets.  The row count stays that of the prepared data (train_recommender checks
    it); ranking reads the untouched copy."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from mtrec_dist.data.pipeline import collate_transitions

    table = pads.dataset(str(prepared / "transitions"), format="parquet", ignore_prefixes=["_", "."]).to_table()
    state = collate_transitions(table.select(["state_items"]))["state_items"]
    empty = pa.array((state == 0).all(1).numpy())
    skip = pc.or_(pc.equal(table["pos_from_end"], 1), empty)
    pos = pc.if_else(skip, pa.scalar(0, pa.int32()), table["pos_from_end"])
    table = table.set_column(table.schema.get_field_index("pos_from_end"), "pos_from_end", pos)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(out / "part-0.parquet"))
    return out


def our_config(s: PeerSettings, backbone: str, run_dir: Path):
    """Our pipeline config with the shared architecture and budget (global batch = RecBole's)."""
    from mtrec_dist.config import PipelineConfig

    cfg = PipelineConfig(run_dir=str(run_dir))
    # RecBole's protocol: every user trains, each user's last transition is the test row (train_ours: skip_last)
    cfg.eval = dataclasses.replace(cfg.eval, heldout_user_share=0.0)
    cfg.model = dataclasses.replace(
        cfg.model, embedding_dim=s.dim, num_layers=s.layers, num_heads=s.heads, dropout=s.dropout, encoder=backbone,
        feedback_features=False,  # RecBole's models read item ids only
        caser_h_filters=s.caser_h_filters, caser_v_filters=s.caser_v_filters,
        nextitnet_dilations=list(s.nextitnet_dilations), nextitnet_kernel=s.nextitnet_kernel)
    cfg.rec = dataclasses.replace(cfg.rec, backbone=backbone, guidance=CLICK_TRAINED, num_negatives=0)
    cfg.train = dataclasses.replace(
        cfg.train, num_workers=s.workers, cpus_per_worker=0.5, use_gpu="false", batch_size=s.batch_size // s.workers,
        epochs=s.epochs, max_steps=0, lr=s.lr, sparse_lr=s.sparse_lr, report_every=50, checkpoint_every=10 ** 9,
        shuffle_buffer_rows=50_000, seed=s.seed)  # rows are user-ordered; RecBole shuffles every epoch
    cfg.validate()
    return cfg


def train_ours(cfg, prepared: Path, train_dir: Path, out: Path, backbone: str) -> Dict[str, Any]:
    """``train_recommender`` on Ray Train; training rows / training seconds (worker start -> last step)."""
    import shutil

    from mtrec_dist.training.loop import read_history
    from mtrec_dist.training.recommender import train_recommender

    from .steady import steady_state, time_breakdown

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    summary = train_recommender(cfg, str(train_dir), str(prepared), str(out), backbone=backbone, guidance=CLICK_TRAINED,
                                progress=False, skip_last=True)
    t1 = time.time()
    history = read_history(str(out), summary["run_name"])
    end = next(e for e in history if e.get("event") == "end")
    b = time_breakdown(history, t0, t1)
    # steady: without the first report interval (Ray Data filling its pipeline), for context only
    return {"samples_per_s": end["rows_seen"] / b["train_s"], "train_s": b["train_s"], "rows": end["rows_seen"],
            "steady_samples_per_s": steady_state(history, 1)["samples_per_s"],
            "train_rows": summary["train_rows"], "wall_s": b["wall_s"], "summary": summary}


def rank_ours(summary: Dict[str, Any], prepared: Path, num_items: int) -> Dict[str, float]:
    """Full-catalog NDCG@10 / HR@10 of the test rows, with the user's other items masked (RecBole's protocol)
    and unmasked (our ``mtrec evaluate``'s).  In-process: 3k rows x 4k items is small."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import torch

    from mtrec_dist.data.pipeline import collate_transitions
    from mtrec_dist.evaluation.evaluate import _recommender_factory
    from mtrec_dist.evaluation.metrics import ranking_report
    from mtrec_dist.evaluation.offline import user_histories
    from mtrec_dist.training.checkpoint import load_unsharded_model

    factory, _ = _recommender_factory(summary)
    model = load_unsharded_model(factory, summary["checkpoint_path"]).eval()
    t = pads.dataset(str(prepared / "transitions"), format="parquet", ignore_prefixes=["_", "."]).to_table(
        columns=["user_idx", "state_items", "state_feedback", "action"], filter=pc.field("pos_from_end") == 0)
    histories = user_histories(str(prepared))
    batch = collate_transitions(t)
    items, feedback, action = batch["state_items"], batch["state_feedback"], batch["action"]
    users = batch["user_idx"].numpy()
    masked, plain = [], []
    with torch.no_grad():
        for lo in range(0, len(action), 512):
            sl = slice(lo, lo + 512)
            scores = model.score_catalog(items[sl], feedback[sl], torch.arange(1, num_items + 1))
            target = scores.gather(1, (action[sl] - 1).unsqueeze(1))
            plain.append(((scores >= target).sum(1) - 1).numpy())  # pessimistic on ties, as rank_test_rows
            for row, u in enumerate(users[sl]):
                other = histories[int(u)]
                other = other[other != int(action[sl][row])]
                scores[row, torch.as_tensor(other - 1)] = float("-inf")
            masked.append(((scores >= target).sum(1) - 1).numpy())
    m, p = ranking_report(np.concatenate(masked), [10]), ranking_report(np.concatenate(plain), [10])
    return {"ndcg10": m["ndcg@10"], "hr10": m["hr@10"], "ndcg10_unmasked": p["ndcg@10"],
            "hr10_unmasked": p["hr@10"], "n_test": m["n"]}


# ---- RecBole's side -----------------------------------------------------------------------------


def recbole_params(s: PeerSettings, model: str, recbole_dir: Path) -> Dict[str, Any]:
    """What :mod:`.recbole_peer_run` reads: RecBole's names for our shared settings."""
    return {"model": RECBOLE_NAMES[model], "dataset": DATASET, "data_path": str(recbole_dir),
            "epochs": s.epochs, "batch_size": s.batch_size, "state_len": s.state_len, "dim": s.dim,
            "layers": s.layers, "heads": s.heads, "dropout": s.dropout, "lr": s.lr,
            "threads": s.recbole_threads or s.workers * s.threads,
            "caser_h_filters": s.caser_h_filters, "caser_v_filters": s.caser_v_filters,
            "nextitnet_dilations": list(s.nextitnet_dilations), "nextitnet_kernel": s.nextitnet_kernel,
            "seed": s.seed}


def run_recbole(python: Path, params: Dict[str, Any], out: Path, say) -> Dict[str, Any]:
    """Run the peer script in the peer environment; its JSON result (its log goes to ``out``.log)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.with_suffix(".params.json")
    spec.write_text(json.dumps(params))
    script = Path(__file__).with_name("recbole_peer_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": str(params["threads"]), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # the peer python must never import our package or our venv's packages
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.run([str(python), str(script), str(spec), str(out)], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=str(out.parent))
    if proc.returncode != 0:
        tail = out.with_suffix(".log").read_text()[-1500:]
        raise RuntimeError(f"RecBole {params['model']} exited {proc.returncode}; log tail:\n{tail}")
    return json.loads(out.read_text())


# ---- both ---------------------------------------------------------------------------------------


def peer_row(model: str, ours: Dict[str, Any], ranked: Dict[str, float], peer: Dict[str, Any],
             epochs: int) -> Dict[str, Any]:
    return {"model": model, "epochs": epochs,
            "ours_samples_per_s": ours["samples_per_s"], "recbole_samples_per_s": peer["samples_per_s"],
            "speed_ratio": ours["samples_per_s"] / peer["samples_per_s"],
            "ours_ndcg10": ranked["ndcg10"], "recbole_ndcg10": peer["ndcg10"],
            "ours_hr10": ranked["hr10"], "recbole_hr10": peer.get("hr10"),
            "ours_ndcg10_unmasked": ranked["ndcg10_unmasked"], "ours_steady_samples_per_s": ours["steady_samples_per_s"],
            "ours_train_s": ours["train_s"], "recbole_train_s": peer["train_s"],
            "ours_rows": ours["rows"], "recbole_rows": peer["train_samples"],
            "recbole_params": peer.get("params"),
            "ours_wall_s": ours["wall_s"], "recbole_wall_s": peer.get("wall_s")}


def bench_peer(s: PeerSettings, work: Path, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Both sides for every model in ``s.models``; ``{"settings", "data", "rows", "errors"}``."""
    from .machine import load_average

    check_ratings(s.ratings)
    python = peer_python(s.venv)
    unknown = sorted(set(s.models) - set(PEER_MODELS))
    if unknown:
        raise ValueError(f"unknown peer model(s) {unknown}; choose from {list(PEER_MODELS)}")
    work = work / "peer"
    rows = read_ratings(s.ratings, s.max_users)
    subset = write_ratings(rows, work / "ratings.dat")
    write_inter(rows, work / "recbole")
    manifest = prepare_ours(subset, work, s.state_len)
    prepared = Path(RunLayout(str(work)).prepared)
    train_dir = training_input(prepared, work / "train_input")
    result: Dict[str, Any] = {"settings": {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in dataclasses.asdict(s).items()},
                              "data": {"ratings": s.ratings, "events": len(rows), "users": manifest["num_users"],
                                       "items": manifest["num_items"]},
                              "rows": [], "errors": {}, "load": []}
    say(f"[peer] {len(rows):,} ratings, {manifest['num_users']:,} users, {manifest['num_items']:,} items")
    for model in s.models:
        try:
            result["rows"].append(_one_model(s, model, python, work, prepared, train_dir, manifest, say))
        except Exception as e:  # noqa: BLE001 - one model's failure must not hide the others' figures
            say(f"[peer] {model} FAILED: {type(e).__name__}: {e}")
            result["errors"][model] = f"{type(e).__name__}: {e}"
        result["load"].append({"model": model, **load_average()})
    return result


def _one_model(s: PeerSettings, model: str, python: Path, work: Path, prepared: Path, train_dir: Path,
               manifest: Dict[str, Any], say) -> Dict[str, Any]:
    say(f"[peer] {model}: ours, {s.epochs} epoch(s) on {s.workers} Ray Train workers")
    cfg = our_config(s, model, work / "run")
    ours = train_ours(cfg, prepared, train_dir, work / f"ours_{model}", model)
    ranked = rank_ours(ours.pop("summary"), prepared, manifest["num_items"])
    say(f"[peer] {model}: ours {ours['samples_per_s']:,.0f} samples/s, NDCG@10 {ranked['ndcg10']:.4f}; RecBole")
    peer = run_recbole(python, recbole_params(s, model, work / "recbole"), work / f"recbole_{model}.json", say)
    say(f"[peer] {model}: RecBole {peer['samples_per_s']:,.0f} samples/s, NDCG@10 {peer['ndcg10']:.4f}")
    return peer_row(model, ours, ranked, peer, s.epochs)


def parse_models(text: str) -> List[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = sorted(set(models) - set(PEER_MODELS))
    if unknown:
        raise ValueError(f"--peer-models: unknown {unknown}; choose from {list(PEER_MODELS)}")
    return models or list(PEER_MODELS)
