"""Every ratio of a benchmark run side by side: the rows (value, goal, what was measured), the Markdown
section printed to the console and appended to ``bench/RESULTS.md`` on request, and the JSON file.

A ratio above 1 means the library is faster.  Goals are issue 9's "done means" (speed goals live here,
never in tests); a ratio without a goal is context (for example end-to-end figures that include start-up).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from .rounds import median_round
from .steady import fed_runs, same_feed_one_worker

MODEL_NAMES = {"qriql": "QR-IQL", "sasrec": "SASRec"}
GOALS = {  # key -> (goal, what the goal says)
    "prepare_library_vs_plain": (1.0, ">= 1.0 at 10^7 events"),
    "one_worker_vs_plain": (1.0, ">= 1.0"),
    "two_workers_vs_one": (1.3, ">= 1.3"),
    "streaming_vs_memory": (0.95, ">= 0.95"),
    "scoring_vs_training": (2.0, ">= 2.0"),
    "scoring_vs_plain": (1.0, ">= 1.0"),
    "catalog_sampled_speed": (1 / 1.3, ">= 0.77 (step time at 10^7 items <= 1.3x at 10^4)"),
    "peer_speed": (2.0, ">= 2.0 at equal or better NDCG@10"),
}
PEER_NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser", "nextitnet": "NextItNet"}


def _row(key: str, label: str, value: Optional[float], detail: str, goal_key: Optional[str] = None) -> Dict[str, Any]:
    goal, goal_text = GOALS.get(goal_key or key, (None, ""))
    return {"key": key, "label": label, "value": value, "goal": goal, "goal_text": goal_text,
            "met": None if goal is None or value is None else value >= goal, "detail": detail}


def _failed(key: str, label: str, stage: Dict[str, Any]) -> Dict[str, Any]:
    return _row(key, label, None, f"not measured: {stage['error']}")


def prepare_rows(p: Dict[str, Any]) -> List[Dict[str, Any]]:
    """library / plain pandas (events/s)."""
    label = "prepare: library / plain pandas+pyarrow"
    if "error" in p:
        return [_failed("prepare_library_vs_plain", label, p)]
    c, r = p["check"]["library"], p["ratios"]
    return [_row("prepare_library_vs_plain", label, r["library_vs_plain"],
                 f"{p['library']['wall_s']:.2f} s vs {r['plain_s']:.2f} s on {p['events']:,} events; "
                 f"same {c['transitions']:,} transitions (checksum {c['checksum']})"),
            _row("prepare_read_validate_vs_plain", "prepare, read + validate only: library / plain",
                 r["read_validate_vs_plain"], f"{p['library']['stages_s']['read_validate']:.2f} s vs "
                 f"{r['plain_read_validate_s']:.2f} s")]


def _feeds(*runs: Dict[str, Any]) -> str:
    """`` (train.feed a / b)`` when the runs recorded the feed they resolved to (runs before session 15 did not)."""
    feeds = [r.get("feed") for r in runs]
    return f" (train.feed {' / '.join(feeds)})" if all(feeds) else ""


def training_rows(model: str, t: Dict[str, Any]) -> List[Dict[str, Any]]:
    """1 worker / plain and 2 workers / 1 worker, steady state; 1 worker / plain end to end.  With several rounds
    (``--rounds``) each row is its median round's, with every round's value in front of its figures."""
    if len(t.get("rounds") or ()) < 2:
        return _round_rows(model, t)
    per_round = [{r["key"]: r for r in _round_rows(model, {**t, **one})} for one in t["rounds"]]
    rows = []
    for key in per_round[0]:  # every round measures the same ratios (the same runs)
        values = [rows_of[key]["value"] for rows_of in per_round]
        median = per_round[median_round(values)][key]
        listed = ", ".join(f"{v:.2f}" for v in values)
        which = "median" if len(values) % 2 else "lower middle"
        rows.append(dict(median, detail=f"{which} of {len(values)} rounds ({listed}); its round: {median['detail']}"))
    return rows


def _round_rows(model: str, t: Dict[str, Any]) -> List[Dict[str, Any]]:
    """:func:`training_rows` of one round's runs and ratios."""
    name = MODEL_NAMES[model]
    if "error" in t:
        return [_failed(f"{model}_one_worker_vs_plain", f"{name}: 1 Ray Train worker / plain PyTorch", t)]
    r, runs, c = t["ratios"], t["runs"], t["check"]
    rows = []
    if "ray_1" in runs:
        rows.append(_row(f"{model}_one_worker_vs_plain", f"{name}: 1 Ray Train worker / plain PyTorch",
                         r["one_worker_vs_plain"],
                         f"{runs['ray_1']['samples_per_s']:,.0f} vs {r['plain_samples_per_s']:,.0f} samples/s steady"
                         f"{_feeds(runs['ray_1'])}; "
                         f"same loss on a batch ({c['plain_loss']:.5g}, max |diff| {c['max_abs_diff']:.2g})",
                         "one_worker_vs_plain"))
    if "ray_2" in runs and "ray_1" in runs:
        one = same_feed_one_worker(runs)
        rows.append(_row(f"{model}_two_workers_vs_one", f"{name}: 2 workers / 1 worker", r["two_workers_vs_one"],
                         f"{runs['ray_2']['samples_per_s']:,.0f} vs {one['samples_per_s']:,.0f} samples/s steady"
                         + _feeds(runs["ray_2"], one), "two_workers_vs_one"))
    if "streaming_vs_memory" in r:
        streamed, memory = fed_runs(runs)
        rows.append(_row(f"{model}_streaming_vs_memory", f"{name}: 1 worker fed by Ray Data streaming / from memory",
                         r["streaming_vs_memory"],
                         f"{streamed['samples_per_s']:,.0f} vs {memory['samples_per_s']:,.0f} "
                         "samples/s steady (train.feed stream / memory)", "streaming_vs_memory"))
    if "ray_1" in runs:
        plain_wall = (runs["plain_before"]["wall_s"] + runs["plain_after"]["wall_s"]) / 2
        rows.append(_row(f"{model}_one_worker_vs_plain_end_to_end", f"{name}: 1 worker / plain, end to end",
                         r["one_worker_vs_plain_end_to_end"],
                         f"{runs['ray_1']['breakdown']['wall_s']:.1f} s vs {plain_wall:.1f} s wall for "
                         f"{runs['ray_1']['rows']:,} rows (start-up included)"))
    return rows


def scoring_rows(s: Dict[str, Any], qriql: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """score-rewards / QR-IQL training (1 worker), steady state and end to end, and score-rewards / the plain
    scoring loop.  Steady compares like with like: the scoring process's rows per second of scoring batches
    (the driver's own timing, or one actor's from Ray Data's stats; start-up, model load, read and write left
    out) against one worker's steady samples/s.  Both score-rewards figures are from its fastest round
    (:func:`~mtrec_dist.bench.scoring_bench.bench_scoring`).  Until session 14 this key divided score-rewards'
    wall-clock rate by training's steady rate."""
    if "error" in s:
        return [_failed("scoring_vs_training", "score-rewards / QR-IQL training (1 worker), steady", s)]
    lib, plain = s["library"], s["plain"]
    rows = []
    train = one_worker_run(qriql)
    where = "in the driver" if lib.get("runner") == "local" else f"{lib['actors']} actor"
    how = f"{where}, {lib['rows']:,} rows, baseline {lib['baseline']}, CVaR baseline {lib.get('cvar_baseline', 'exact')}"
    if train:
        steady = lib.get("rows_per_actor_s")
        rows.append(_row("scoring_vs_training", "score-rewards / QR-IQL training (1 worker), steady",
                         (steady or lib["rows_per_s"]) / train["samples_per_s"],
                         (f"{steady:,.0f} rows per process-second of scoring batches" if steady else
                          f"{lib['rows_per_s']:,.0f} rows/s wall (no batch timing)")
                         + f" ({how}) vs {train['samples_per_s']:,.0f} samples/s steady"))
        rows.append(_row("scoring_vs_training_end_to_end", "score-rewards / QR-IQL training (1 worker), end to end",
                         lib["rows_per_s"] / train["end_to_end_samples_per_s"],
                         f"{lib['rows_per_s']:,.0f} vs {train['end_to_end_samples_per_s']:,.0f} rows/s over each "
                         "call's wall time (start-up included)"))
    rows.append(_row("scoring_vs_plain", "score-rewards / plain scoring loop", lib["rows_per_s"] / plain["rows_per_s"],
                     f"{lib['wall_s']:.1f} s vs {plain['seconds']:.1f} s{_fastest_of(lib)}; same scores (max |diff| "
                     f"{max(s['check']['max_abs_diff'].values()):.2g})"))
    return rows


def one_worker_run(t: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A model stage's 1-worker run: with several rounds, the one at the median of their steady samples/s (as
    every training ratio is judged on its median round), else the only one."""
    rounds = [r["runs"]["ray_1"] for r in (t or {}).get("rounds") or () if "ray_1" in r["runs"]]
    if len(rounds) > 1:
        return rounds[median_round([run["samples_per_s"] for run in rounds])]
    return (t or {}).get("runs", {}).get("ray_1")


def _fastest_of(lib: Dict[str, Any]) -> str:
    """", the fastest of N alternating rounds" where the record has rounds (runs before session 20 have one)."""
    n = len(lib.get("round_wall_s") or ())
    return f", the fastest of {n} alternating rounds" if n > 1 else ""


def _rank_memory(k: Dict[str, Any], unit: str = "") -> str:
    """One rank's peak memory next to its shard's weights: host RSS, and GPU memory on CUDA; ``*`` marks a
    peak that could not be reset before the run (it also covers the smaller catalogs before it)."""
    gpu = f", GPU {k['peak_gpu_mb']:,.0f}{unit}" if k.get("peak_gpu_mb") is not None else ""
    return (f"{k['peak_rss_mb']:,.0f}{unit}{'' if k.get('peak_reset', True) else '*'}{gpu} "
            f"(shard {k['shard_mb']:,.1f})")


def catalog_rows(c: Dict[str, Any]) -> List[Dict[str, Any]]:
    """QR-IQL step speed at the largest catalog / at the smallest, sampled soft value (row-wise over the
    workers), with each rank's peak memory at the largest next to its shard."""
    label = "QR-IQL step (sampled soft value): speed at the largest / smallest catalog"
    if "error" in c:
        return [_failed("catalog_sampled_speed", label, c)]
    r = c["ratios"]
    sampled = {x["items"]: x for x in c["runs"] if x["soft_value"].startswith("sampled")}
    big, small = sampled[r["largest"]], sampled[r["smallest"]]
    peaks = ", ".join(_rank_memory(k, " MiB") for k in big["ranks"])
    return [_row("catalog_sampled_speed", label + f", row-wise over {c['workers']} workers ({c.get('device', 'cpu')})",
                 r["sampled_speed_largest_vs_smallest"],
                 f"{big['step_s_median'] * 1e3:.1f} ms at {r['largest']:,} items vs {small['step_s_median'] * 1e3:.1f} "
                 f"ms at {r['smallest']:,}; peak RSS per rank at {r['largest']:,}: {peaks}")]


PREPARE_GOAL_EVENTS = 5_000_000  # the prepare goal is stated at 10^7 events: judged only on a world near that size


def prepare_scale_rows(p: Dict[str, Any]) -> List[Dict[str, Any]]:
    """prepare at the largest world: library / plain; and how the library's time grows with the events."""
    label = "prepare at the largest --prepare-scale world: library / plain pandas+pyarrow"
    if "error" in p:
        return [_failed("prepare_scale_library_vs_plain", label, p)]
    runs = [r for r in p["runs"] if "error" not in r]
    failed = f"; {len(p['runs']) - len(runs)} world(s) failed: {'; '.join(p.get('errors', []))}" \
        if len(runs) < len(p["runs"]) else ""
    if not runs:
        return [_row("prepare_scale_library_vs_plain", label, None, "not measured" + failed)]
    big, small = runs[-1], runs[0]
    goal = "prepare_library_vs_plain" if big["events"] >= PREPARE_GOAL_EVENTS else None  # None: context only
    rows = [_row("prepare_scale_library_vs_plain", label.replace("the largest --prepare-scale world",
                                                                 f"{big['events']:,} events"),
                 big["ratios"]["library_vs_plain"], f"{big['library']['wall_s']:.2f} s vs {big['ratios']['plain_s']:.2f} s; "
                 f"same {big['check']['library']['transitions']:,} transitions{failed}", goal_key=goal)]
    if len(runs) > 1:
        growth = (big["events"] / small["events"]) / (big["library"]["wall_s"] / small["library"]["wall_s"])
        rows.append(_row("prepare_scale_linearity", f"prepare scaling, {small['events']:,} -> {big['events']:,} "
                         "events: growth of the events / growth of the library's time (1.0 = linear, above = "
                         "sub-linear)", growth,
                         f"library {small['library']['wall_s']:.1f} s -> {big['library']['wall_s']:.1f} s, plain "
                         f"{small['ratios']['plain_s']:.1f} s -> {big['ratios']['plain_s']:.1f} s for "
                         f"{big['events'] / small['events']:.1f}x the events"))
    return rows


def scale_lines(result: Dict[str, Any]) -> List[str]:
    """The scale curves as tables: step time and peak memory per rank by catalog size; prepare time by events."""
    stages, lines = result["stages"], []
    catalog = stages.get("catalog", {})
    if catalog.get("runs"):
        lines += ["", f"QR-IQL step by catalog size (item table row-wise over {catalog['workers']} workers, "
                  f"{catalog.get('device', 'cpu')}, synthetic batches):", "",
                  "| items | soft value | ms/step | peak RSS per rank, MiB (its shard's weights) |", "|---|---|---|---|"]
        for r in catalog["runs"]:
            peaks = ", ".join(_rank_memory(k) for k in r["ranks"])
            lines.append(f"| {r['items']:,} | {r['soft_value']} | {r['step_s_median'] * 1e3:.1f} | {peaks} |")
    runs = stages.get("prepare_scale", {}).get("runs", [])
    if runs:
        lines += ["", "prepare by events:", "", "| events | library s | plain s | library / plain | library stages s "
                  "(read+validate / sessionize / write) |", "|---|---|---|---|---|"]
        for r in runs:
            if "error" in r:
                lines.append(f"| – | failed: {r['error']} | | | |")
                continue
            st = r["library"]["stages_s"]
            lines.append(f"| {r['events']:,} | {r['library']['wall_s']:.2f} | {r['ratios']['plain_s']:.2f} | "
                         f"{r['ratios']['library_vs_plain']:.2f}x | {st.get('read_validate', 0):.2f} / "
                         f"{st.get('sessionize', 0):.2f} / {st.get('write', 0):.2f} |")
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    return lines


def _workers_text(c: Dict[str, Any], ranks: List[Dict[str, Any]]) -> str:
    """Each sharded worker's peak RSS next to the MiB of its shard of the item table and its RSS at the end."""
    parts = []
    for k in ranks:
        rows = sum(r for key, shapes in k["shard_sizes"].items() if "item_table" in key for r, _ in shapes)
        parts.append(f"{k['peak_rss_mb']:,.0f} MiB (shard {rows * c['table_mb'] / (c['items'] + 1):,.1f}; "
                     f"{k.get('end_rss_mb') or 0:,.0f} at the end)")
    return ", ".join(parts)


def sharded_scoring_rows(c: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One scoring actor's peak RSS / one sharded worker's, and their speeds, on the same big model."""
    label = "scoring a big catalog: one actor's peak RSS / one sharded worker's"
    if "error" in c:
        return [_failed("sharded_scoring_memory", label, c)]
    runs, r = c["runs"], c["ratios"]
    return [_row("sharded_scoring_memory", label.replace("a big catalog", f"{c['items']:,} items"),
                 r["actor_rss_vs_worker_rss"], f"workers {_workers_text(c, runs['sharded']['ranks'])}; one actor "
                 f"{c['one_actor_peak_rss_mb']:,.0f} MiB (whole table {c['table_mb']:,.1f} MiB); {c['rows']:,} pairs, "
                 f"baseline {runs['sharded']['baseline']}"),
            _row("sharded_scoring_speed", f"scoring {c['items']:,} items: sharded (2 workers) / actors, rows/s",
                 r["sharded_vs_actors_speed"], f"{runs['sharded']['rows_per_s']:,.0f} vs "
                 f"{runs['actors']['rows_per_s']:,.0f} rows/s (start-up included)")]


def sharded_ranking_rows(c: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Ranking a big catalog, sharded: rows/s and each worker's memory (context only: no unsharded run fits)."""
    label = "ranking a big catalog, sharded over 2 workers: rows/s"
    if "error" in c:
        return [_failed("sharded_ranking", label, c)]
    return [_row("sharded_ranking", label.replace("a big catalog", f"{c['items']:,} items"), None,
                 f"{c['rows_per_s']:,.1f} test rows/s ({c['rows']:,} rows, full catalog + sampled); workers "
                 f"{_workers_text(c, c['ranks'])}; whole table {c['table_mb']:,.1f} MiB; a ranking actor would "
                 f"also need a [256 x {c['items']:,}] score matrix ({256 * c['items'] * 4 / 2**30:,.1f} GiB)")]


def peer_rows(p: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Ours / RecBole training samples/s per model; the goal is met only at equal or better NDCG@10."""
    label = "{}: ours (Ray Train) / RecBole 1.2.1, training samples/s"
    if "error" in p:
        return [_failed("peer", label.format("peer"), p)]
    rows = []
    for r in p["rows"]:
        row = _row(f"peer_{r['model']}_speed", label.format(PEER_NAMES[r["model"]]), r["speed_ratio"],
                   f"{r['ours_samples_per_s']:,.0f} vs {r['recbole_samples_per_s']:,.0f} samples/s; NDCG@10 "
                   f"{r['ours_ndcg10']:.4f} vs {r['recbole_ndcg10']:.4f} ({r['epochs']} epoch(s))", "peer_speed")
        row["met"] = row["met"] and r["ours_ndcg10"] >= r["recbole_ndcg10"]
        rows.append(row)
    rows += [_row(f"peer_{m}_speed", label.format(PEER_NAMES[m]), None, f"not measured: {e}")
             for m, e in p.get("errors", {}).items()]
    return rows


def peer_lines(result: Dict[str, Any]) -> List[str]:
    """The side-by-side table of the RecBole comparison, with its settings."""
    p = result["stages"].get("peer")
    if not p or "error" in p or not p["rows"]:
        return []
    s, d = p["settings"], p["data"]
    lines = ["", f"Peer: RecBole 1.2.1 on {d['events']:,} MovieLens-1M ratings ({d['users']:,} users, {d['items']:,} "
             f"items): {s['layers']} layers, d={s['dim']}, {s['heads']} heads, max length {s['state_len']}, dropout "
             f"{s['dropout']}, global batch {s['batch_size']}, lr {s['lr']}, full softmax, {s['epochs']} epoch(s); "
             f"ours on {s['workers']} Ray Train workers x {s['threads']} thread(s), RecBole on "
             f"{s['recbole_threads'] or s['workers'] * s['threads']} thread(s). NDCG@10: full ranking, the user's "
             "other items masked (RecBole's protocol; ours unmasked in brackets).", "",
             "| model | ours samples/s | RecBole samples/s | ratio | ours NDCG@10 | RecBole NDCG@10 | ours HR@10 | "
             "RecBole HR@10 | training s (ours / RecBole) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {PEER_NAMES[r['model']]} | {r['ours_samples_per_s']:,.0f} | {r['recbole_samples_per_s']:,.0f} | "
                     f"**{r['speed_ratio']:.2f}x** | {r['ours_ndcg10']:.4f} ({r['ours_ndcg10_unmasked']:.4f}) | "
                     f"{r['recbole_ndcg10']:.4f} | {r['ours_hr10']:.4f} | {r['recbole_hr10']:.4f} | "
                     f"{r['ours_train_s']:.0f} / {r['recbole_train_s']:.0f} |")
    return lines


def collect_ratios(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every ratio the run measured, in a fixed order."""
    stages = result["stages"]
    rows: List[Dict[str, Any]] = []
    if "prepare" in stages:
        rows += prepare_rows(stages["prepare"])
    for model in ("qriql", "sasrec"):
        if model in stages:
            rows += training_rows(model, stages[model])
    if "scoring" in stages:
        rows += scoring_rows(stages["scoring"], stages.get("qriql"))
    if "prepare_scale" in stages:
        rows += prepare_scale_rows(stages["prepare_scale"])
    if "catalog" in stages:
        rows += catalog_rows(stages["catalog"])
    if "sharded_scoring" in stages:
        rows += sharded_scoring_rows(stages["sharded_scoring"])
    if "sharded_ranking" in stages:
        rows += sharded_ranking_rows(stages["sharded_ranking"])
    if "peer" in stages:
        rows += peer_rows(stages["peer"])
    return rows


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"**{value:.2f}x**"  # no ratio: not measured, or context only


def breakdown_lines(result: Dict[str, Any]) -> List[str]:
    """Where the time goes: the 1-worker Ray run vs the plain run of each model (seconds unless noted)."""
    lines = ["| model | run | wall s | start-up s | first interval s (data wait) | steady ms/step | data wait | "
             "final checkpoint + shutdown s |", "|---|---|---|---|---|---|---|---|"]
    for model in ("qriql", "sasrec"):
        runs = result["stages"].get(model, {}).get("runs", {})
        p = runs.get("plain_before")
        if p:
            lines.append(f"| {MODEL_NAMES[model]} | plain | {p['wall_s']:.1f} | {p['read_s'] + p['build_s']:.1f} "
                         f"(read + build) | | {p['step_time_s'] * 1e3:.1f} | {p['data_wait_frac']:.1%} | |")
        default_feed = runs.get("ray_1", {}).get("feed")  # runs before session 15 did not record it
        default_label = f"1 worker, train.feed {default_feed}" if default_feed else "1 worker"
        for key, run in (("ray_1", default_label), ("ray_1_memory", "1 worker, fed from memory"),
                         ("ray_1_stream", "1 worker, streamed")):
            r = runs.get(key)
            if not r:
                continue
            b = r["breakdown"]
            lines.append(f"| {MODEL_NAMES[model]} | {run} | {b['wall_s']:.1f} | {b['launch_s'] + b['setup_s']:.1f} "
                         f"(launch {b['launch_s']:.1f} + setup {b['setup_s']:.1f}) | {b['first_interval_s']:.1f} "
                         f"({b['first_data_wait_s']:.1f}) | {r['step_time_s'] * 1e3:.1f} | {r['data_wait_frac']:.1%} | "
                         f"{b['final_s'] + b['shutdown_s']:.1f} |")
    return lines if len(lines) > 2 else []


def markdown(result: Dict[str, Any]) -> str:
    """The run as a Markdown section: machine and load, every ratio side by side, the time breakdown."""
    m, lb, la = result["machine"], result["load_before"], result["load_after"]
    lines = [f"### `{result['command']}`: {result['started']}", "",
             f"{m['cores']} cores, torch {m['torch']}, Ray {m['ray']}, Python {m['python']}"
             f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}, commit {m.get('commit')}. "
             f"**Load average before {lb['1m']} / {lb['5m']} / {lb['15m']}, after {la['1m']} / {la['5m']} / {la['15m']}** "
             f"(1 / 5 / 15 min). {_world_text(result)}Whole run {result['total_s']:.0f} s.", "",
             "| ratio (library / baseline) | value | goal | measured |", "|---|---|---|---|"]
    for r in result["ratios"]:
        met = "" if r["met"] is None else (" (met)" if r["met"] else " (not met)")
        lines.append(f"| {r['label']} | {_fmt(r['value'])} | {r['goal_text']}{met} | {r['detail']} |")
    breakdown = breakdown_lines(result)
    if breakdown:
        last = " (the last round)" if result["sizes"].get("rounds", 1) > 1 else ""
        lines += ["", f"Where the time goes{last} (plain run before the Ray runs; Ray Train with 1 worker):", ""] + breakdown
    lines += scale_lines(result)
    lines += peer_lines(result)
    return "\n".join(lines) + "\n"


def _world_text(result: Dict[str, Any]) -> str:
    """The simulated world and budget, when the run used them (the peer alone does not)."""
    if "world" not in result:
        return ""
    s = result["sizes"]
    return (f"{result['world']['events']:,} simulated events ({s['users']:,} users, {s['items']:,} items, "
            f"{s['days']} day(s)); {s['steps']} training steps per run, the first {s['warmup_steps']} left out of "
            f"steady state; plain runs on {s['threads']} torch thread(s)"
            + (f"; {s['rounds']} rounds of each model's runs, each training ratio their median"
               if s.get("rounds", 1) > 1 else "")
            + ". ")


RESULTS_HEADING = "## `mtrec bench` runs"


def append_results(text: str, path: Path) -> None:
    """Append ``text`` to ``path`` (under a ``mtrec bench`` heading, added the first time)."""
    existing = path.read_text() if path.exists() else ""
    prefix = "" if RESULTS_HEADING in existing else ("\n" if existing.endswith("\n") else "\n\n") + RESULTS_HEADING + "\n"
    with open(path, "a") as f:
        f.write(prefix + "\n" + text)


def write_json(result: Dict[str, Any], path: Path) -> None:
    """The whole result (every run's figures, checks, breakdowns and ratios) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))


DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"  # the checkout's results file
