"""Text a person reads about the data layer's outputs: a prepared dataset's manifest, a simulator run.

Kept apart from the code that produces those dicts so that commands (``mtrec prepare``, ``mtrec
simulate``, ``mtrec inspect``) and the driver print the same lines without importing each other.
"""
from __future__ import annotations


def summarize_manifest(m: dict) -> str:
    """Human-readable summary of a manifest (printed by `mtrec prepare` and `mtrec inspect`)."""
    lines = [
        f"prepared dataset (schema v{m['schema_version']}, created {m['created_at']}) from {m['input']} "
        f"[{m['format']}]",
        f"  rows_in {m['rows_in']:,} = rows_ok {m['rows_ok']:,} + rows_rejected {m['rows_rejected']:,}",
        f"  transitions {m['num_transitions']:,} (not engaged: {m['rows_not_engaged']:,}); "
        f"items {m['num_items']:,}; users {m['num_users']:,}; state_len {m['state_len']}; "
        f"session_gap_s {m['session_gap_s']}",
    ]
    if m["rejects_by_reason"]:
        lines.append("  rejects by reason: " + ", ".join(f"{k}={v:,}" for k, v in m["rejects_by_reason"].items()))
    if m.get("reject_hints"):
        lines.append("  hints: " + ", ".join(f"{k} ({v:,})" for k, v in m["reject_hints"].items()))
    if m.get("slates"):
        from mtrec_dist.data.slates import summary_line

        lines.append("  " + summary_line(m["slates"]))
    lines.append("  shards: " + ", ".join(f"{k} {len(v)} file(s)/{sum(s['rows'] for s in v):,} rows"
                                        for k, v in m["shards"].items()))
    lines.append(f"  time {m['total_seconds']}s ({m['events_per_s']:,} events/s): {m['seconds']}")
    return "\n".join(lines)


def manifest_line(m: dict) -> str:
    """One line of a manifest for a whole run's output (``mtrec inspect`` shows all of it)."""
    rejects = "".join(f", {k} {v:,}" for k, v in m["rejects_by_reason"].items())
    sl = m.get("slates")
    slates = (f"; {sl['rows_ok']:,} slates shown (impressions in {sl['rows_in']:,} = ok {sl['rows_ok']:,} + "
              f"rejected {sl['rows_rejected']:,})" if sl else "")
    return (f"prepared {m['num_transitions']:,} transitions, {m['num_items']:,} items, {m['num_users']:,} users "
            f"(rows_in {m['rows_in']:,} = ok {m['rows_ok']:,} + rejected {m['rows_rejected']:,}{rejects}){slates} "
            f"in {m['total_seconds']}s")


def format_simulation_summary(s: dict) -> str:
    """Human-readable summary of the simulator's ``truth/summary.json`` (`mtrec simulate`, `mtrec inspect`)."""
    groups = [(name, s[name]) for name in ("clickbait", "compulsive", "other") if name in s]
    lines = [
        f"simulated {s['events']:,} events: {s['users']:,} active users of {s['num_users']:,}, "
        f"{s['items_engaged']:,} engaged items of {s['num_items']:,}, {s['days']} day(s), "
        f"{s['sessions']:,} sessions, {s['slates']:,} slates (CTR {s['ctr']:.3f}) in {s['seconds']:.1f}s",
        f"  {'':10s} {'items':>7s} {'CTR':>7s} {'mean satisfaction':>18s} {'mean watch ratio':>17s}",
    ]
    for name, g in groups:
        lines.append(f"  {name:10s} {g['items']:7d} {g['ctr']:7.3f} {g['mean_satisfaction']:18.3f} "
                     f"{g['mean_watch_ratio']:17.3f}")
    lines.append(f"  per-item corr(CTR, mean satisfaction) = {s['item_ctr_vs_satisfaction_corr']:.3f}")
    if "watch_ratio_vs_satisfaction_spearman" in s:
        lines.append(f"  Spearman(watch ratio, satisfaction) = {s['watch_ratio_vs_satisfaction_spearman']:.3f}; "
                     f"next-day return rate = {s.get('next_day_return_rate', float('nan')):.3f}")
    lines.append(f"  logs: {s['out_dir']}/logs  truth: {s['out_dir']}/truth")
    return "\n".join(lines)
