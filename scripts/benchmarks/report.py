"""The run's report: the performance targets and whether each is met, the markdown tables, and
the JSON file. Standard library only (`serve_bench.py` prints its tables with `markdown`)."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {
    "decode_vs_transformers": {"min": 1.1, "goal": 1.25},
    "decode_vs_weights_only_pass": {"min": 0.9},
    "sink_latency_flat_2k_to_100k": {"tolerance": 0.05},
    "batch16_vs_batch1_aggregate": {"min": 5.0},
    "batch16_vs_batch1_aggregate_int8_cache": {"min": 5.0},
    "prefill_tok_s_at_c256": {"min": 200.0},
    "keep_nll_max_abs_diff": {"max": 1e-3},
    "keep_decode_vs_float32": {"min": 0.9, "goal": 1.5},
    "int8_weights_decode_vs_float32": {"min": 1.5},
    "int8_weights_ppl_vs_float32": {"max": 1.01},
    "int8_cache_ppl_vs_float32": {"max": 1.01},
    "int8_cache_bytes_vs_float32": {"max": 0.35},
}


def targets(results: dict) -> dict:
    """Each target the sections' `results` measure: its requirement, the value, whether met."""
    r, out = results, {}
    d, b = r.get("decode", {}), r.get("bounds", {})
    if "ratio_vs_baseline" in d:
        v = d["ratio_vs_baseline"]
        out["decode_vs_transformers"] = {
            **TARGETS["decode_vs_transformers"],
            "value": v,
            "met": v >= 1.1,
            "goal_met": v >= 1.25,
        }
    if "jaxsink_tok_s" in d and "weights_only_pass_tok_s" in b:
        v = d["jaxsink_tok_s"] / b["weights_only_pass_tok_s"]
        out["decode_vs_weights_only_pass"] = {
            **TARGETS["decode_vs_weights_only_pass"],
            "value": v,
            "met": v >= 0.9,
        }
    if "jaxsink_tok_s" in d and "bandwidth_bound_tok_s" in b:
        out["decode_vs_bandwidth_bound"] = {
            "value": d["jaxsink_tok_s"] / b["bandwidth_bound_tok_s"],
            "note": "informational: fraction of weight bytes / jnp.sum bandwidth",
        }
    if "flat" in r:
        ratios = [s["vs_2k"] for s in r["flat"]["sink"]]
        dev = max(abs(x - 1) for x in ratios)
        out["sink_latency_flat_2k_to_100k"] = {
            **TARGETS["sink_latency_flat_2k_to_100k"],
            "value": dev,
            "met": dev <= 0.05,
        }
    if "batch" in r:
        for key, by_batch in (
            ("batch16_vs_batch1_aggregate", "by_batch"),
            ("batch16_vs_batch1_aggregate_int8_cache", "by_batch_int8_cache"),
        ):
            by = {o["batch"]: o for o in r["batch"].get(by_batch, [])}
            if 16 in by and 1 in by:
                v = by[16]["aggregate_tok_s"] / by[1]["aggregate_tok_s"]
                out[key] = {**TARGETS[key], "value": v, "met": v >= 5.0}
    w = r.get("weights", {})
    for key, value, goal, met in (
        ("keep_nll_max_abs_diff", w.get("keep_nll_max_abs_diff"), None, lambda v: v <= 1e-3),
        ("keep_decode_vs_float32", w.get("keep_vs_float32"), 1.5, lambda v: v >= 0.9),
        ("int8_weights_decode_vs_float32", w.get("int8_vs_float32"), None, lambda v: v >= 1.5),
        ("int8_weights_ppl_vs_float32", _ratio(w, "int8_ppl", "float32_ppl"), None,
         lambda v: v <= 1.01),
        ("int8_cache_ppl_vs_float32", w.get("int8_cache_ppl_vs_float32"), None,
         lambda v: v <= 1.01),
        ("int8_cache_bytes_vs_float32", w.get("int8_cache_bytes_vs_float32"), None,
         lambda v: v <= 0.35),
    ):  # fmt: skip
        if value is not None:
            out[key] = {**TARGETS[key], "value": value, "met": met(value)}
            if goal is not None:
                out[key]["goal_met"] = value >= goal
    if "prefill" in r:
        by = {o["chunk"]: o for o in r["prefill"]["by_chunk"]}
        if 256 in by:
            v = by[256]["tok_s"]
            out["prefill_tok_s_at_c256"] = {
                **TARGETS["prefill_tok_s_at_c256"],
                "value": v,
                "met": v >= 200.0,
            }
    return out


def _ratio(results: dict, a: str, b: str) -> float | None:
    return results[a] / results[b] if a in results and b in results else None


def markdown(rows, targets: dict) -> str:
    """The results table (rows of section, measurement, value, note), then the targets'."""
    lines = ["| section | measurement | value | note |", "|---|---|---|---|"]
    lines += [f"| {s} | {w} | {v} | {n} |" for s, w, v, n in rows]
    if targets:
        lines += ["", "| target | required | measured | met |", "|---|---|---|---|"]
        for name, t in targets.items():
            if "met" not in t:
                lines.append(f"| {name} | (info) | {t['value']:.3f} | |")
                continue
            req = (
                (f">= {t['min']}" + (f" (goal {t['goal']})" if "goal" in t else ""))
                if "min" in t
                else f"<= {t['max']}"
                if "max" in t
                else f"<= ±{t['tolerance']:.0%}"
            )
            met = "yes" if t["met"] else "**no**"
            if t.get("goal_met"):
                met += " (goal met)"
            lines.append(f"| {name} | {req} | {t['value']:.3f} | {met} |")
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    """The JSON report at `out` (its folder made)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")


def summary(report: dict, rows, out: Path) -> str:
    """What a run prints on stdout: the device, the tables, the warnings and the totals."""
    d = report["device"]
    lines = [
        f"**Device**: {d['jax_device']} ({d['platform']}), {d['cpu_model']}, {d['cores']} cores; "
        f"load average {d['loadavg_start'][0]:.1f} at start, {d['loadavg_end'][0]:.1f} at end\n",
        markdown(rows, report["targets"]),
    ]
    lines += [f"\n> warning: {w}" for w in report["warnings"]]
    lines.append(
        f"\nJSON: {out}; total {report['wall_seconds']:.0f} s, {report['compiles_total']} "
        f"compilations ({report['compile_seconds_total']:.0f} s compiling)"
    )
    return "\n".join(lines)
