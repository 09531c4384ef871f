"""Summaries of one run (one server, one load level): latency percentiles and throughput, as
vLLM's serving benchmark reports them.

- TTFT: send → first content chunk.
- ITL: gaps between consecutive content chunks, pooled over all requests.
- TPOT: per request, (last chunk − first chunk) / (tokens − 1).
- e2e: send → end of stream.
- output tok/s: all output tokens / wall time of the run (first send → last end).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from bench.serving.loadgen import RequestResult


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "mean": statistics.fmean(ms) if ms else float("nan"),
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
    }


@dataclass
class RunSummary:
    server: str
    mode: str  # "closed" or "poisson"
    level: float  # concurrency, or arrival rate per second
    repeat: int
    requests: int
    failures: int
    duration_s: float
    output_tokens: int
    mean_output_tokens: float
    tokens_from_usage: bool
    output_tok_s: float
    req_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    loadgen_cpu_s: float = 0.0
    server_rss_mib: float | None = None
    errors: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    server: str, mode: str, level: float, repeat: int, results: list[RequestResult]
) -> RunSummary:
    ok = [r for r in results if r.ok]
    start = min((r.start for r in results), default=0.0)
    end = max((r.end for r in results), default=0.0)
    duration = max(end - start, 1e-9)
    tokens = sum(r.output_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpot = [
        (r.chunk_times[-1] - r.chunk_times[0]) / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1
    ]
    return RunSummary(
        server=server,
        mode=mode,
        level=level,
        repeat=repeat,
        requests=len(results),
        failures=len(results) - len(ok),
        duration_s=duration,
        output_tokens=tokens,
        mean_output_tokens=tokens / len(ok) if ok else 0.0,
        tokens_from_usage=all(r.tokens_from_usage for r in ok) if ok else False,
        output_tok_s=tokens / duration,
        req_s=len(ok) / duration,
        ttft_ms=dist_ms([r.ttft for r in ok]),
        itl_ms=dist_ms(itl),
        tpot_ms=dist_ms(tpot),
        e2e_ms=dist_ms([r.e2e for r in ok]),
        errors=sorted({r.error for r in results if r.error})[:5] or None,
    )
