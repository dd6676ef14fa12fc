"""The experiment's numbers, from its run folder alone: curves, capacities, hit ratios, goals.

Every per-request judgement comes from `bench serve`'s records (an SLO family is met or not per
request, plan.SloFamily.meets), every cache figure from the engines' counters read around the
run (timeline.py), and every ideal from the trace itself (prefix_reuse.py). A mean is always
given with the min and max over the windows (or seeds) it is the mean of.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitwise_bench import sweep, traces
from splitwise_bench.experiment import timeline
from splitwise_bench.experiment.plan import STORE_SYSTEMS, Goals
from splitwise_bench.prefix_reuse import DEFAULT_KV_BYTES_PER_TOKEN, prefix_reuse

LOG_TAIL_LINES = 30
LOG_SUFFIXES = (".log", ".stdout", ".stderr")
# The engines that count every request's prompt once (a decode engine loads what prefill
# computed, so the prefill engine counts only those sent through it).
FRONT = {
    "colocated": ("engine0",),
    "dp": ("engine0", "engine1"),
    "1p1d": ("decode",),
    "auto": ("decode",),
}
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
REFUSED = ("HTTP 429", "HTTP 503")


def read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
        return found if isinstance(found, dict) else {"error": f"{path} is not a JSON object"}
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"no results: {exc}"}


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    known = [float(v) for v in values if v is not None]
    if not known:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(known)), "min": min(known), "max": max(known), "n": len(known)}


def _ok(result: Mapping[str, Any] | None) -> bool:
    return bool(result) and "error" not in result and "per_request" in result


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def load_run(run_dir: Path) -> dict[str, Any]:
    """The manifest and every result of a run folder, each run with its manifest entry."""
    manifest = read_json(run_dir / "manifest.json")
    entries = manifest.get("runs") or {}
    systems: dict[str, Any] = {}
    for name, entry in (manifest.get("systems") or {}).items():
        found: dict[str, Any] = {"entry": entry, "azure": [], "mooncake": [], "admission": []}
        for key, meta in entries.items():
            system, phase, *_ = Path(key).parts
            if system == name:
                result = read_json(run_dir / key)
                run = {"meta": meta, "result": result}
                if phase == "mooncake":
                    run["timeline"] = read_json(run_dir / key.replace(".json", "-timeline.json"))
                found["admission" if phase == "runs" else phase].append(run)
        if "error" in entry:
            logs = [p for p in sorted((run_dir / name).rglob("*.*")) if p.suffix in LOG_SUFFIXES]
            found["log_tail"] = {str(p.relative_to(run_dir)): _tail(p) for p in logs}
        systems[name] = found
    return {"manifest": manifest, "systems": systems}


def _tail(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return []


# -- one run ----------------------------------------------------------------------------------


def evaluate(result: Mapping[str, Any], families: Mapping[str, Any]) -> dict[str, Any]:
    """One run's numbers: per family the requests meeting it, attainment and goodput; and the
    latencies every family is judged on."""
    records = result["per_request"]
    done = [r for r in records if r["error"] is None and r["chunk_ms"]]
    gaps = [np.diff(r["chunk_ms"]) for r in done if len(r["chunk_ms"]) > 1]
    own_p99 = [float(np.percentile(g, 99)) for g in gaps]
    duration = max(result["duration_s"], 1e-9)
    out: dict[str, Any] = {
        "sent": len(records),
        "completed": len(done),
        "ttft_p50_ms": _pct([r["ttft_ms"] for r in done], 50),
        "ttft_p99_ms": _pct([r["ttft_ms"] for r in done], 99),
        "tpot_p50_ms": _pct([r["tpot_ms"] for r in done if r["output_len"] > 1], 50),
        "itl_p99_ms": _pct(np.concatenate(gaps) if gaps else [], 99),
        "request_itl_p99_p50_ms": _pct(own_p99, 50),
        "foreign_fraction": (result.get("host_load") or {}).get("foreign_fraction"),
    }
    for name, family in families.items():
        met = sum(family.meets(r) for r in records)
        out[name] = {
            "met": met,
            "attainment": met / max(len(records), 1),
            "goodput": met / duration,
        }
    return out


# -- the azure phase --------------------------------------------------------------------------

CURVE_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p99_ms", "foreign_fraction")


def azure_summary(system: Mapping[str, Any], goals: Goals) -> dict[str, Any] | None:
    """Per family the attainment and goodput curves over the rates (spread over windows), the
    capacity at the attainment goal and the peak goodput; None when no run completed."""
    runs = [r for r in system["azure"] if _ok(r["result"])]
    if not runs:
        return None
    judged = [
        (r["meta"]["rate"], r["meta"]["start_s"], evaluate(r["result"], goals.families))
        for r in runs
    ]
    rates = sorted({rate for rate, _, _ in judged})
    curve = []
    for rate in rates:
        at = [e for r, _, e in judged if r == rate]
        point: dict[str, Any] = {"rate": rate, "windows": len(at)}
        point.update({k: spread([e[k] for e in at]) for k in CURVE_KEYS})
        for family in goals.families:
            point[family] = {
                k: spread([e[family][k] for e in at]) for k in ("attainment", "goodput")
            }
        curve.append(point)
    out: dict[str, Any] = {"curve": curve, "families": {}}
    for family in goals.families:
        per_window = {}
        for start in sorted({s for _, s, _ in judged}):
            points = sorted((r, e[family]["attainment"]) for r, s, e in judged if s == start)
            per_window[f"{start:g}"] = sweep.sustained_rate(points, goals.attainment_goal)
        values = [
            0.0 if f["interpolated"] is None else f["interpolated"] for f in per_window.values()
        ]
        peak = max(curve, key=lambda p: p[family]["goodput"]["mean"] or 0.0)
        out["families"][family] = {
            "capacity": {
                **spread(values),
                "bounds": sorted({f["bound"] for f in per_window.values()}),
                "per_window": per_window,
            },
            "peak_goodput": {**peak[family]["goodput"], "rate": peak["rate"]},
        }
    return out


def capacity_for_admission(run_dir: Path, system: str, goals: Goals) -> dict[str, Any]:
    """The rate the admission loads multiply: the system's capacity under the TTFT-bound SLO
    (mean over windows); the lowest rate when even that missed, said so."""
    run = load_run(run_dir)
    found = azure_summary(run["systems"].get(system, {"azure": []}), goals)
    if found is None:
        return {"req_per_s": None, "how": f"{system} completed no azure run"}
    capacity = found["families"]["ttft_bound"]["capacity"]
    if capacity["bounds"] == ["at_least"]:
        how = "every rate met the attainment goal: the highest rate is used (capacity is more)"
        return {"req_per_s": capacity["mean"], "how": how}
    if capacity["mean"]:
        how = "the mean over windows of the rate where attainment crosses the goal"
        return {"req_per_s": capacity["mean"], "how": how}
    lowest = found["curve"][0]["rate"]
    return {"req_per_s": lowest, "how": "below the lowest rate: the lowest rate is used"}


# -- the mooncake phase -----------------------------------------------------------------------


def _by_source(grown: Mapping[str, Mapping[str, float]], components: Sequence[str] | None = None):
    """Prompt tokens by source, saved tokens, and total, summed over `components` (every
    engine when None)."""
    names = [c for c in grown if c != "proxy" and (components is None or c in components)]
    sums = {
        s: sum(grown[c].get(f"vllm:prompt_tokens_by_source{{{s}}}", 0.0) for c in names)
        for s in SOURCES
    }
    for key in ("saved_tokens", "save_failures", "save_dropped"):
        sums[key] = sum(grown[c].get(f"splitwise:{key}", 0.0) for c in names)
    sums["total"] = sum(sums[s] for s in SOURCES)
    return sums


def ideal_over_run(result: Mapping[str, Any], capacity_tokens: int | None) -> list[list[float]]:
    """[prompt tokens sent so far, ideal reuse ratio so far] after each request of the replay."""
    s, trace = result["settings"], result["trace"]
    settings = traces.ReplaySettings(
        s["trace"],
        s["length_scale"],
        s["time_scale"],
        s["start_s"],
        s["duration_s"],
        s["max_requests"],
        s["seed"],
        s.get("sessions"),
    )
    scaled = traces.scale(
        traces.select(settings),
        settings.length_scale,
        1.0,
        trace["max_model_len"],
        1,
        trace["block_tokens"],
    )
    sent = [r.blocks for r in scaled]
    points, tokens = [], 0
    for k in range(1, len(sent) + 1):
        tokens += sum(n for _, n in sent[k - 1])
        points.append([tokens, prefix_reuse(sent[:k], capacity_tokens).as_dict()["token_ratio"]])
    return points


def mooncake_run(name: str, run: Mapping[str, Any], store_bytes: int, cache_bytes: int):
    """One Mooncake replay: TTFT, where its prompt tokens came from, the store's hit ratio and
    the trace's ideal at the store's and the engine cache's capacity, and both over the run."""
    result, samples = run["result"], run["timeline"].get("samples") or []
    done = [r for r in result["per_request"] if r["error"] is None and r["chunk_ms"]]
    sent = float(sum(r["prompt_len"] for r in done))
    sums = _by_source(timeline.growth(samples))
    lru = {
        c.get("capacity_bytes"): c["token_ratio"] for c in result["trace"]["prefix_reuse"]["lru"]
    }
    store = name in STORE_SYSTEMS
    out = {
        "seed": run["meta"]["seed"],
        "completed": len(done),
        "ttft_p50_ms": result["ttft_ms"]["p50"],
        "ttft_p99_ms": result["ttft_ms"]["p99"],
        "prompt_tokens_sent": sent,
        "tokens": sums,
        "compute_avoided": 1 - sums["local_compute"] / sent if sent else None,
        "store_hit_ratio": 1 - sums["saved_tokens"] / sent if store and sent else None,
        "ideal": result["trace"]["prefix_reuse"]["replay"]["token_ratio"],
        "ideal_at_store": lru.get(store_bytes),
        "ideal_at_engine_cache": lru.get(cache_bytes),
        "foreign_fraction": (result.get("host_load") or {}).get("foreign_fraction"),
    }
    capacity = store_bytes if store else cache_bytes
    out["over_run"] = {
        "measured": _measured_over_run(name, samples, store),
        "ideal": ideal_over_run(result, capacity // DEFAULT_KV_BYTES_PER_TOKEN),
    }
    return out


def _measured_over_run(name: str, samples: Sequence[Mapping[str, Any]], store: bool):
    """[prompt tokens counted so far, ratio so far] at every sample: the store's hit ratio for
    a system with a store, the share of prompt tokens not computed for one without."""
    points = []
    for k in range(1, len(samples)):
        grown = timeline.growth(samples, k)
        front = _by_source(grown, FRONT.get(name))["total"]
        every = _by_source(grown)
        if front > 0:
            taken = every["saved_tokens"] if store else every["local_compute"]
            points.append([samples[k]["t"], front, 1 - taken / front])
    return points


def mooncake_summary(system: Mapping[str, Any], name: str, goals: Goals) -> dict[str, Any] | None:
    runs = [r for r in system["mooncake"] if _ok(r["result"])]
    if not runs:
        return None
    plan = goals.plan
    found = [
        mooncake_run(name, r, plan.store_capacity_bytes(), plan.engine_cache_bytes()) for r in runs
    ]
    keys = (
        "ttft_p50_ms",
        "ttft_p99_ms",
        "compute_avoided",
        "store_hit_ratio",
        "ideal",
        "ideal_at_store",
        "ideal_at_engine_cache",
        "foreign_fraction",
    )
    return {"per_seed": found, **{k: spread([f[k] for f in found]) for k in keys}}


# -- admission --------------------------------------------------------------------------------


def refused(record: Mapping[str, Any]) -> bool:
    if record.get("refused") is not None:
        return bool(record["refused"])
    return str(record.get("error") or "").startswith(REFUSED)


def admission_summary(runs: Sequence[Mapping[str, Any]], slo_ttft_ms: float) -> list[dict]:
    """Per load: what was offered, admitted, refused and failed, the admitted requests' TTFT
    p99 against the SLO, how fast refusals came back (when the client recorded it), and that
    every request was answered one way or the other."""
    points = []
    for run in sorted(runs, key=lambda r: r["meta"]["load"]):
        result = run["result"]
        if not _ok(result):
            points.append({"load": run["meta"]["load"], "error": result.get("error", "no run")})
            continue
        records = result["per_request"]
        no = [r for r in records if refused(r)]
        done = [r for r in records if r["error"] is None and r["chunk_ms"]]
        waits = [r.get("refused_ms", r.get("e2e_ms")) for r in no]
        ttft_p99 = _pct([r["ttft_ms"] for r in done], 99)
        points.append(
            {
                "load": run["meta"]["load"],
                "rate": run["meta"]["rate"],
                "sent": len(records),
                "admitted": len(done),
                "refused": len(no),
                "failed": len(records) - len(done) - len(no),
                "timed_out": sum("Timeout" in str(r["error"]) for r in records),
                "admitted_ttft_p50_ms": _pct([r["ttft_ms"] for r in done], 50),
                "admitted_ttft_p99_ms": ttft_p99,
                "admitted_ttft_p99_vs_slo": None if ttft_p99 is None else ttft_p99 / slo_ttft_ms,
                "refusal_ms": spread([w for w in waits if w is not None]),
                "refusal_errors": sorted({str(r["error"])[:120] for r in no})[:3],
                "foreign_fraction": (result.get("host_load") or {}).get("foreign_fraction"),
            }
        )
    return points
