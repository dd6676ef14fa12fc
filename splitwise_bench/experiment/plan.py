"""The experiment's goals.yaml as typed settings: SLO families, goals and the plan of each mode.

The file is data fixed before a run (what counts as meeting an SLO, what is judged and how much
is sent); this module only reads and checks it, and says per request whether a family is met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

GOALS_FILE = Path(__file__).with_name("goals.yaml")
SYSTEMS = ("colocated", "dp", "1p1d", "auto")
BASELINES = ("colocated", "dp")
DISAGGREGATED = ("1p1d", "auto")
STORE_SYSTEMS = DISAGGREGATED
# What a goal can measure (verdicts.py reads each out of the run's summary).
MEASURES = (
    "peak_goodput_ratio",
    "store_hit_vs_ideal",
    "mooncake_ttft_p50_ratio",
    "admitted_ttft_p99_vs_slo",
)


class PlanError(ValueError):
    """goals.yaml cannot be used as it is; the message names the key."""


@dataclass(frozen=True)
class SloFamily:
    """Bounds a request must all meet; None bounds are not part of the family."""

    name: str
    title: str
    why: str
    ttft_ms: float
    tpot_ms: float | None = None
    itl_p99_ms: float | None = None

    def meets(self, record: dict[str, Any]) -> bool:
        """Whether one `bench serve` per-request record meets every bound (failed: never)."""
        if record.get("error") is not None or not record.get("chunk_ms"):
            return False
        if record["ttft_ms"] > self.ttft_ms:
            return False
        if self.tpot_ms is not None and record["tpot_ms"] > self.tpot_ms:
            return False
        if self.itl_p99_ms is not None and len(record["chunk_ms"]) > 1:
            return float(np.percentile(np.diff(record["chunk_ms"]), 99)) <= self.itl_p99_ms
        return True

    def describe(self) -> str:
        bounds = [f"TTFT <= {self.ttft_ms:,.0f} ms"]
        if self.tpot_ms is not None:
            bounds.append(f"TPOT <= {self.tpot_ms:,.0f} ms")
        if self.itl_p99_ms is not None:
            bounds.append(f"its ITL p99 <= {self.itl_p99_ms:,.0f} ms")
        return ", ".join(bounds)


@dataclass(frozen=True)
class Goal:
    name: str
    text: str
    measure: str
    direction: str  # ">=" or "<="
    target: float
    family: str | None = None
    load: float | None = None
    systems: tuple[str, ...] = ()  # measured on these (the better one, where it says so)

    def met(self, measured: float | None) -> bool | None:
        if measured is None or not math.isfinite(measured):
            return None
        return measured >= self.target if self.direction == ">=" else measured <= self.target


@dataclass(frozen=True)
class AzurePlan:
    trace: str
    length_scale: float
    requests: int
    windows: tuple[float, ...]  # trace start seconds
    rates: tuple[float, ...]
    cdf_rate: float


@dataclass(frozen=True)
class MooncakePlan:
    trace: str
    systems: tuple[str, ...]
    length_scale: float
    requests: int
    duration_s: float
    sessions: float
    windows: tuple[int, ...]  # seeds: which conversations, and their tokens
    rate: float


@dataclass(frozen=True)
class AdmissionPlan:
    system: str
    loads: tuple[float, ...]  # multiples of the system's measured capacity
    requests: int
    window: float


@dataclass(frozen=True)
class Plan:
    mode: str
    systems: tuple[str, ...]
    store: dict[str, float]  # the store's config keys (chunk_size, max_local_cpu_size)
    engine_kv_cache_gb: float
    quiet_wait_s: float
    settle_s: float
    azure: AzurePlan
    mooncake: MooncakePlan
    admission: AdmissionPlan

    def store_capacity_bytes(self) -> int:
        return int(self.store["max_local_cpu_size"] * 1024**3)

    def engine_cache_bytes(self) -> int:
        return int(self.engine_kv_cache_gb * 1024**3)


@dataclass(frozen=True)
class Goals:
    """Everything goals.yaml fixes: families, goals, the attainment goal and the plan."""

    families: dict[str, SloFamily]
    goals: dict[str, Goal]
    attainment_goal: float
    plan: Plan
    raw: dict[str, Any]  # the file's contents, recorded in the run folder


def _plan(mode: str, raw: dict[str, Any]) -> Plan:
    azure, moon, admit = raw["azure"], raw["mooncake"], raw["admission"]
    return Plan(
        mode=mode,
        systems=tuple(raw["systems"]),
        store=dict(raw["store"]),
        engine_kv_cache_gb=float(raw["engine_kv_cache_gb"]),
        quiet_wait_s=float(raw["quiet_wait_s"]),
        settle_s=float(raw["settle_s"]),
        azure=AzurePlan(
            azure["trace"],
            float(azure["length_scale"]),
            int(azure["requests"]),
            tuple(map(float, azure["windows"])),
            tuple(sorted(map(float, azure["rates"]))),
            float(azure["cdf_rate"]),
        ),
        mooncake=MooncakePlan(
            moon["trace"],
            tuple(moon["systems"]),
            float(moon["length_scale"]),
            int(moon["requests"]),
            float(moon["duration_s"]),
            float(moon["sessions"]),
            tuple(map(int, moon["windows"])),
            float(moon["rate"]),
        ),
        admission=AdmissionPlan(
            admit["system"],
            tuple(map(float, admit["loads"])),
            int(admit["requests"]),
            float(admit["window"]),
        ),
    )


def load(mode: str = "full", path: Path = GOALS_FILE) -> Goals:
    """goals.yaml with the plan of `mode` ("full" or "short"), checked."""
    raw = yaml.safe_load(path.read_text())
    try:
        families = {
            name: SloFamily(name=name, **{k: v for k, v in spec.items()})
            for name, spec in raw["slo_families"].items()
        }
        goals = {
            name: Goal(name=name, **{**spec, "systems": tuple(spec.get("systems", ()))})
            for name, spec in raw["goals"].items()
        }
        plan = _plan(mode, raw["plans"][mode])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{path}: {type(exc).__name__}: {exc}") from None
    for goal in goals.values():
        if unknown := set(goal.systems) - set(SYSTEMS):
            raise PlanError(f"{path}: goal {goal.name} names unknown systems {sorted(unknown)}")
        if goal.family is not None and goal.family not in families:
            raise PlanError(f"{path}: goal {goal.name} names unknown family {goal.family}")
        if goal.measure not in MEASURES:
            raise PlanError(f"{path}: goal {goal.name} measures unknown {goal.measure!r}")
        if goal.direction not in (">=", "<="):
            raise PlanError(f"{path}: goal {goal.name} has direction {goal.direction!r}")
    for name in (*plan.systems, *plan.mooncake.systems, plan.admission.system):
        if name not in SYSTEMS:
            raise PlanError(f"{path}: unknown system {name!r}; expected one of {SYSTEMS}")
    if plan.azure.cdf_rate not in plan.azure.rates:
        raise PlanError(f"{path}: cdf_rate {plan.azure.cdf_rate} is not one of the rates")
    return Goals(families, goals, float(raw["attainment_goal"]), plan, raw)
