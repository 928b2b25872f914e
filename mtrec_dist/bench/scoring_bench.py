"""Scoring: ``score-rewards`` (as ``train.score_runner: auto`` runs it: in the driver for a small set, else Ray
Data with one scoring actor per ``train.score_concurrency``) vs the plain loop
a user would write (load the model, score the transitions batch by batch in one process, write the scores;
before session 20 it wrote nothing), with the same
scores required, and vs the training throughput of the same model.

Both score every transition of the prepared dataset with the checkpoint the 1-worker QR-IQL run wrote:
the reward quantiles of the logged action, their mean and lower-tail CVaR, and the soft-policy baseline
over the catalog (exact when the catalog has at most ``train.score_full_catalog_max`` items; above that
the library samples candidates and only the mean and CVaR are compared).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from mtrec_dist.config import PipelineConfig

from .prepare_bench import OutputMismatch

SCORE_TOLERANCE = 1e-4  # |library - plain| per score (the same model, batches cut differently)
COMPARED = ("reward_mean", "reward_cvar", "reward_baseline", "reward_cvar_baseline")


def _states(table: pa.Table, name: str, state_len: int, dtype) -> torch.Tensor:
    flat = pc.list_flatten(table.column(name).combine_chunks()).to_numpy(zero_copy_only=False)
    return torch.from_numpy(np.array(flat, dtype=dtype).reshape(table.num_rows, state_len))


@torch.no_grad()
def plain_score(checkpoint: str, prepared: Path, batch_size: int, full_catalog_max: int, cvar_draws: int,
                threads: int = 1, out_file: Optional[Path] = None) -> Dict[str, Any]:
    """Score every transition in this process and write the scores (``row_id``, the compared scores and the
    quantiles) to ``out_file`` as Parquet, as a script whose scores are used must; the scores by ``row_id``
    and the seconds it took (model load, read and write included, as ``score-rewards`` includes them)."""
    from mtrec_dist.data.dataset import TRANSITIONS_DIR
    from mtrec_dist.objectives.qr_iql import cvar
    from mtrec_dist.training.checkpoint import load_unsharded_model, read_checkpoint_meta
    from mtrec_dist.training.reward import reward_model_factory

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        spec = read_checkpoint_meta(checkpoint)["model_spec"]
        model = load_unsharded_model(reward_model_factory(spec, for_inference=True), checkpoint)
        level, L = float(spec["reward"]["cvar_alpha"]), int(spec["state_len"])
        exact = int(spec["num_items"]) <= full_catalog_max
        table = pads.dataset(str(prepared / TRANSITIONS_DIR), format="parquet", ignore_prefixes=["_", "."]).to_table(
            columns=["row_id", "state_items", "state_feedback", "action"])
        out: Dict[str, list] = {k: [] for k in ("row_id",) + COMPARED + ("reward_q",)}
        for start in range(0, table.num_rows, batch_size):
            part = table.slice(start, batch_size)
            s, fb = _states(part, "state_items", L, np.int64), _states(part, "state_feedback", L, np.float32)
            action = torch.from_numpy(np.array(part.column("action").to_numpy(), dtype=np.int64))
            if exact:  # the logged action's quantiles from the same state encoding as the baseline
                base = model.catalog_reward_baseline(s, fb, candidate_items=action.view(-1, 1), cvar_draws=cvar_draws)
                rq = base["reward_q"][:, 0]
            else:
                rq = model.reward_quantiles(s, fb, action.view(-1, 1))[:, 0]
            rq = torch.sort(rq, dim=-1).values
            out["row_id"].append(part.column("row_id").to_numpy())
            out["reward_mean"].append(rq.mean(-1).numpy())
            out["reward_cvar"].append(cvar(rq, level).numpy())
            out["reward_q"].append(rq.numpy())
            if exact:
                out["reward_baseline"].append(base["reward_baseline"].numpy())
                out["reward_cvar_baseline"].append(base["reward_cvar_baseline"].numpy())
        scores = {k: np.concatenate(v) for k, v in out.items() if v}
        if out_file is not None and "reward_q" in scores:
            quantiles = scores.pop("reward_q")
            columns = {**scores, "reward_q": pa.FixedSizeListArray.from_arrays(quantiles.reshape(-1),
                                                                                quantiles.shape[1])}
            pq.write_table(pa.table(columns), str(out_file))
            scores["reward_q"] = quantiles
    finally:
        torch.set_num_threads(previous)
    seconds = time.perf_counter() - t0
    return {"scores": scores, "rows": table.num_rows, "seconds": seconds, "rows_per_s": table.num_rows / seconds}


def same_scores(library_dir: Path, plain: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Largest |library - plain| of each compared score, matched by ``row_id``; raises
    :class:`OutputMismatch` when rows differ or a score differs by more than :data:`SCORE_TOLERANCE`."""
    from mtrec_dist.training.scoring import read_scores

    lib = read_scores(str(library_dir))
    lib_ids = lib.column("row_id").to_numpy()
    order_lib, order_plain = np.argsort(lib_ids), np.argsort(plain["row_id"])
    if not np.array_equal(lib_ids[order_lib], plain["row_id"][order_plain]):
        raise OutputMismatch(f"score-rewards scored {lib_ids.size:,} rows, the plain loop {plain['row_id'].size:,}: "
                             "not the same rows")
    gaps = {}
    for name in COMPARED:
        if name in plain:
            lib_values = lib.column(name).to_numpy()[order_lib].astype(np.float64)
            gaps[name] = float(np.max(np.abs(lib_values - plain[name][order_plain]))) if lib_values.size else 0.0
    worst = max(gaps, key=gaps.get)
    if not gaps[worst] <= SCORE_TOLERANCE:
        raise OutputMismatch(f"{worst}: score-rewards and the plain loop differ by up to {gaps[worst]:.3g}")
    return gaps


SCORING_ROUNDS = 2  # library, plain, library, plain: neither side always runs in the colder process


def bench_scoring(base: PipelineConfig, checkpoint: str, prepared: Path, work: Path, threads: int = 1,
                  rounds: int = SCORING_ROUNDS, say=print) -> Dict[str, Any]:
    """Time ``score-rewards`` and the plain loop on every transition, alternating for ``rounds`` rounds, and
    keep each side's fastest round (``timeit``'s rule: the slower rounds measure the machine, not the code;
    the first call in a process pays imports and first-touch memory, and it would always be the library's);
    every round's times are kept too.  The scores are compared."""
    from mtrec_dist.training.scoring import score_rewards

    out = work / "scores"
    library, plain, gaps = None, None, {}
    library_rounds, plain_rounds = [], []
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        summary = score_rewards(base, checkpoint, str(prepared), str(out), overwrite=True)
        library_s = time.perf_counter() - t0
        library_rounds.append(round(library_s, 3))
        if library is None or library_s < library["wall_s"]:
            library = {"rows": summary["rows"], "wall_s": library_s, "rows_per_s": summary["rows"] / library_s,
                       "scoring_actor_s": summary.get("scoring_actor_s"),
                       "rows_per_actor_s": summary.get("rows_per_actor_s"), "baseline": summary["baseline"],
                       "cvar_baseline": summary["cvar_baseline"], "runner": summary["runner"],
                       "actors": base.train.score_concurrency, "cpus_per_actor": base.train.score_cpus}
        this = plain_score(checkpoint, prepared, base.train.score_batch_size, base.train.score_full_catalog_max,
                           base.train.score_cvar_draws, threads, out_file=work / "plain_scores.parquet")
        gaps = same_scores(out, this.pop("scores"))
        plain_rounds.append(round(this["seconds"], 3))
        if plain is None or this["seconds"] < plain["seconds"]:
            plain = this
    library["round_wall_s"], plain["round_seconds"] = library_rounds, plain_rounds
    say(f"[bench] scoring: score-rewards {library['rows_per_s']:,.0f} rows/s, plain loop "
        f"{plain['rows_per_s']:,.0f} rows/s (fastest of {len(library_rounds)} alternating rounds: "
        f"{', '.join(f'{t:.1f}' for t in library_rounds)} s vs {', '.join(f'{t:.1f}' for t in plain_rounds)} s), "
        f"same scores (max |diff| {max(gaps.values()):.2g})")
    return {"library": library, "plain": plain, "check": {"max_abs_diff": gaps}}
