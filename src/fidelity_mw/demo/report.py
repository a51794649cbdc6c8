"""The report: decision lines, the side-by-side table, the JSON document, the plot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .. import __version__
from .metrics import VariantResult
from .records import DemoDecision, FrontRecord
from .runner import FIDELITY, SCATTERED, TOOLKIT
from .scenario import ScenarioConfig

METRIC_DEFINITIONS = {
    "fidelity": "share of client requests that had a healthy path (>= 1 healthy instance "
    "when the client issued them) and succeeded (200 within the client's retries)",
    "control_failures_while_healthy": "front responses produced by a control layer "
    "(limiter 429, breaker 503, deadline 504, every-instance-breaker-open 503) while a "
    "healthy path existed",
    "undeserved_429s": "429s sent to a client whose admitted requests (passed every control "
    "layer) in the limit period before the 429 numbered fewer than its limit",
    "clients_throttled_undeserved": "distinct clients that received at least one undeserved 429",
    "retry_amplification": "upstream calls counted at the upstream servers / client requests",
    "latency_p50_ms/latency_p99_ms": "client-observed time from the first try to the final "
    "answer of each client request (client retries and waits included); nearest-rank "
    "percentiles over all client requests, and over the succeeded ones (latency_succeeded_*)",
    "decisions_by_layer": "decisions each layer logged, by verdict",
    "stale_decision_share": "share of decisions taken on data older than 1 s (or from a "
    "cache / fallback source): the fidelity_mw.Decision.is_stale rule, applied to both",
    "stale_median_age_s": "median age of the data behind the stale decisions",
}

SCATTERED_LAYERS = {
    "limiter": "limits FixedWindowRateLimiter + MemoryStorage (slowapi's default strategy); "
    "hit() counts every request, rejected ones included; outermost",
    "app_retry": "tenacity AsyncRetrying: 3 attempts, wait_exponential",
    "breaker": "error ratio of a metrics snapshot refreshed periodically (stands in for a "
    "Hystrix-style breaker fed by a metrics pipeline / mesh outlier detection): opens at "
    ">= 50 % with >= min_calls, fixed open time, one trial call",
    "client_retry": "httpx-retries RetryTransport: 3 retries on 502/503/504, exponential "
    "backoff with jitter",
    "load_balancer": "round-robin httpx transport under the retry transport: every retry "
    "goes to the next instance",
}


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


Row = tuple[str, ...]  # the row's name, then one cell per variant


def _rows(results: Mapping[str, VariantResult]) -> list[Row]:
    variants = list(results.values())

    def each(fn: Any) -> tuple[str, ...]:
        return tuple(str(fn(v)) for v in variants)

    def control(v: VariantResult) -> str:
        c = v.control_failures_while_healthy()
        total = sum(c.values())
        detail = ", ".join(f"{k} {n}" for k, n in sorted(c.items()))
        return f"{total}" + (f" ({detail})" if detail else "")

    def throttled(v: VariantResult) -> str:
        undeserved, clients, total = v.undeserved_429s()
        return f"{clients} clients ({undeserved} of {total} 429s)"

    def amp(v: VariantResult) -> str:
        return f"{v.amplification:.2f}x ({v.upstream_calls} / {v.requests})"

    def stale(v: VariantResult) -> str:
        share, median, n, total = v.staleness()
        med = f", median {median:.2f} s old" if median is not None else ""
        return f"{_pct(share)} ({n} of {total}{med})"

    rows: list[Row] = [
        ("fidelity (healthy path -> success)", *each(lambda v: _fmt_fidelity(v))),
        ("client requests succeeded", *each(lambda v: f"{v.succeeded} / {v.requests}")),
        ("failed by a control layer, upstream healthy", *each(control)),
        ("throttled for rejections not caused", *each(throttled)),
        ("retry amplification (upstream calls/request)", *each(amp)),
        (
            "latency p50 / p99, all requests",
            *each(lambda v: f"{v.latency_ms(0.5):.0f} / {v.latency_ms(0.99):.0f} ms"),
        ),
        (
            "latency p50 / p99, succeeded requests",
            *each(lambda v: f"{v.latency_ms(0.5, True):.0f} / {v.latency_ms(0.99, True):.0f} ms"),
        ),
        ("decisions on stale data", *each(stale)),
        ("front requests (client retries included)", *each(lambda v: v.front_requests)),
    ]
    return rows


def _fmt_fidelity(v: VariantResult) -> str:
    return f"{_pct(v.fidelity)} ({v.healthy_succeeded} / {v.healthy_requests})"


def _layer_cell(by_layer: Mapping[str, Mapping[str, int]], layer: str) -> str:
    verdicts = by_layer.get(layer)
    if not verdicts:
        return "-"
    total = sum(verdicts.values())
    other = ", ".join(f"{k} {n}" for k, n in verdicts.items() if k != "allow")
    return f"{total}" + (f" ({other})" if other else "")


def _layer_rows(results: Mapping[str, VariantResult]) -> list[Row]:
    by_layer = [v.decisions_by_layer() for v in results.values()]
    layers = sorted(set().union(*by_layer))
    return [(f"  {layer}", *(_layer_cell(b, layer) for b in by_layer)) for layer in layers]


def render_table(results: Mapping[str, VariantResult], cfg: ScenarioConfig) -> str:
    """One column per variant that ran, in the order they ran."""
    rows = _rows(results)
    rows.append(("decisions by layer (total, non-allow)", *("" for _ in results)))
    rows.extend(_layer_rows(results))
    head: Row = ("", *(v.label for v in results.values()))
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(len(head))]

    def row(cells: Row) -> str:
        return "| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)) + " |"

    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, row(head), line]
    out.extend(row(r) for r in rows)
    out.append(line)
    return "\n".join(out)


def render_scenario(cfg: ScenarioConfig) -> str:
    lines = [
        f"load-balancer chaos: seed {cfg.seed}, {cfg.clients} clients at "
        f"{cfg.client_rate_min:g}-{cfg.client_rate_max:g} req/s each (limit "
        f"{cfg.limit_count}/{cfg.limit_period_s:g} s per client), {cfg.load_s:.1f} s of load "
        "per variant, 3 upstream instances",
        f"fidelity_mw state: {cfg.redis_url or 'memory:// (the embedded default)'}",
        "fault timeline (s into each variant's load):",
    ]
    lines += ["  " + f.describe() for f in cfg.fault_script().faults]
    return "\n".join(lines)


MAX_LINES_PER_REQUEST = 12


def decision_lines(result: VariantResult) -> list[str]:
    """One line per decision for a few requests of a variant (long ones shortened)."""
    lines = []
    for r in result.sample_requests():
        lines.append(_request_header(result.name, r))
        shown = r.decisions
        if len(shown) > MAX_LINES_PER_REQUEST:
            shown = r.decisions[: MAX_LINES_PER_REQUEST - 2]
        for d in shown:
            lines.append(_decision_line(r, d))
        if len(shown) < len(r.decisions):
            rest = r.decisions[len(shown) : -1]
            counts = Counter(f"{d.layer} {d.verdict}" for d in rest)
            summary = ", ".join(f"{k} x{n}" for k, n in counts.most_common())
            lines.append(f"    ... {len(rest)} more: {summary}")
            lines.append(_decision_line(r, r.decisions[-1]))
    return lines


def _decision_line(r: FrontRecord, d: DemoDecision) -> str:
    data = d.source if not d.age_s else f"{d.source}, {d.age_s:.2f} s old"
    return (
        f"    +{(d.at - r.start) * 1000:7.1f} ms  {d.layer:<12} {d.subject:<10} "
        f"{d.verdict:<8} {d.reason:<38} [{data}]"
    )


def _request_header(name: str, r: FrontRecord) -> str:
    outcome = "served" if r.status == 200 else f"failed by {r.failed_by}"
    return (
        f"  {name} request #{r.seq} from {r.client} at {r.start:6.2f} s -> {r.status} "
        f"({outcome}; {r.upstream_calls} upstream call(s); "
        f"{'healthy path' if r.healthy_path else 'no healthy path'})"
    )


def json_document(
    results: Mapping[str, VariantResult], cfg: ScenarioConfig, extra: Mapping[str, Any]
) -> dict[str, Any]:
    from .fronts import fidelity_policy

    policy = fidelity_policy(cfg)
    return {
        "demo": "load-balancer-chaos",
        "fidelity_mw_version": __version__,
        "seed": cfg.seed,
        "duration_s": cfg.duration_s,
        "scenario": cfg.to_json(),
        "fault_timeline": cfg.fault_script().to_json(),
        "fidelity_policy": policy.to_dict(),
        "fidelity_policy_version": policy.version,
        "scattered_layers": SCATTERED_LAYERS,
        **({"toolkit_layers": _toolkit_layers()} if TOOLKIT in results else {}),
        "metric_definitions": METRIC_DEFINITIONS,
        "variants": {name: r.to_json() for name, r in results.items()},
        **extra,
    }


def _toolkit_layers() -> dict[str, str]:
    from .toolkit import TOOLKIT_LAYERS

    return TOOLKIT_LAYERS


def plot(results: Mapping[str, VariantResult], cfg: ScenarioConfig, path: str) -> None:
    """Two panels: upstream calls per second, client success ratio per second."""
    import importlib

    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    fig, (ax_calls, ax_ok) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    colours = {SCATTERED: "tab:red", TOOLKIT: "tab:orange", FIDELITY: "tab:blue"}
    bin_s = max(0.2, round(cfg.load_s / 40, 1))
    for name, result in results.items():
        series = result.time_series(bin_s)
        ax_calls.step(
            series["t_s"],
            series["upstream_calls_per_s"],
            where="post",
            label=result.label,
            color=colours.get(name),
        )
        ax_ok.step(
            series["t_s"],
            series["success_ratio"],
            where="post",
            label=result.label,
            color=colours.get(name),
        )
    for fault in cfg.fault_script().faults:
        for ax in (ax_calls, ax_ok):
            ax.axvspan(fault.start_s, fault.end_s, alpha=0.12, color="grey")
        ax_calls.annotate(
            fault.kind,
            (fault.start_s, 0),
            fontsize=8,
            color="dimgrey",
            xytext=(2, 2),
            textcoords="offset points",
        )
    ax_calls.set_ylabel("upstream calls / s")
    ax_ok.set_ylabel("client success ratio\n(by time issued)")
    ax_ok.set_ylim(0, 1.05)
    ax_ok.set_xlabel("seconds into the load (shaded: scripted faults)")
    ax_calls.legend(loc="upper right")
    ax_calls.set_title(f"fidelity-mw demo: load-balancer chaos (seed {cfg.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
