"""bench/run.py's results as one table: medians over rounds, ratios, issue 11's targets, Markdown."""

from __future__ import annotations

import math
import statistics
from typing import Any

TARGETS = (
    "ceiling",
    "peer",
    "torch",
    "nextact-default",
    "nextact",
    "nextact-int8",
    "nextact-2w",
    "fullwindow",
)
LABELS = {
    "ceiling": "bare FastAPI (ceiling)",
    "peer": "BentoML + ONNX Runtime (peer, adaptive batching)",
    "torch": "FastAPI + redis-py + PyTorch eager (floor)",
    "nextact-default": "nextact, default settings (embedded Redis, appendfsync always)",
    "nextact": "**nextact, tuned** (external Redis, no persistence)",
    "nextact-int8": "nextact, tuned, int8 output layer (python -m training quantize)",
    "nextact-2w": "nextact, tuned, NEXTACT_WORKERS=2",
    "fullwindow": "nextact, tuned, full window (NEXTACT_INCREMENTAL_STATE=false)",
}
MODES = ("closed", "open")
RATIO_LABELS = (
    ("nextact tuned / ceiling", "nextact_over_ceiling", ".3f"),
    ("default / ceiling", "default_over_ceiling", ".3f"),
    ("nextact / peer", "nextact_over_peer", ".2f"),
    ("peer p99 / nextact p99, closed loop", "peer_p99_over_nextact_p99_closed", ".2f"),
    ("open loop", "peer_p99_over_nextact_p99_open", ".2f"),
    ("nextact / PyTorch floor", "nextact_over_torch", ".2f"),
    ("2 workers / 1 worker", "two_workers_over_one", ".2f"),
    ("its server CPU per request", "two_workers_cpu_over_one", ".2f"),
    ("int8 output layer / nextact", "int8_over_nextact", ".2f"),
    ("its server CPU per request", "int8_cpu_over_nextact", ".2f"),
    ("full window / nextact (incremental state)", "fullwindow_over_nextact", ".2f"),
    ("its server CPU per request", "fullwindow_cpu_over_nextact", ".2f"),
)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def batch_stats(delta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Batch sizes of one phase from a histogram delta: calls per bucket, the exact mean, and the approximate
    share of requests per bucket (each call counted at its bucket's midpoint, scaled to the exact total)."""
    if not delta or not delta["count"]:
        return None
    edges = [0.0] + [float(le) for le in delta["per_bucket"] if le != "+Inf"]
    rows: dict[str, float] = {}
    for i, (le, calls) in enumerate(delta["per_bucket"].items()):
        if le == "+Inf":
            mid = edges[-1] * 1.5
            label = f">{edges[-1]:.0f}"
        else:
            lo, hi = edges[i] + 1, edges[i + 1]
            mid = (lo + hi) / 2
            label = f"{hi:.0f}" if lo >= hi else f"{lo:.0f}-{hi:.0f}"
        rows[label] = calls * mid
    scale = delta["sum"] / (sum(rows.values()) or 1)
    return {
        "calls": delta["count"],
        "windows": int(delta["sum"]),
        "mean": delta["mean"],
        "calls_by_bucket": dict(zip(rows, delta["per_bucket"].values(), strict=True)),
        "approx_request_share": {k: round(v * scale / delta["sum"], 4) for k, v in rows.items()},
    }


def batch_histogram(rounds: list[dict[str, Any]], name: str, mode: str) -> dict[str, Any] | None:
    """A target's batch sizes in one kind of phase, all rounds together."""
    total: dict[str, Any] | None = None
    for r in rounds:
        h = r.get(name, {}).get(mode, {}).get("batch_size")
        if not h:
            continue
        if total is None:
            total = {"per_bucket": dict.fromkeys(h["per_bucket"], 0), "count": 0, "sum": 0.0}
        for le, c in h["per_bucket"].items():
            total["per_bucket"][le] = total["per_bucket"].get(le, 0) + c
        total["count"] += h["count"]
        total["sum"] += h["sum"]
    if total and total["count"]:
        total["mean"] = round(total["sum"] / total["count"], 2)
    return batch_stats(total)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarise(rounds: list[dict[str, Any]], memory: dict[str, Any]) -> dict[str, Any]:
    """Per target and phase: medians over rounds; then the ratios the issue asks about."""
    out: dict[str, Any] = {}
    for name in TARGETS:
        runs = [r[name] for r in rounds if name in r]
        if not runs:
            continue
        s: dict[str, Any] = {}
        for mode in MODES:
            ms = [r[mode] for r in runs if mode in r]
            if not ms:
                continue
            batches = batch_histogram(rounds, name, mode)
            s[mode] = {
                "rps": median([m["rps"] for m in ms]),
                "offered_rps": median([m.get("offered_rps") for m in ms]),
                **{q: median([m["latency_ms"][q] for m in ms]) for q in ("p50", "p90", "p99")},
                "server_cpu_ms_per_request": median([m["server_cpu_ms_per_request"] for m in ms]),
                "redis_cpu_ms_per_request": median([m["redis_cpu_ms_per_request"] for m in ms]),
                "mean_batch": batches["mean"] if batches else None,
                "dispatch_lag_p99_ms": median([(m.get("dispatch_lag_ms") or {}).get("p99") for m in ms]),
                "not_completed": sum(m.get("not_completed", 0) for m in ms),
                "errors": sum(
                    sum(m["errors"].values())
                    + sum(v for k, v in m["statuses"].items() if not k.startswith("2"))
                    for m in ms
                ),
            }
        s["rss_mib"] = max(m["server_rss_mib"] for r in runs for m in r.values())
        s["redis_bytes_per_user"] = (memory.get(name) or {}).get("bytes_per_user")
        out[name] = s
    rps = {k: out.get(k, {}).get("closed", {}).get("rps") for k in TARGETS}
    cpu = {k: out.get(k, {}).get("closed", {}).get("server_cpu_ms_per_request") for k in TARGETS}
    p99 = {k: {m: out.get(k, {}).get(m, {}).get("p99") for m in MODES} for k in TARGETS}
    for name, stats in out.items():
        stats["rps_over_ceiling"] = _ratio(rps[name], rps["ceiling"])
    out["ratios"] = {
        "nextact_over_ceiling": _ratio(rps["nextact"], rps["ceiling"]),
        "default_over_ceiling": _ratio(rps["nextact-default"], rps["ceiling"]),
        "nextact_over_peer": _ratio(rps["nextact"], rps["peer"]),
        "peer_p99_over_nextact_p99_closed": _ratio(p99["peer"]["closed"], p99["nextact"]["closed"]),
        "peer_p99_over_nextact_p99_open": _ratio(p99["peer"]["open"], p99["nextact"]["open"]),
        "nextact_over_torch": _ratio(rps["nextact"], rps["torch"]),
        "two_workers_over_one": _ratio(rps["nextact-2w"], rps["nextact"]),
        "two_workers_cpu_over_one": _ratio(cpu["nextact-2w"], cpu["nextact"]),
        "int8_over_nextact": _ratio(rps["nextact-int8"], rps["nextact"]),
        "int8_cpu_over_nextact": _ratio(cpu["nextact-int8"], cpu["nextact"]),
        "fullwindow_over_nextact": _ratio(rps["fullwindow"], rps["nextact"]),
        "fullwindow_cpu_over_nextact": _ratio(cpu["fullwindow"], cpu["nextact"]),
    }
    return out


def targets(summary: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """Issue 11's targets, each with the figure it is judged on (None when that target was not run)."""
    n = summary.get("nextact", {})
    r = summary["ratios"]
    cpu = n.get("closed", {}).get("server_cpu_ms_per_request")
    p99_open = n.get("open", {}).get("p99")
    peer = summary.get("peer", {})
    # the 2 KB target is the window; the carried state (incremental, the default) is reported beside it
    mem = (memory.get("window") or memory.get("nextact") or {}).get("bytes_per_user")

    def met(ok: bool | None) -> str | None:
        return None if ok is None else ("met" if ok else "not met")

    return {
        "server_cpu_ms_per_request<=0.45": {"value": cpu, "result": met(cpu <= 0.45 if cpu else None)},
        "rps_over_ceiling>=0.35": {
            "value": r["nextact_over_ceiling"],
            "result": met(r["nextact_over_ceiling"] >= 0.35 if r["nextact_over_ceiling"] else None),
        },
        "p99_open_half_own<=10ms": {
            "value": p99_open,
            "result": met(p99_open <= 10 if p99_open is not None else None),
        },
        "redis_window_bytes_per_user<=2048": {"value": mem, "result": met(mem <= 2048 if mem else None)},
        "beats_peer_rps_and_p99": {
            "value": {
                "rps": r["nextact_over_peer"],
                "p99_closed": r["peer_p99_over_nextact_p99_closed"],
                "p99_open": r["peer_p99_over_nextact_p99_open"],
            },
            "result": met(
                (r["nextact_over_peer"] or 0) > 1
                and (r["peer_p99_over_nextact_p99_closed"] or 0) > 1
                and (r["peer_p99_over_nextact_p99_open"] or 0) > 1
                if peer and n
                else None
            ),
        },
        "workers_2_over_1": {"value": r["two_workers_over_one"], "result": None},
    }


def markdown(res: dict[str, Any]) -> str:
    m, s, mach, cfg = res["model"], res["summary"], res["machine"], res["config"]
    rate_note = (
        f"at {cfg['rate']:.0f} req/s for every server"
        if cfg["rate"]
        else "at half of each server's own closed-loop throughput"
    )
    lines = [
        f"# nextact service benchmark ({'quick' if cfg['quick'] else 'full'})",
        "",
        (
            f"- date: {mach['date']}; machine: {mach['cpu']}, {mach['cpu_count']} CPUs "
            f"({mach.get('memory_gib', '?')} GiB), {mach['os']}, Python {mach['python']}"
        ),
        (
            f"- load average at start / end: {mach['load_average_at_start']} / {res['load_average_at_end']} "
            f"(the load generator, engine {cfg.get('client', 'python')}, and Redis share these CPUs with the "
            "servers)"
        ),
        (
            f"- model: {m['cell'].upper()}, vocabulary {m['vocab']:,}, window {m['window']}, "
            f"embedding {m['embedding']}, hidden {m['hidden']}, {m['layers']} layer(s) ({m['version']}), "
            f"served from {cfg['artifact_dir']}"
        ),
        (
            f"- population: {cfg['users']:,} users with full windows of real actions from {cfg['population_data']}; "
            "each request posts one event (random user, real action, unique event_id) and asks k=10"
        ),
        (
            f"- closed loop: {cfg['connections']} connections; open loop: Poisson arrivals {rate_note}, "
            f"latency from each request's due time (the generator's lag and waiting for a free connection count); "
            f"{cfg['warmup']} s warm-up + "
            f"{cfg['duration']} s measured per phase; median of {cfg['rounds']} round(s)"
        ),
        f"- peer: {res.get('peer', {}).get('description', 'not run')}",
        f"- command: `{cfg['command']}`",
        "",
        (
            "| server | server CPU ms/req | req/s at 64 conn | x ceiling | p50 | p90 | p99 ms (closed) "
            "| open loop: offered / answered req/s | p50 | p90 | p99 ms (open) | mean batch (closed / open) "
            "| Redis CPU ms/req | Redis bytes/user | RSS MiB |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TARGETS:
        if name not in s:
            continue
        c, o = s[name].get("closed", {}), s[name].get("open", {})
        answered = f"{fmt(o.get('offered_rps'), ',.0f')} / {fmt(o.get('rps'), ',.0f')}"
        if o.get("rps") is not None and o.get("offered_rps") and o["rps"] < 0.95 * o["offered_rps"]:
            answered += " (overloaded)"
        errors = c.get("errors", 0) + o.get("errors", 0)
        cells = [
            fmt(c.get("server_cpu_ms_per_request"), ".3f"),
            fmt(c.get("rps"), ",.0f"),
            fmt(s[name].get("rps_over_ceiling"), ".3f"),
            *(fmt(c.get(q)) for q in ("p50", "p90", "p99")),
            answered,
            *(fmt(o.get(q)) for q in ("p50", "p90", "p99")),
            f"{fmt(c.get('mean_batch'), '.1f')} / {fmt(o.get('mean_batch'), '.1f')}",
            fmt(c.get("redis_cpu_ms_per_request"), ".3f"),
            fmt(s[name].get("redis_bytes_per_user"), ",.0f"),
            fmt(s[name]["rss_mib"], ".0f"),
        ]
        label = LABELS[name] + (f" ({errors} errors)" if errors else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    r, t = s["ratios"], res["targets"]
    lags = ", ".join(
        f"{name} {fmt(s[name]['open'].get('dispatch_lag_p99_ms'), '.1f')}"
        for name in TARGETS
        if name in s and "open" in s[name]
    )
    lines += [
        "",
        (
            "Open loop: latency counts from each request's Poisson due time; the load generator's own dispatch "
            f"lag (counted against the server) had p99 in ms: {lags}."
        ),
        "",
        "Ratios (requests/s at 64 connections unless said): "
        + "; ".join(
            f"{label} **{fmt(r[key], spec)}**" for label, key, spec in RATIO_LABELS if r.get(key) is not None
        )
        + ".",
        "",
        "| issue 11 target | measured | |",
        "|---|---|---|",
    ]
    for key, v in t.items():
        value = v["value"]
        shown = (
            ", ".join(f"{k} {fmt(x)}" for k, x in value.items()) if isinstance(value, dict) else fmt(value)
        )
        lines.append(f"| {key} | {shown} | {v['result'] or ''} |")
    mem = res.get("redis_memory", {})
    if mem:
        lines += [
            "",
            (
                "Redis bytes per user: MEMORY USAGE (SAMPLES 0) of every key of the population after the run, "
                "summed per user (keys grouped by their {hash tag}):"
            ),
            "",
            "| Redis | server | prefix | users | keys | bytes/user |",
            "|---|---|---|---:|---:|---:|",
        ]
        for where, v in mem.items():
            lines.append(
                f"| {where} | {v['server']} | {v['prefix']} | {v['users']:,} | {v['keys']:,} | "
                f"{fmt(v['bytes_per_user'], ',.0f')} |"
            )
    if res.get("model_bench_markdown"):
        lines += [
            "",
            "## Model micro-benchmark (same model, one process, no HTTP)",
            "",
            res["model_bench_markdown"],
        ]
    return "\n".join(lines) + "\n"
