"""The experiment's run: every system, one after the other, through the same phases.

For each system of the plan: start it (systems.py), then from a separate load-generator process
(`bench serve`, the same for every system)

1. **azure**: Splitwise's own workload, the Azure conversation trace, at every rate of the plan
   in every window (each window at each rate draws its own prompts, the same for every system);
2. **mooncake** (the systems the plan names): Kimi's conversation trace, a thinned half hour per
   seed, while its engines' counters are read every few seconds (timeline.py);

and stop it. Then **admission**: the plan's system again with the proxy's admission control on,
at multiples of the capacity it showed in the azure phase. Each run's JSON (`bench serve`'s,
with every request's record) and every log stay in the run folder; `manifest.json` says what
ran, when, with which exit status, and how quiet the machine was before each run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from splitwise_bench import host_load, sweep, traces
from splitwise_bench.experiment import analysis, timeline
from splitwise_bench.experiment.plan import Goals
from splitwise_bench.experiment.systems import Launcher, Running
from splitwise_local.serve.supervisor import StartupError

# This project's machines run one engine at a time under this flock(1) lock.
ENGINE_LOCK = Path("/tmp/splitwise-engine.lock")
RUN_TIMEOUT_S = 3600.0
REQUEST_TIMEOUT_S = 300.0
ADMISSION_SEED = 900_000


def time_scale(settings: traces.ReplaySettings, rate: float) -> float:
    """The time scale that replays the requests `settings` selects at `rate` per second."""
    chosen = traces.select(settings)
    span = chosen[-1].arrival_s - chosen[0].arrival_s if len(chosen) > 1 else 0.0
    if span <= 0:
        raise ValueError(f"{settings.trace}: the window from {settings.start_s} s has no span")
    return (len(chosen) - 1) / span / rate


@dataclass(frozen=True)
class Replay:
    """One `bench serve --trace` run: what it replays, at which rate, into which file."""

    label: str
    out: Path
    settings: traces.ReplaySettings
    rate: float
    warmup: int = 0
    ideal_capacities: tuple[int, ...] = ()  # bytes of KV: the ideal reuse under an LRU of each
    load: float | None = None  # admission: the multiple of the measured capacity


class Experiment:
    """Runs the plan against every system and fills the run folder."""

    def __init__(
        self, goals: Goals, run_dir: Path, python: str, model: str | None, systems: tuple[str, ...]
    ) -> None:
        self.goals = goals
        self.plan = goals.plan
        self.run_dir = run_dir
        self.python = python
        self.model = model
        self.systems = systems
        self.launcher = Launcher(
            python,
            model,
            tuple(sorted(os.sched_getaffinity(0))),
            int(self.plan.engine_kv_cache_gb),
            run_dir / "store.yaml",
            goals.families["itl_bound"].itl_p99_ms or 0.0,
        )
        self.manifest: dict[str, Any] = {
            "started": _now(),
            "mode": self.plan.mode,
            "goals_file": goals.raw,
            "systems_run": list(systems),
            "cores": list(self.launcher.cores),
            "engine_lock": host_load.lock_status(ENGINE_LOCK),
            "systems": {},
            "runs": {},
        }

    def run(self) -> int:
        """Every system, then admission; 0 when every run completed its requests."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.launcher.store_config.write_text(yaml.safe_dump(dict(self.plan.store)))
        self._save()
        status = 0
        for name in self.systems:
            with self._entry(name) as entry, self.launcher.system(name, self.run_dir / name) as up:
                entry["description"] = up.description
                status |= self.azure(up)
                if name in self.plan.mooncake.systems:
                    status |= self.mooncake(up)
            status |= "error" in entry
        if self.plan.admission.system in self.systems:
            status |= self.admission()
        self.manifest["finished"] = _now()
        self._save()
        return status

    @contextlib.contextmanager
    def _entry(self, name: str) -> Iterator[dict[str, Any]]:
        """The system's manifest entry: when it ran, how long, and why it did not, if so."""
        entry: dict[str, Any] = {"started": _now()}
        self.manifest["systems"][name] = entry
        began = time.monotonic()
        print(f"[experiment] starting {name}", flush=True)
        try:
            yield entry
        except (StartupError, OSError, subprocess.SubprocessError) as exc:
            entry["error"] = str(exc)
            print(f"[experiment] {name}: {exc}", file=sys.stderr, flush=True)
        entry["minutes"] = round((time.monotonic() - began) / 60, 2)
        self._save()

    # -- phases -------------------------------------------------------------------------------

    def azure(self, running: Running) -> int:
        azure, status = self.plan.azure, 0
        for index, start in enumerate(azure.windows):
            for rate in azure.rates:
                settings = traces.ReplaySettings(
                    azure.trace,
                    azure.length_scale,
                    1.0,
                    start,
                    None,
                    azure.requests,
                    sweep.workload_seed(index, rate),
                )
                label = f"w{start:g}-r{rate:g}"
                out = self.run_dir / running.name / "azure" / f"{label}.json"
                first = index == 0 and rate == azure.rates[0]
                status |= self.replay(
                    running, Replay(label, out, settings, rate, 2 if first else 0)
                )
        return status

    def mooncake(self, running: Running) -> int:
        moon, status = self.plan.mooncake, 0
        capacities = (self.plan.store_capacity_bytes(), self.plan.engine_cache_bytes())
        for seed in moon.windows:
            settings = traces.ReplaySettings(
                moon.trace,
                moon.length_scale,
                1.0,
                0.0,
                moon.duration_s,
                moon.requests,
                seed,
                moon.sessions,
            )
            folder = self.run_dir / running.name / "mooncake"
            replay = Replay(
                f"s{seed}", folder / f"s{seed}.json", settings, moon.rate, 0, capacities
            )
            with timeline.Recorder(running.metrics(), folder / f"s{seed}-timeline.json"):
                status |= self.replay(running, replay)
                time.sleep(self.plan.settle_s)  # the engines' counters catch up
        return status

    def admission(self) -> int:
        """The admission system at each load of the plan, as multiples of the capacity its
        azure phase showed under the TTFT-bound SLO."""
        admit = self.plan.admission
        measured = analysis.capacity_for_admission(self.run_dir, admit.system, self.goals)
        entry = {"capacity": measured}
        if measured["req_per_s"] is None:
            self.manifest["systems"]["admission"] = {**entry, "error": "no capacity measured"}
            self._save()
            return 1
        with self._entry("admission") as found:
            found.update(entry)
            with self.launcher.system(admit.system, self.run_dir / "admission", True) as up:
                found["description"] = up.description
                for i, load in enumerate(admit.loads):
                    rate = load * measured["req_per_s"]
                    settings = traces.ReplaySettings(
                        self.plan.azure.trace,
                        self.plan.azure.length_scale,
                        1.0,
                        admit.window,
                        None,
                        admit.requests,
                        ADMISSION_SEED + round(load * 1000),
                    )
                    out = self.run_dir / "admission" / "runs" / f"x{load:g}.json"
                    warmup = 1 if i == 0 else 0
                    self.replay(up, Replay(f"x{load:g}", out, settings, rate, warmup, (), load))
        return "error" in found

    # -- one run ------------------------------------------------------------------------------

    def replay(self, running: Running, replay: Replay) -> int:
        """One `bench serve` run from its own process, after waiting for a quiet machine."""
        scaled = time_scale(replay.settings, replay.rate)
        wait = self.plan.quiet_wait_s
        quiet = host_load.wait_for_quiet([os.getpid()], wait) if wait else None
        args = self._serve_args(running, replay, scaled)
        replay.out.parent.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / running.name / "load-generator.log"
        started = time.monotonic()
        print(f"[experiment] {running.name}: {replay.out.parent.name} {replay.label}", flush=True)
        with log.open("ab") as sink:
            sink.write(f"$ {' '.join(args)}\n".encode())
            sink.flush()
            code = subprocess.run(
                args,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=RUN_TIMEOUT_S,
                check=False,
            ).returncode
        key = str(replay.out.relative_to(self.run_dir))
        self.manifest["runs"][key] = {
            "exit": code,
            "rate": replay.rate,
            "start_s": replay.settings.start_s,
            "seed": replay.settings.seed,
            "load": replay.load,
            "time_scale": scaled,
            "quiet_wait": quiet,
            "seconds": round(time.monotonic() - started, 1),
        }
        self._save()
        return 0 if code == 0 or "admission" in key else 1

    def _serve_args(self, running: Running, replay: Replay, scaled: float) -> list[str]:
        s, family = replay.settings, self.goals.families["ttft_bound"]
        args = [self.python, "-m", "splitwise_local", "bench", "serve", "--url", running.url]
        args += ["--json", str(replay.out), "--label", f"{running.name} {replay.label}"]
        args += ["--trace", s.trace, "--length-scale", f"{s.length_scale:g}"]
        args += ["--time-scale", f"{scaled:.6g}", "--trace-start", f"{s.start_s:g}"]
        args += ["--requests", str(s.max_requests), "--seed", str(s.seed)]
        if s.sessions is not None:
            args += ["--trace-sessions", f"{s.sessions:g}", "--trace-duration", f"{s.duration_s:g}"]
        for capacity in replay.ideal_capacities:
            args += ["--ideal-capacity-bytes", str(capacity)]
        args += ["--warmup", str(replay.warmup), "--timeout", f"{REQUEST_TIMEOUT_S:g}"]
        args += ["--slo-ttft-ms", f"{family.ttft_ms:g}", "--slo-tpot-ms", f"{family.tpot_ms:g}"]
        args += ["--no-progress", "--ours-pid", str(os.getpid())]
        for url in running.metrics().values():
            args += ["--metrics-url", url]
        if running.store_url:
            args += ["--store-url", running.store_url]
        return [*args, *self.launcher.model_args()]

    def _save(self) -> None:
        (self.run_dir / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
