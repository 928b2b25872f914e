"""The text report of a capacity plan: :func:`format_plan` renders :func:`~mtrec_dist.planning.plan_capacity`'s
dict (target, table, plan, a per-rank table with identical ranks collapsed, memory, all-to-all bytes)."""
from __future__ import annotations

from typing import Any, Dict, List

GIB = 1024**3  # TorchRec counts memory in GiB


def _fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, div in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n)} B"


def _rank_groups(ranks: List[dict], a2a: Dict[str, Any]) -> List[tuple]:
    """Consecutive ranks with identical figures collapse into one row (64 identical ranks -> one line)."""
    rows: List[tuple] = []
    for d in ranks:
        r = d["rank"]
        key = (d["shards"], d["rows"], d["hbm_bytes"], d["ddr_bytes"], a2a["sent_bytes"][r],
               a2a["received_bytes"][r])
        if rows and rows[-1][2] == key and rows[-1][1] == r - 1:
            rows[-1] = (rows[-1][0], r, key, d)
        else:
            rows.append((r, r, key, d))
    return rows


def format_plan(result: Dict[str, Any]) -> str:
    inp, tab, plan, summ, a2a = (result["inputs"], result["table"], result["plan"], result["summary"],
                                 result["all_to_all"])
    out: List[str] = []
    dev = inp["compute_device"]
    mem = (f"{inp['hbm_gb_per_rank']:g} GiB HBM + {inp['ddr_gb_per_rank']:g} GiB DDR per rank"
           if dev == "cuda" else f"{inp['ddr_gb_per_rank']:g} GiB DDR per rank")
    out.append(f"Target: {inp['world_size']} {dev} rank(s) on {inp['nodes']} node(s) x {inp['local_world_size']}, "
               f"{mem}, {inp['reserve_fraction']:.0%} reserved for dense params/activations")
    out.append(f"Table:  {tab['name']}: {tab['rows']:,} rows x {tab['dim']} dims, fp32 weights "
               f"{_fmt_bytes(tab['weight_bytes'])} + {inp['sparse_optimizer']} state "
               f"{_fmt_bytes(tab['optimizer_bytes'])}; features {', '.join(inp['features'])}")
    out.append(f"Batch:  {inp['batch_size_per_rank']} samples per rank x {inp['ids_per_sample']} ids per sample "
               f"(sharding requested: {inp['sharding']})")
    out.append("")
    out.append(f"Plan (TorchRec {result['planner']['torchrec_version']} EmbeddingShardingPlanner, "
               f"{result['planner']['seconds']:.2f} s): sharding={plan['sharding_type']} "
               f"kernel={plan['compute_kernel']} shards={plan['num_shards']} on {len(plan['ranks'])} rank(s)")
    out.append("")
    hdr = f"{'ranks':>11} {'shards':>6} {'rows':>15} {'HBM used':>12} {'HBM %':>6} {'DDR used':>12} {'DDR %':>6} " \
          f"{'a2a sent':>11} {'a2a recv':>11}"
    out.append(hdr)
    out.append("-" * len(hdr))
    for first, last, _key, d in _rank_groups(result["ranks"], a2a):
        label = f"{first}" if first == last else f"{first}-{last}"
        out.append(f"{label:>11} {d['shards']:>6} {d['rows']:>15,} {_fmt_bytes(d['hbm_bytes']):>12} "
                   f"{d['hbm_used_fraction'] * 100:>5.1f}% {_fmt_bytes(d['ddr_bytes']):>12} "
                   f"{d['ddr_used_fraction'] * 100:>5.1f}% {_fmt_bytes(a2a['sent_bytes'][first]):>11} "
                   f"{_fmt_bytes(a2a['received_bytes'][first]):>11}")
    out.append("")
    out.append(f"Per-rank memory (max): HBM {_fmt_bytes(summ['max_hbm_bytes'])} "
               f"({summ['max_hbm_used_fraction']:.1%} of usable), DDR {_fmt_bytes(summ['max_ddr_bytes'])} "
               f"({summ['max_ddr_used_fraction']:.1%} of usable)")
    if a2a["applies"]:
        out.append(f"All-to-all per step: max {_fmt_bytes(a2a['max_sent_bytes_per_rank'])} sent and "
                   f"{_fmt_bytes(a2a['max_received_bytes_per_rank'])} received per rank; "
                   f"{_fmt_bytes(a2a['cluster_bytes_per_step'])} over the whole cluster")
    else:
        out.append(f"No all-to-all (data_parallel): gradient all-reduce about "
                   f"{_fmt_bytes(a2a['gradient_allreduce_bytes_per_rank'])} per rank per step")
    out.append(f"Planner's estimate of the embedding work per step (slowest rank): "
               f"{summ['max_planner_ms_per_step']:.3f} ms")
    out.append("")
    out.append("How the all-to-all bytes are computed: " + a2a["formula"])
    return "\n".join(out)
