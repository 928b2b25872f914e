"""The run report: ``report.html`` + PNG figures + ``metrics.json`` + TensorBoard scalars.

Input is one plain ``results`` dict assembled by the pipeline (every number in it was measured in the run):

    {
      "title": str, "config": {...}, "data": {manifest summary},
      "reward": {
        "curve": [{"step": int, "loss": float, ...}, ...],
        "validity": {"spearman": float, "auc": float, "click_spearman": float, ...},
        "groups": {group_name: {"taus": [N], "quantiles": [N], "n": int}},   # mean reward quantiles per item group
        "scatter": {"learned": [...], "truth": [...], "truth_label": str},
      },
      "recommenders": [
        {"backbone": str, "guidance": str, "curve": [...],
         "offline": {"all": {"HR@10": ...}, "satisfied": {...}, "sampled": {...}},
         "online": {"ctr": {"mean", "lo", "hi"}, "satisfaction": {...}, "watch_time": {...}}},
      ],
    }
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the report is written to files
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return html.escape(str(x))


def _fmt_ci(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['mean']:.4f} [{d['lo']:.4f}, {d['hi']:.4f}]"


def plot_reward_fan(groups: dict, path: Path) -> None:
    """Fan chart: the mean learned reward quantile function of each item group (tau on x, reward on y)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in groups.items():
        taus, q = g["taus"], g["quantiles"]
        line, = ax.plot(taus, q, marker="o", ms=3, label=f"{name} (n={g.get('n', '?')})")
        mid = len(q) // 2
        # Shade the inter-quantile band around the median so the spread (risk) is visible at a glance.
        ax.fill_between(taus, [q[mid]] * len(q), q, alpha=0.12, color=line.get_color())
    ax.set_xlabel("quantile level τ")
    ax.set_ylabel("mental reward quantile R_τ(s, a)")
    ax.set_title("Learned reward distribution per item group")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gain_vs_beta(sweep: dict, row_names: dict, path: str) -> None:
    """The ablation's sweep: gain in satisfaction per session over row A, per row, against beta_s (the
    watch ratio's slope on satisfaction), with 95% CIs."""
    betas = sorted(sweep, key=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in (r for r in sweep[betas[0]] if r != "A"):
        g = [sweep[b][row].get("gain_vs_A:satisfaction_per_session", {"mean": math.nan, "half": 0.0}) for b in betas]
        ax.errorbar([float(b) for b in betas], [x["mean"] for x in g], yerr=[x["half"] for x in g],
                    label=f"{row} {row_names.get(row, '')}", capsize=3, marker="o")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="beta_s (simulator.watch_satisfaction)", ylabel="gain in satisfaction / session vs A")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reward_vs_truth(scatter: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(scatter["truth"], scatter["learned"], s=4, alpha=0.3)
    ax.set_xlabel(scatter.get("truth_label", "true satisfaction"))
    ax.set_ylabel("learned mean mental reward")
    ax.set_title("Learned reward vs withheld satisfaction")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[dict]], path: Path, key: str = "loss") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        pts = [(c["step"], c[key]) for c in curve if key in c and c[key] is not None]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"Training curves ({key})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_online(recs: list[dict], path: Path) -> None:
    """Bar chart of mean true satisfaction per session with 95% CIs, one bar per backbone x guidance."""
    rows = [r for r in recs if r.get("online")]
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (metric, label) in zip(axes, [("ctr", "CTR"), ("satisfaction", "mean true satisfaction"),
                                          ("watch_time", "watch time / session")]):
        names = [f"{r['backbone']}\n{r['guidance']}" for r in rows]
        means = [r["online"][metric]["mean"] for r in rows]
        err = [[m - r["online"][metric]["lo"] for m, r in zip(means, rows)],
               [r["online"][metric]["hi"] - m for m, r in zip(means, rows)]]
        ax.bar(range(len(rows)), means, yerr=err, capsize=3, color="tab:blue", alpha=0.7)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Online (simulator) results, mean and 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def results_table_rows(recs: list[dict], ks: list[int]) -> tuple[list[str], list[list[str]]]:
    headers = ["backbone", "guidance"]
    for split in ("all", "satisfied"):
        headers += [f"HR@{k} ({split})" for k in ks] + [f"NDCG@{k} ({split})" for k in ks]
    headers += ["HR@10 (100 neg.)", "CTR", "true satisfaction", "watch time / session"]
    rows = []
    for r in recs:
        off = r.get("offline", {})
        row = [html.escape(r["backbone"]), html.escape(r["guidance"])]
        for split in ("all", "satisfied"):
            m = off.get(split, {})
            row += [_fmt(m.get(f"HR@{k}", float("nan"))) for k in ks]
            row += [_fmt(m.get(f"NDCG@{k}", float("nan"))) for k in ks]
        row.append(_fmt(off.get("sampled", {}).get("HR@10", float("nan"))))
        on = r.get("online") or {}
        row += [_fmt_ci(on.get("ctr")), _fmt_ci(on.get("satisfaction")), _fmt_ci(on.get("watch_time"))]
        rows.append(row)
    return headers, rows


def write_tensorboard(results: dict, logdir: Path) -> None:
    """Final metrics as TensorBoard scalars (curves are written live by the training loop)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as w:
        for k, v in (results.get("reward", {}).get("validity") or {}).items():
            if isinstance(v, (int, float)):
                w.add_scalar(f"reward_validity/{k}", v, 0)
        for r in results.get("recommenders", []):
            tag = f"{r['backbone']}_{r['guidance']}"
            for split, m in (r.get("offline") or {}).items():
                if not isinstance(m, dict):  # counts such as n_test
                    continue
                for k, v in m.items():
                    if isinstance(v, (int, float)):
                        w.add_scalar(f"offline/{tag}/{split}/{k}", v, 0)
            for k, v in (r.get("online") or {}).items():
                if isinstance(v, dict) and "mean" in v:
                    w.add_scalar(f"online/{tag}/{k}", v["mean"], 0)
            for k, v in ((r.get("online") or {}).get("paired_gain") or {}).items():
                w.add_scalar(f"online_gain/{tag}/{k}", v["mean"], 0)


def write_report(results: dict, out_dir: str | Path, ks: list[int] = (5, 10, 20)) -> Path:
    """Write report.html, the PNG figures, metrics.json and TensorBoard scalars into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    figures: list[tuple[str, str]] = []
    reward = results.get("reward", {})
    if reward.get("groups"):
        plot_reward_fan(reward["groups"], out / "reward_fan.png")
        figures.append(("reward_fan.png", "Learned mental-reward quantiles per item group"))
    if reward.get("scatter"):
        plot_reward_vs_truth(reward["scatter"], out / "reward_vs_truth.png")
        figures.append(("reward_vs_truth.png", "Learned reward vs withheld satisfaction"))
    curves = {"reward model": reward.get("curve", [])}
    for r in results.get("recommenders", []):
        curves[f"{r['backbone']}/{r['guidance']}"] = r.get("curve", [])
    if any(curves.values()):
        plot_curves(curves, out / "training_curves.png")
        figures.append(("training_curves.png", "Training loss curves"))
    recs = results.get("recommenders", [])
    if any(r.get("online") for r in recs):
        plot_online(recs, out / "online.png")
        figures.append(("online.png", "Online simulator results with 95% CIs"))

    headers, rows = results_table_rows(recs, list(ks))
    validity = reward.get("validity") or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(results.get('title', 'MTRec report'))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;"
        "font-size:12px} td,th{border:1px solid #ccc;padding:3px 6px;text-align:right} th{background:#eee}"
        " img{max-width:100%;margin:0.5em 0} .cap{color:#555;font-size:13px}</style></head><body>",
        f"<h1>{html.escape(results.get('title', 'MTRec report'))}</h1>",
        "<h2>Data</h2>",
        _table(["key", "value"], [[html.escape(str(k)), _fmt(v)] for k, v in (results.get("data") or {}).items()
                                  if not isinstance(v, (dict, list))]),
        "<h2>Mental reward model (QR-IQL)</h2>",
        _table(["metric", "value"], [[html.escape(k), _fmt(v)] for k, v in validity.items()]),
        "<h2>Recommenders: every backbone × guidance mode</h2>",
        "<p class='cap'>Offline: the rows of the held-out users (no model trained on them; "
        "eval.heldout_user_share; on a large log those of a subset of them, eval.max_ranked_rows: see the notes), "
        "full ranking (and the sampled 100-negative protocol). "
        "Online: simulator, mean [95% CI] over seeds.</p>",
        _table(headers, rows),
    ]
    if results.get("ablation"):
        parts += ["<h2>Ablation: which reward should guide the recommender?</h2>",
                  "<p class='cap'>The same SASRec and budget guided by each reward; reward validity and offline "
                  "ranking on held-out users' rows, online on users absent from the logs; paired gains with 95% "
                  "CIs over training and online seeds (docs/method.md).</p>",
                  f"<pre>{html.escape(results['ablation']['table'])}</pre>"]
    parts.append("<h2>Figures</h2>")
    for fname, cap in figures:
        parts.append(f"<div><img src='{fname}' alt='{html.escape(cap)}'><div class='cap'>{html.escape(cap)}</div></div>")
    for note in results.get("notes", []):
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append("</body></html>")
    report = out / "report.html"
    report.write_text("\n".join(parts))
    write_tensorboard(results, out / "tensorboard")
    return report
