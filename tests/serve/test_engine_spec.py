"""An engine's command and environment as the launcher builds them: a GPU engine's GPUs in
CUDA_VISIBLE_DEVICES, tensor parallelism over them, and the GPU defaults under the user's own
vLLM flags (nothing is started); a CPU engine's whole process tree on its own cores (a stand-in
vLLM is started)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_local.models.hub import Model
from splitwise_local.serve.console import Console
from splitwise_local.serve.engine import GPU_DEFAULT_ARGS, EngineSpec, cpu_set
from splitwise_local.serve.placement import Placement
from splitwise_local.serve.plan import StorePlan, plan_engines
from splitwise_local.serve.resolve import EngineArgs, Resolved
from splitwise_local.serve.settings import LaunchSettings
from splitwise_local.serve.system import EngineMember, engine_member

CPU_ONLY = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")


def gpu_engine(tmp_path: Path, gpus: str, extra: list[str] | None = None) -> EngineMember:
    """The prefill engine of a CUDA launch on `gpus`, as the launcher builds it."""
    settings = LaunchSettings(prefill_port=8100, disagg="always")
    resolved = Resolved("cuda", SplitwiseConfig(), Model(Path("/models/m"), "m"))
    args = EngineArgs(("--served-model-name", "m", *(extra or [])), "m")
    where = {"prefill": [Placement(gpus=gpus)], "decode": [Placement(gpus="7")]}
    store = StorePlan("splitwise", 10080, 10081, "shm://s")
    plan = plan_engines(settings, resolved, args, where, store, None)[0]
    console = Console(out=io.StringIO(), err=io.StringIO())
    return engine_member(plan, tmp_path, console)


def flag(command: list[str], name: str) -> str | None:
    """The value after `name` in `command`; None where it is absent (asserted once at most)."""
    assert command.count(name) <= 1, f"{name} given twice: {command}"
    return command[command.index(name) + 1] if name in command else None


def test_a_gpu_engine_sees_only_its_own_gpus_and_no_cpu_settings(tmp_path: Path):
    engine = gpu_engine(tmp_path, "2,3")
    assert engine.child.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    for name in CPU_ONLY:
        assert engine.child.env.get(name) == os.environ.get(name)


def test_an_engine_with_several_gpus_runs_tensor_parallel_over_them(tmp_path: Path):
    assert flag(gpu_engine(tmp_path, "2,3").child.command, "--tensor-parallel-size") == "2"
    assert flag(gpu_engine(tmp_path, "0,1,2,3").child.command, "--tensor-parallel-size") == "4"
    assert flag(gpu_engine(tmp_path, "1").child.command, "--tensor-parallel-size") is None


def test_the_gpu_defaults_reach_the_engine_under_the_users_own_flags(tmp_path: Path):
    command = gpu_engine(tmp_path, "0").child.command
    assert "--enforce-eager" in command and "--trust-remote-code" in command
    assert flag(command, "--gpu-memory-utilization") == "0.9"
    assert flag(command, "--max-model-len") == "8192"
    assert "--dtype" not in command  # the CPU's dtype choice stays off the GPU
    mine = gpu_engine(tmp_path, "0", ["--max-model-len", "4096", "--gpu-memory-utilization=0.5"])
    assert flag(mine.child.command, "--max-model-len") == "4096"
    assert "--gpu-memory-utilization" not in mine.child.command
    assert "--gpu-memory-utilization=0.5" in mine.child.command


def test_a_spec_for_cuda_uses_exactly_the_gpu_defaults():
    spec = EngineSpec(model=Path("/models/m"), port=8100, role="plain", device="cuda", gpus="0")
    command = spec.command()
    assert command[-len(GPU_DEFAULT_ARGS) :] == list(GPU_DEFAULT_ARGS)
    assert spec.environment({})["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in EngineSpec(
        model=Path("/models/m"), port=8100, role="plain", device="cuda"
    ).environment({})


def test_an_engine_keeps_its_metrics_to_itself():
    """An inherited Prometheus multiprocess directory (LMCache sets /tmp/lmcache_prometheus in
    any process that builds its engine, a test run's included) would sum other engines' counters,
    and earlier runs', into this engine's /metrics: the engine does not get it."""
    spec = EngineSpec(model=Path("/models/m"), port=8100, role="decode", device="cpu")
    shared = {"PROMETHEUS_MULTIPROC_DIR": "/tmp/lmcache_prometheus", "HOME": "/home/u"}
    env = spec.environment(shared)
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    assert env["HOME"] == "/home/u"


# Stands in for vLLM's API server: reports the cores it, a thread of its and a child process
# it starts may run on (vLLM's EngineCore is such a child, its worker a grandchild).
REPORT_CORES = """
import json, multiprocessing, os, threading

def cores(queue):
    queue.put(sorted(os.sched_getaffinity(0)))

if __name__ == "__main__":
    queue = multiprocessing.get_context("spawn").Queue()
    thread = threading.Thread(target=cores, args=(queue,))
    thread.start()
    thread.join()
    child = multiprocessing.get_context("spawn").Process(target=cores, args=(queue,))
    child.start()
    child.join()
    print(json.dumps([sorted(os.sched_getaffinity(0)), queue.get(), queue.get()]))
"""


def test_a_cpu_engine_runs_entirely_on_its_own_cores(tmp_path: Path):
    """vLLM binds only its worker's OpenMP threads to VLLM_CPU_OMP_THREADS_BIND; its API server
    and EngineCore (whose scheduler drives every decode step) must not drift onto the other
    engine's cores, where a prefill forward pass starves them."""
    machine = sorted(os.sched_getaffinity(0))
    if len(machine) < 2:
        pytest.skip("one core: nothing to confine an engine to")
    server = tmp_path / "vllm" / "entrypoints" / "openai" / "api_server.py"
    server.parent.mkdir(parents=True)
    for package in (server.parent, server.parent.parent, server.parent.parent.parent):
        (package / "__init__.py").touch()
    server.write_text(REPORT_CORES)
    last = str(machine[-1])
    spec = EngineSpec(model=Path("/models/m"), port=8100, role="decode", cpu_cores=last)
    env = spec.environment() | {"PYTHONPATH": str(tmp_path)}
    ran = subprocess.run(spec.command(), env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == [[machine[-1]]] * 3


def test_a_gpu_engine_is_not_confined_to_cores():
    spec = EngineSpec(model=Path("/models/m"), port=8100, role="plain", device="cuda", gpus="0")
    assert spec.command()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_core_lists_read_as_vllm_writes_them():
    assert cpu_set("1") == {1}
    assert cpu_set("0,2") == {0, 2}
    assert cpu_set("0-3") == {0, 1, 2, 3}
    assert cpu_set("0-1|4-5") == {0, 1, 4, 5}
