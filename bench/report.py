"""From per-session records to the benchmark's rows, ratios, table and plots (DESIGN section 8).
Pure functions over plain dicts, so the arithmetic is testable without running a model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PRICES = {"server_usd_per_h": 4.05, "edge_usd_per_h": 0.35}  # A100 40 GB, RTX 4090 (the paper)
RATIO_KEYS = ("server_tokens_per_busy_s", "server_tokens_per_wall_s", "itl_p50_s", "ttft_p50_s",
              "cost_per_mtok_usd")


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(config: str, edges: int, temperature: float, sessions: list[dict], busy_s: float,
              wall_s: float, batch_sizes: list[int], max_batch: int, edge_held_s: float = 0.0,
              prices: dict | None = None, **extra) -> dict:
    """One row. `sessions` are records {category, tokens, rounds, accepted, drafted, itl,
    ttft_s, hits, judged}; busy/wall are the server's; edge_held_s is edge-time held (edges x
    wall for the edge configurations, 0 where the server does everything)."""
    prices = prices or PRICES
    tokens = sum(s["tokens"] for s in sessions)
    rounds = sum(s["rounds"] for s in sessions)
    drafted = [s["drafted"] for s in sessions if s["drafted"] is not None]
    accepted = [s["accepted"] for s in sessions if s["accepted"] is not None]
    itl = [x for s in sessions for x in s["itl"]]
    ttft = [s["ttft_s"] for s in sessions]
    judged = sum(s["judged"] for s in sessions)
    cost = (wall_s * prices["server_usd_per_h"] + edge_held_s * prices["edge_usd_per_h"]) / 3600
    by_cat: dict[str, list[int]] = {}
    for s in sessions:
        t, r = by_cat.setdefault(s["category"], [0, 0]), s
        t[0] += r["tokens"]
        t[1] += r["rounds"]
    return {
        "config": config, "edges": edges, "temperature": temperature,
        "sessions": len(sessions), "tokens": tokens,
        "server_busy_s": busy_s, "server_wall_s": wall_s,
        "server_tokens_per_busy_s": tokens / busy_s if busy_s else None,
        "server_tokens_per_wall_s": tokens / wall_s if wall_s else None,
        "tokens_per_round": tokens / rounds if rounds else None,
        "acceptance": (sum(accepted) / sum(drafted)) if drafted and sum(drafted) else None,
        "itl_p50_s": pct(itl, 0.5), "itl_p90_s": pct(itl, 0.9), "itl_p99_s": pct(itl, 0.99),
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
        "cost_per_mtok_usd": cost / tokens * 1e6 if tokens else None,
        "proactive_hit_rate": sum(s["hits"] for s in sessions) / judged if judged else None,
        "server_idle_fraction": max(0.0, 1 - busy_s / wall_s) if wall_s else None,
        "batch_fill": (statistics.mean(batch_sizes) / min(edges, max_batch)
                       if batch_sizes else None),
        "tokens_per_round_by_category": {c: t / r for c, (t, r) in sorted(by_cat.items()) if r},
    } | extra


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's RATIO_KEYS divided by ar's and server-spec's at the same edges and
    temperature (throughput: higher is better; latency and cost: lower is better)."""
    base = {(r["config"], r["edges"], r["temperature"]): r for r in rows
            if r["config"] in ("ar", "server-spec") and r.get("budget") is None}
    for r in rows:
        for ref in ("ar", "server-spec"):
            b = base.get((ref, r["edges"], r["temperature"]))
            key = "vs_" + ref.replace("-", "_")
            r[key] = {k: _ratio(r[k], b[k]) for k in RATIO_KEYS} if b else None
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols = ["config", "edges", "temperature", "budget", "tokens", "server_tokens_per_busy_s",
            "server_tokens_per_wall_s", "tokens_per_round", "acceptance", "draft_s_per_token",
            "itl_p50_s",
            "itl_p90_s", "itl_p99_s", "ttft_p50_s", "cost_per_mtok_usd", "proactive_hit_rate",
            "server_idle_fraction", "batch_fill"]
    out = ["| " + " | ".join(cols) + " | x ar (busy tput) | x server-spec (busy tput) | "
           "x ar (ITL p50) | x ar (cost) |",
           "|" + "---|" * (len(cols) + 4)]
    for r in rows:
        va, vs = r.get("vs_ar") or {}, r.get("vs_server_spec") or {}
        cells = [_fmt(r.get(c)) for c in cols] + [
            _fmt(va.get("server_tokens_per_busy_s")), _fmt(vs.get("server_tokens_per_busy_s")),
            _fmt(va.get("itl_p50_s")), _fmt(va.get("cost_per_mtok_usd"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def ratios_table(rows: list[dict]) -> str:
    """The headline: every ratio against ar and server-spec, one line per configuration."""
    keys = [("server_tokens_per_busy_s", "busy tput"), ("server_tokens_per_wall_s", "wall tput"),
            ("itl_p50_s", "ITL p50"), ("ttft_p50_s", "TTFT p50"), ("cost_per_mtok_usd", "cost")]
    head = ["config", "edges", "T", "budget"] + [f"{n} x ar" for _, n in keys] + [
        f"{n} x server-spec" for _, n in keys]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        va, vs = r.get("vs_ar") or {}, r.get("vs_server_spec") or {}
        budget = "adaptive" if r.get("budget") is None else str(r["budget"])
        if r["config"] in ("ar", "server-spec", "hf-assisted"):
            budget = "-"
        cells = [r["config"], str(r["edges"]), f"{r['temperature']:g}", budget]
        cells += [_fmt(va.get(k)) for k, _ in keys] + [_fmt(vs.get(k)) for k, _ in keys]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    main = [r for r in rows if r.get("budget") is None]
    for temp in sorted({r["temperature"] for r in main}):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for cfg in dict.fromkeys(r["config"] for r in main):
            pts = sorted((r["edges"], r) for r in main
                         if r["config"] == cfg and r["temperature"] == temp)
            if not pts:
                continue
            xs = [e for e, _ in pts]
            for ax, key in zip(axes, ("server_tokens_per_busy_s", "server_tokens_per_wall_s",
                                      "itl_p50_s"), strict=True):
                ax.plot(xs, [r[key] for _, r in pts], marker="o", label=cfg)
        for ax, title in zip(axes, ("server throughput (tokens / busy s)",
                                    "server throughput (tokens / wall s)",
                                    "inter-token latency p50 (s)"), strict=True):
            ax.set_title(title)
            ax.set_xlabel("concurrent edges")
            ax.set_xticks(sorted({r["edges"] for r in main}))
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"temperature {temp}")
        fig.tight_layout()
        p = out / f"throughput_latency_T{temp}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    # tokens per round per category: the largest concurrency per config, greedy
    greedy = [r for r in main if r["temperature"] == 0.0 and r["tokens_per_round_by_category"]]
    if greedy:
        best = {}
        for r in greedy:
            if r["config"] not in best or r["edges"] > best[r["config"]]["edges"]:
                best[r["config"]] = r
        cats = sorted({c for r in best.values() for c in r["tokens_per_round_by_category"]})
        fig, ax = plt.subplots(figsize=(max(8, len(cats) * 0.9), 4.2))
        w = 0.8 / max(1, len(best))
        for i, (cfg, r) in enumerate(best.items()):
            ax.bar([j + i * w for j in range(len(cats))],
                   [r["tokens_per_round_by_category"].get(c, 0) for c in cats], w,
                   label=f"{cfg} ({r['edges']} edges)")
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cats))], cats, rotation=30,
                      ha="right")
        ax.set_ylabel("tokens per round")
        ax.set_title("tokens per round by Spec-Bench category (greedy)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out / "tokens_per_round_by_category.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    sweep = [r for r in rows if r.get("budget") is not None or (
        r["config"] == "specedge" and r["edges"] == max(x["edges"] for x in rows)
        and r["temperature"] == 0.0)]
    if len(sweep) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [("adaptive" if r.get("budget") is None else f"fixed {r['budget']}")
                  for r in sweep]
        ax.bar(labels, [r["server_tokens_per_busy_s"] for r in sweep])
        ax.set_ylabel("tokens / busy s")
        ax.set_title(f"tree budget at {sweep[0]['edges']} edges (specedge, greedy)")
        fig.tight_layout()
        p = out / "budget_sweep.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def header(res: dict) -> str:
    """One line: which models ran on what (results.json's `models` record, when present)."""
    m = res.get("models")
    if not m:
        return ""
    kind = "synthetic weights" if m.get("synthetic") else "real weights"
    return (f"{m['target']} (target) + {m['draft']} (draft), {kind}, {m['dtype']} on "
            f"{m['device']} ({m['device_name']})\n\n")


def render(out: Path) -> str:
    """Write table.md and the plots of out/results.json; returns the Markdown."""
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    md = header(res) + ratios_table(rows) + "\n\n" + table(rows) + "\n"
    (out / "table.md").write_text(md)
    plots(rows, out)
    return md


if __name__ == "__main__":  # python -m bench.report DIR: re-render a run's table and plots
    import sys

    print(render(Path(sys.argv[1])))
