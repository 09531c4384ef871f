"""JSON, Markdown and PNG output of a benchmark run, with our figures as ratios to the baselines."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.serving.stats import RunSummary

OURS = "llm-api"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def aggregate(runs: list[RunSummary]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (server, level): median over repeats, and min/max as the spread."""
    groups: dict[tuple[str, float], list[RunSummary]] = defaultdict(list)
    for r in runs:
        groups[(r.server, r.level)].append(r)
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for key, rs in groups.items():

        def pick(f: Any, rs: list[RunSummary] = rs) -> dict[str, float]:
            vals = [float(f(r)) for r in rs]
            return {"median": _median(vals), "min": min(vals), "max": max(vals)}

        out[key] = {
            "repeats": len(rs),
            "requests": sum(r.requests for r in rs),
            "failures": sum(r.failures for r in rs),
            "mean_output_tokens": _median([r.mean_output_tokens for r in rs]),
            "output_tok_s": pick(lambda r: r.output_tok_s),
            "req_s": pick(lambda r: r.req_s),
            "ttft_p50": pick(lambda r: r.ttft_ms["p50"]),
            "ttft_p95": pick(lambda r: r.ttft_ms["p95"]),
            "ttft_p99": pick(lambda r: r.ttft_ms["p99"]),
            "itl_mean": pick(lambda r: r.itl_ms["mean"]),
            "itl_p50": pick(lambda r: r.itl_ms["p50"]),
            "itl_p95": pick(lambda r: r.itl_ms["p95"]),
            "itl_p99": pick(lambda r: r.itl_ms["p99"]),
            "e2e_p50": pick(lambda r: r.e2e_ms["p50"]),
            "e2e_p95": pick(lambda r: r.e2e_ms["p95"]),
            "e2e_p99": pick(lambda r: r.e2e_ms["p99"]),
            "loadgen_cpu_s": pick(lambda r: r.loadgen_cpu_s),
            "rss_mib": pick(lambda r: r.server_rss_mib or 0.0),
        }
    return out


def targets(agg: dict[tuple[str, float], dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, where the run has the data for them."""

    def med(server: str, level: float, metric: str) -> float | None:
        row = agg.get((server, level))
        return None if row is None else float(row[metric]["median"])

    checks: list[dict[str, Any]] = []

    def add(name: str, ours: float | None, base: float | None, ok: bool | None, ratio: str) -> None:
        checks.append({"target": name, "ours": ours, "baseline": base, "ratio": ratio, "met": ok})

    ours16, ls16 = med(OURS, 16, "output_tok_s"), med("llama-server", 16, "output_tok_s")
    if ours16 is not None and ls16:
        r = ours16 / ls16
        add("16 streams: tok/s ≥ 1.0× llama-server", ours16, ls16, r >= 1.0, f"{r:.2f}×")
    lcp16 = med("llama-cpp-python", 16, "output_tok_s")
    if ours16 is not None and lcp16:
        r = ours16 / lcp16
        add("16 streams: tok/s ≥ 3× llama-cpp-python", ours16, lcp16, r >= 3.0, f"{r:.2f}×")
    ours1, ls1 = med(OURS, 1, "itl_mean"), med("llama-server", 1, "itl_mean")
    if ours1 is not None and ls1:
        r = ours1 / ls1
        add("1 stream: mean ITL within 10% of llama-server", ours1, ls1, r <= 1.10, f"{r:.2f}×")
    ttft8 = med(OURS, 8, "ttft_p95")
    if ttft8 is not None:
        add("8 streams: TTFT p95 ≤ 500 ms", ttft8, None, ttft8 <= 500, "—")
    return checks


def _fmt(cell: dict[str, float], digits: int = 0) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(cell['median'])} ({f.format(cell['min'])}–{f.format(cell['max'])})"


def markdown(meta: dict[str, Any], agg: dict[tuple[str, float], dict[str, Any]]) -> str:
    lines = [f"# Serving benchmark — {meta['started']}", ""]
    lines += ["## Set-up", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("servers", "started")]
    lines += [f"- server `{name}`: {flags}" for name, flags in meta["servers"].items()]
    lines += ["", "Cells: median over repeats (min–max). Latencies in ms.", ""]
    levels = sorted({lvl for _, lvl in agg})
    servers = list(dict.fromkeys(s for s, _ in sorted(agg, key=lambda k: k[0] != OURS)))
    head = (
        "| level | server | out tok/s | req/s | TTFT p50 | TTFT p95 | TTFT p99 | ITL mean | "
        "ITL p50 | ITL p95 | ITL p99 | e2e p50 | e2e p95 | e2e p99 | tokens/req | failed | "
        "RSS MiB |"
    )
    lines += ["## Results", "", head, "|" + "---|" * 17]
    for lvl in levels:
        for s in servers:
            row = agg.get((s, lvl))
            if row is None:
                continue
            cells = [
                _fmt(row["output_tok_s"], 1),
                _fmt(row["req_s"], 2),
                *(_fmt(row[m]) for m in ("ttft_p50", "ttft_p95", "ttft_p99")),
                *(_fmt(row[m], 1) for m in ("itl_mean", "itl_p50", "itl_p95", "itl_p99")),
                *(_fmt(row[m]) for m in ("e2e_p50", "e2e_p95", "e2e_p99")),
                f"{row['mean_output_tokens']:.0f}",
                f"{row['failures']}/{row['requests']}",
                f"{row['rss_mib']['median']:.0f}",
            ]
            lines.append(f"| {lvl:g} | {s} | " + " | ".join(cells) + " |")
    lines += ["", "## Ours as a ratio to each baseline (output tok/s; mean ITL)", ""]
    lines += [
        "| level | baseline | tok/s ratio | ITL ratio (lower is better) |",
        "|---|---|---|---|",
    ]
    for lvl in levels:
        ours = agg.get((OURS, lvl))
        for s in servers:
            base = agg.get((s, lvl))
            if s == OURS or ours is None or base is None:
                continue
            tr = ours["output_tok_s"]["median"] / base["output_tok_s"]["median"]
            ir = ours["itl_mean"]["median"] / base["itl_mean"]["median"]
            lines.append(f"| {lvl:g} | {s} | {tr:.2f}× | {ir:.2f}× |")
    checks = targets(agg)
    if checks:
        lines += ["", "## Targets", "", "| target | ours | baseline | ratio | met |"]
        lines += ["|---|---|---|---|---|"]
        for c in checks:
            base_txt = "—" if c["baseline"] is None else f"{c['baseline']:.1f}"
            met = "yes" if c["met"] else "**no**"
            lines.append(f"| {c['target']} | {c['ours']:.1f} | {base_txt} | {c['ratio']} | {met} |")
    lines += ["", "Plots: `throughput.png`, `ttft_p95.png`, `itl.png`.", ""]
    return "\n".join(lines)


def plots(agg: dict[tuple[str, float], dict[str, Any]], out: Path, xlabel: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    servers = sorted({s for s, _ in agg})
    for metric, title, name in (
        ("output_tok_s", "Output tokens/s", "throughput.png"),
        ("ttft_p95", "TTFT p95 (ms)", "ttft_p95.png"),
        ("itl_mean", "Mean inter-token latency (ms)", "itl.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in servers:
            pts = sorted((lvl, row[metric]) for (srv, lvl), row in agg.items() if srv == s)
            xs = [p[0] for p in pts]
            ys = [p[1]["median"] for p in pts]
            err = [
                [p[1]["median"] - p[1]["min"] for p in pts],
                [p[1]["max"] - p[1]["median"] for p in pts],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=s)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write(out: Path, meta: dict[str, Any], runs: list[RunSummary], xlabel: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    data = {
        "meta": meta,
        "runs": [r.to_json() for r in runs],
        "aggregate": [{"server": s, "level": lvl, **row} for (s, lvl), row in agg.items()],
        "targets": targets(agg),
    }
    (out / "results.json").write_text(json.dumps(data, indent=2))
    report = out / "report.md"
    report.write_text(markdown(meta, agg))
    plots(agg, out, xlabel)
    return report
