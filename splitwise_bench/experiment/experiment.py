"""The Splitwise experiment: every system on the same cores, the same requests, rate by rate.

`bash scripts/splitwise_experiment.sh` runs this unattended. One system at a time, on all the
cores this process may use (two here), each behind the same proxy:

- **colocated**: one plain vLLM engine on every core (`--disagg never`);
- **dp**: data parallel, one plain engine per half of the cores (`--disagg never`, least
  loaded): the baseline Splitwise and DistServe compare against, the same hardware as colocated
  replicas;
- **1p1d**: `python -m splitwise_local --disagg always`: a prefill and a decode engine on half
  the cores each, KV through the store;
- **auto**: the same with `--disagg auto` (short or already-stored prompts go straight to decode).

For each system: start it, place its processes (placement.py: the same way for every
system, stated in the report), then run from a pinned load-generator process

1. the rate sweep (`bench sweep`: the mixed workload at every rate, three seeds per rate);
2. vLLM's own client (`vllm bench serve`, random 1,024 in / 64 out) at one rate, and `bench
   serve` with the same shape right after: the cross-check of the two clients;
3. the multi-turn workload (each turn resends its conversation's history) and the short-prompt
   workload (closed loop: throughput), for conditional disaggregation;

and stop it. With the colocated engine it also measures the placements themselves (where the
load generator and proxy run), which is what explains the colocated ITL of the first report.
Raw results and every log stay in the run folder; the report (experiment_report.py) is written
from that folder at the end, and can be rewritten from it later. `--short` runs the same steps
with tiny settings: the CI test runs it against fake engines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from splitwise_bench import host_load, placement, sweep
from splitwise_bench.placement import Cores, Placement, format_cores
from splitwise_local.serve.console import Console
from splitwise_local.serve.ports import free_port
from splitwise_local.serve.probes import http_ok
from splitwise_local.serve.process import RUN_ENV, Child
from splitwise_local.serve.supervisor import Readiness, StartupError, Supervisor
from splitwise_testing import launch

SYSTEMS = ("colocated", "dp", "1p1d", "auto")
PHASES = ("sweep", "vllm", "crosscheck", "multi-turn", "short")
BASELINES = ("colocated", "dp")
START_TIMEOUT_S = 900.0
# This project's machines run one engine at a time under this flock(1) lock.
ENGINE_LOCK = Path("/tmp/splitwise-engine.lock")
PHASE_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Workload:
    """`bench serve` workload flags of one phase."""

    flags: str  # split on spaces
    num_requests: int
    rate: float | None = None  # None: closed loop at `concurrency`
    concurrency: int = 8
    seed: int = 0

    def args(self) -> list[str]:
        load = ["--rate", str(self.rate)] if self.rate else ["--concurrency", str(self.concurrency)]
        return [
            *self.flags.split(),
            "--num-requests",
            str(self.num_requests),
            "--seed",
            str(self.seed),
            *load,
        ]


@dataclass(frozen=True)
class Settings:
    """Everything the experiment sends, with the full run's defaults."""

    systems: tuple[str, ...] = SYSTEMS
    phases: tuple[str, ...] = PHASES
    # The sweep: mixed workload (short chats while long prompts arrive), rates x seeds.
    sweep_flags: str = (
        "--workload mixed --prompt-len 128 --output-len 64 "
        "--long-prompt-len 1024 --long-output-len 16 --long-fraction 0.25"
    )
    # Rates from light load for every system to overload for every system, as measured here:
    # 1P1D misses the SLOs at 0.5 req/s, colocated at 1 req/s (docs/benchmarks/splitwise-cpu.md).
    sweep_requests: int = 20
    rates: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5)
    seeds: tuple[int, ...] = (0, 1, 2)
    cdf_rate: float = 0.5
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 50.0
    # vLLM's client and ours, same shape (#16's headline run).
    vllm_input_len: int = 1024
    vllm_output_len: int = 64
    vllm_rate: float = 0.5
    vllm_requests: int = 24
    vllm_seed: int = 1
    multi_turn: Workload = Workload(
        "--workload multi-turn --prefix-len 512 --prompt-len 128 --output-len 64 --turns 4",
        num_requests=16,
        rate=0.5,
        seed=7,
    )
    short: Workload = Workload(
        "--workload fixed --prompt-len 64 --output-len 64",
        num_requests=48,
        concurrency=8,
        seed=8,
    )
    # Which phases beyond the sweep run on which system: what the goals compare (#16: auto
    # against always and colocated; the clients' cross-check on one plain and one
    # disaggregated path), so the whole run stays near an hour.
    extras: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("colocated", ("vllm", "crosscheck", "multi-turn", "short")),
        ("dp", ("vllm",)),
        ("1p1d", ("vllm", "crosscheck", "multi-turn")),
        ("auto", ("vllm", "crosscheck", "multi-turn", "short")),
    )
    placement_study: bool = True
    placement_requests: int = 20
    warmup: int = 2
    quiet_wait_s: float = 20.0

    def phases_of(self, system: str) -> tuple[str, ...]:
        extra = dict(self.extras).get(system, PHASES[1:])
        return tuple(p for p in PHASES if p in self.phases and (p == "sweep" or p in extra))

    def planned_minutes(self) -> float:
        """Arrival time of every phase (without drain and startup): what bounds the run."""
        total = 3 * self.placement_requests / self.cdf_rate if self.placement_study else 0.0
        for system in self.systems:
            phases = self.phases_of(system)
            if "sweep" in phases:
                total += len(self.seeds) * sum(self.sweep_requests / r for r in self.rates)
            total += sum(
                self.vllm_requests / self.vllm_rate for p in ("vllm", "crosscheck") if p in phases
            )
            if "multi-turn" in phases:
                total += self.multi_turn.num_requests / (self.multi_turn.rate or 1.0)
        return total / 60


SHORT = Settings(
    sweep_requests=4,
    rates=(20.0, 40.0),
    seeds=(0, 1),
    cdf_rate=20.0,
    sweep_flags="--workload mixed --prompt-len 24 --output-len 6 "
    "--long-prompt-len 120 --long-output-len 3 --long-fraction 0.5",
    vllm_input_len=32,
    vllm_output_len=6,
    vllm_rate=20.0,
    vllm_requests=4,
    multi_turn=Workload(
        "--workload multi-turn --prefix-len 40 --prompt-len 8 --output-len 4 --turns 2",
        num_requests=4,
        rate=20.0,
        seed=7,
    ),
    short=Workload(
        "--workload fixed --prompt-len 16 --output-len 4",
        num_requests=6,
        concurrency=3,
        seed=8,
    ),
    extras=tuple((name, PHASES[1:]) for name in SYSTEMS),
    placement_requests=4,
    warmup=1,
    quiet_wait_s=0.0,
)

# Where the load generator and proxy run (the same for every system); the report measures the
# alternatives on the colocated engine. Chosen: see PLACEMENT_DEFAULT.
PLACEMENTS = {
    "float": Placement("float", None, None),
    "core0": Placement("core0", frozenset({0}), frozenset({0})),
    "core1": Placement("core1", frozenset({1}), frozenset({1})),
    "contained": Placement("contained", None, None, contain_engines=True),
}
PLACEMENT_DEFAULT = "float"


@dataclass
class EngineInfo:
    name: str
    port: int
    cores: Cores

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Running:
    """One started system: its proxy URL, its engines and what to read around a run."""

    name: str
    description: str
    proxy_port: int
    proxy_pid: int
    engines: list[EngineInfo]
    store_url: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def metrics_urls(self) -> list[str]:
        return [f"{e.url}/metrics" for e in self.engines] + [f"{self.url}/metrics"]


class Experiment:
    """Starts, places, measures and stops the systems one at a time; writes the run folder."""

    def __init__(
        self, settings: Settings, run_dir: Path, python: str, model: str | None, placement_name: str
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.python = python
        self.model = model
        self.placement = PLACEMENTS[placement_name]
        self.cores = frozenset(os.sched_getaffinity(0))
        self.console = Console("error")
        self.manifest: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": _jsonable(asdict(settings)),
            "planned_minutes": round(settings.planned_minutes(), 1),
            "cores": sorted(self.cores),
            "placement": {"name": self.placement.name, "describe": self.placement.describe()},
            "placements": {k: p.describe() for k, p in PLACEMENTS.items()},
            "systems": {},
            "engine_lock": host_load.lock_status(ENGINE_LOCK),
        }

    # -- starting systems ---------------------------------------------------------------------

    def _env(self, tag: Path) -> dict[str, str]:
        env = dict(os.environ)
        env[RUN_ENV] = str(tag)
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def _child(self, supervisor: Supervisor, name: str, args: list[str], root: Path) -> Child:
        command = [self.python, "-m", "splitwise_local", *args]
        return Child(name, command, self._env(root), root / f"{name}.log", supervisor.console)

    def _model_args(self) -> list[str]:
        return ["--model", self.model] if self.model else []

    def _halves(self) -> tuple[Cores, Cores]:
        cores = sorted(self.cores)
        half = max(len(cores) // 2, 1)
        return frozenset(cores[:half]), frozenset(cores[half:] or cores)

    @contextlib.contextmanager
    def system(self, name: str) -> Iterator[Running]:
        root = self.run_dir / name
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stops:
            if name in BASELINES:
                running = self._start_baseline(name, root, stops)
            else:
                running = self._launch(name, root, stops)
            self._place(running)
            yield running

    def _start_baseline(self, name: str, root: Path, stops: contextlib.ExitStack) -> Running:
        """Plain engines and a proxy in front of them, as children of a supervisor."""
        supervisor = Supervisor(self.console, run=str(root), stop_grace=30)
        stops.callback(supervisor.stop_all)
        groups = [self.cores] if name == "colocated" else list(self._halves())
        engines = [EngineInfo(f"engine{i}", free_port(), cores) for i, cores in enumerate(groups)]
        members = []
        for e in engines:
            args = ["engine", "--role", "plain", "--port", str(e.port)]
            args += ["--cpu-cores", format_cores(e.cores), *self._model_args()]
            ready = Readiness(lambda u=e.url: http_ok(f"{u}/health", timeout=5), "/health")
            members.append((self._child(supervisor, e.name, args, root), ready))
        supervisor.start_stage(members, START_TIMEOUT_S)
        port = free_port()
        decode = ",".join(e.url for e in engines)
        args = ["proxy", "--decode", decode, "--disagg", "never", "--port", str(port)]
        proxy = self._child(supervisor, "proxy", args, root)
        url = f"http://127.0.0.1:{port}"
        ready = Readiness(lambda: http_ok(f"{url}/v1/models", timeout=5), "/v1/models")
        supervisor.start_stage([(proxy, ready)], 120)
        if name == "colocated":
            what = f"one plain vLLM engine on cores {format_cores(self.cores)}"
        else:
            what = "plain vLLM engines on cores " + " and ".join(
                format_cores(e.cores) for e in engines
            )
        description = f"{what}, behind the proxy (`proxy --disagg never`, least loaded)"
        return Running(name, description, port, proxy.pid or 0, engines)

    def _launch(self, name: str, root: Path, stops: contextlib.ExitStack) -> Running:
        """`python -m splitwise_local --disagg always|auto`, started as the tests start it."""
        prefill_cores, decode_cores = self._halves()
        mode = "always" if name == "1p1d" else "auto"
        flags = ["--log-level", "warning", "--disagg", mode, *self._model_args()]
        try:
            system = launch.launch_system(
                root / "system", extra=flags, timeout=START_TIMEOUT_S,
                env=self._env(root), python=self.python,
            )  # fmt: skip
        except launch.LaunchFailed as exc:  # its output is in root/system.stdout and .stderr
            raise StartupError(str(exc).splitlines()[0]) from None
        stops.callback(launch.sweep, system.launch.run_dir)
        stops.callback(system.launch.stop)
        engines = [
            EngineInfo("prefill", system.ports["prefill engine"], prefill_cores),
            EngineInfo("decode", system.ports["decode engine"], decode_cores),
        ]
        description = (
            f"`python -m splitwise_local --disagg {mode}`: store, prefill engine on cores "
            f"{format_cores(prefill_cores)}, decode engine on cores "
            f"{format_cores(decode_cores)}, the proxy in the launcher"
        )
        return Running(
            name,
            description,
            system.ports["proxy"],
            system.launch.popen.pid,
            engines,
            store_url=f"lm://127.0.0.1:{system.ports['store']}",
        )

    def _place(self, running: Running, where: Placement | None = None) -> dict[str, int]:
        """Applies a placement to a started system's proxy and engines (threads changed)."""
        where = where or self.placement
        changed = {}
        proxy_cores = where.proxy or self.cores
        changed["proxy"] = placement.pin_threads([running.proxy_pid], proxy_cores)
        if where.contain_engines:
            for engine in running.engines:
                pid = host_load.listener_pid(engine.port)
                if pid is not None:
                    pids = placement.family(pid)
                    changed[engine.name] = placement.pin_threads(
                        pids, engine.cores, narrow_only=True
                    )
        return changed

    # -- measuring ----------------------------------------------------------------------------

    def _load_generator(self, args: list[str], log: Path, where: Placement | None = None) -> int:
        """Runs one load-generator command (python -m ARGS) on the placement's cores."""
        where = where or self.placement
        command = [self.python, "-m", *args]
        with log.open("ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            done = subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=where.preexec(),
                timeout=PHASE_TIMEOUT_S,
                check=False,
            )
        return done.returncode

    def _serve_args(self, running: Running, bench: str, out: Path) -> list[str]:
        """`bench serve` or `bench sweep` against the system, reading its counters around."""
        s = self.settings
        args = ["splitwise_local", "bench", bench, "--url", running.url, "--json", str(out)]
        args += (
            f"--label {running.name} --slo-ttft-ms {s.slo_ttft_ms} "
            f"--slo-tpot-ms {s.slo_tpot_ms} --no-progress --ours-pid {os.getpid()}"
        ).split()
        for url in running.metrics_urls():
            args += ["--metrics-url", url]
        if running.store_url:
            args += ["--store-url", running.store_url]
        return [*args, *self._model_args()]

    def measure(self, running: Running) -> dict[str, int]:
        """Every phase against one system; returns each phase's exit status."""
        s = self.settings
        root = self.run_dir / running.name
        codes: dict[str, int] = {}

        def phase(name: str, args: list[str]) -> None:
            if name not in s.phases_of(running.name):
                return
            started = time.monotonic()
            print(f"[experiment] {running.name}: {name}", flush=True)
            codes[name] = self._load_generator(args, root / "load-generator.log")
            took = time.monotonic() - started
            print(
                f"[experiment] {running.name}: {name} done in {took:.0f} s (exit {codes[name]})",
                flush=True,
            )

        rates, seeds = ",".join(map(str, s.rates)), ",".join(map(str, s.seeds))
        swept = (
            f"{s.sweep_flags} --num-requests {s.sweep_requests} --warmup {s.warmup} "
            f"--rates {rates} --seeds {seeds} --cdf-rate {s.cdf_rate} "
            f"--quiet-wait {s.quiet_wait_s}"
        )
        phase("sweep", [*self._serve_args(running, "sweep", root / "sweep.json"), *swept.split()])
        vllm = (
            f"--ours-pid {os.getpid()} --base-url {running.url} "
            f"--model {self.served_model(running)} --dataset-name random "
            f"--random-input-len {s.vllm_input_len} --random-output-len {s.vllm_output_len} "
            f"--request-rate {s.vllm_rate} --num-prompts {s.vllm_requests} "
            f"--seed {s.vllm_seed} --temperature 0 --num-warmups 1 --disable-tqdm"
        )
        phase(
            "vllm",
            [
                "splitwise_bench.vllm_client",
                "--summary-json",
                str(root / "vllm.json"),
                "--tokenizer",
                self.tokenizer(),
                *vllm.split(),
            ],
        )
        same = Workload(
            f"--workload fixed --prompt-len {s.vllm_input_len} --output-len {s.vllm_output_len}",
            s.vllm_requests,
            rate=s.vllm_rate,
            seed=s.vllm_seed,
        )
        for name, workload in (
            ("crosscheck", same),
            ("multi-turn", s.multi_turn),
            ("short", s.short),
        ):
            out = root / f"{name}.json"
            phase(
                name, [*self._serve_args(running, "serve", out), *workload.args(), "--warmup", "1"]
            )
        return codes

    def placement_study(self, running: Running) -> dict[str, int]:
        """The mixed workload at one rate on the colocated engine, once per placement."""
        s = self.settings
        study_dir = self.run_dir / "placement"
        study_dir.mkdir(parents=True, exist_ok=True)
        codes = {}
        flags = (
            f"{s.sweep_flags} --num-requests {s.placement_requests} --rate {s.cdf_rate} "
            "--seed 424242 --warmup 1"
        )
        for name in ("float", "core0", "core1"):
            where = PLACEMENTS[name]
            self._place(running, where)
            print(f"[experiment] placement study: {name}", flush=True)
            args = [*self._serve_args(running, "serve", study_dir / f"{name}.json"), *flags.split()]
            codes[name] = self._load_generator(args, study_dir / "load-generator.log", where)
        self._place(running)  # back to the experiment's own placement
        return codes

    def tokenizer(self) -> str:
        from splitwise_local.models.hub import resolve_model

        return str(resolve_model(self.model).folder)

    def served_model(self, running: Running) -> str:
        return httpx.get(f"{running.url}/v1/models", timeout=10).json()["data"][0]["id"]

    # -- the whole run ------------------------------------------------------------------------

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._save()
        status = 0
        for name in self.settings.systems:
            entry: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds")}
            self.manifest["systems"][name] = entry
            began = time.monotonic()
            print(f"[experiment] starting {name}", flush=True)
            try:
                with self.system(name) as running:
                    entry["description"] = running.description
                    entry["url"] = running.url
                    entry["ready_after_s"] = round(time.monotonic() - began, 1)
                    if name == "colocated" and self.settings.placement_study:
                        entry["placement_study"] = self.placement_study(running)
                    entry["exit_codes"] = self.measure(running)
                    status |= any(entry["exit_codes"].values())
            except (StartupError, OSError, subprocess.SubprocessError) as exc:
                entry["error"] = str(exc)
                print(f"[experiment] {name}: {exc}", file=sys.stderr, flush=True)
                status = 1
            entry["minutes"] = round((time.monotonic() - began) / 60, 1)
            self._save()
        self.manifest["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        self._save()
        return status

    def _save(self) -> None:
        path = self.run_dir / "manifest.json"
        path.write_text(json.dumps(self.manifest, indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/benchmarks/splitwise-cpu"),
        help="report path without extension (md, json and plots beside it)",
    )
    parser.add_argument("--run-dir", type=Path, help="raw results and logs (runs/experiment-*)")
    parser.add_argument("--short", action="store_true", help="tiny settings (CI, fake engines)")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--placement", choices=sorted(PLACEMENTS), default=PLACEMENT_DEFAULT)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every child")
    parser.add_argument("--quiet-wait", type=float, help="seconds to wait for a quiet machine")
    parser.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--rates", type=sweep.rate_list, help="the sweep's rates, e.g. 0.5,1,2")
    parser.add_argument("--seeds", type=sweep.seed_list, help="the sweep's seeds, e.g. 0,1,2")
    parser.add_argument("--sweep-requests", type=int, help="requests per sweep run")
    parser.add_argument("--no-placement-study", action="store_true")
    args = parser.parse_args(argv)
    settings = SHORT if args.short else Settings()
    for flag, known in (("systems", SYSTEMS), ("phases", PHASES)):
        if getattr(args, flag):
            chosen = tuple(x for x in getattr(args, flag).split(",") if x)
            if unknown := sorted(set(chosen) - set(known)):
                parser.error(f"unknown {flag} {unknown}; choose from {known}")
            settings = replace(settings, **{flag: chosen})
    if args.rates:
        cdf = args.rates[len(args.rates) // 2]
        settings = replace(settings, rates=tuple(args.rates), cdf_rate=cdf)
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.sweep_requests:
        settings = replace(settings, sweep_requests=args.sweep_requests)
    if args.quiet_wait is not None:
        settings = replace(settings, quiet_wait_s=args.quiet_wait)
    if args.no_placement_study or "colocated" not in settings.systems:
        settings = replace(settings, placement_study=False)
    run_dir = args.run_dir or Path("runs") / f"experiment-{datetime.now():%Y%m%d-%H%M%S}"
    print(
        f"[experiment] run folder {run_dir}; about {settings.planned_minutes():.0f} min of "
        f"arrivals plus startups and drains",
        flush=True,
    )
    experiment = Experiment(settings, run_dir, args.python, args.model, args.placement)
    status = experiment.run()
    from splitwise_bench.experiment import experiment_report

    for path in experiment_report.write_report(run_dir, args.out):
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
