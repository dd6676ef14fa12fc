"""The launcher's pure decisions: ports, store address, flags, log levels, causes (cores and GPUs:
test_placement.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from splitwise_local.serve.console import LEVELS, line_level
from splitwise_local.serve.engine import flag_value
from splitwise_local.serve.plan import engine_name, log_name, store_url
from splitwise_local.serve.ports import PortClaim, port_problems
from splitwise_local.serve.process import first_exception
from splitwise_local.serve.settings import LaunchError


def test_engines_are_named_by_role_and_number_only_when_a_role_has_several():
    assert (engine_name("decode", 0, 1), log_name("decode", 0, 1)) == (
        "decode engine",
        "decode.log",
    )
    assert (engine_name("decode", 1, 2), log_name("decode", 1, 2)) == (
        "decode engine 1",
        "decode-1.log",
    )


def test_store_port_comes_from_the_config_unless_given():
    port, url = store_url("lm://127.0.0.1:10099", None)
    assert (port, url) == (10099, "shm://splitwise-10099")
    assert store_url("lm://127.0.0.1:10099", 12000)[0] == 12000
    assert store_url("shm://mine", None) == (10080, "shm://mine")
    with pytest.raises(LaunchError, match="mooncakestore"):
        store_url("mooncakestore://host:1", None)


def test_flag_value_reads_both_spellings():
    assert flag_value(["--a", "1", "--served-model-name", "m"], "--served-model-name") == "m"
    assert flag_value(["--served-model-name=m2"], "--served-model-name") == "m2"
    assert flag_value(["--a"], "--served-model-name") is None


def test_busy_and_duplicate_ports_are_all_named():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        wanted = [
            PortClaim("proxy", "127.0.0.1", port, "--port"),
            PortClaim("prefill engine", "127.0.0.1", 1, "--prefill-port"),
            PortClaim("decode engine", "127.0.0.1", 1, "--decode-port"),
        ]
        message = "; ".join(port_problems(wanted))
    assert f"port {port} for the proxy is in use (choose another: --port)" in message
    assert "decode engine and prefill engine both use port 1" in message


def test_log_levels_of_vllm_uvicorn_and_traceback_lines():
    info, warning, error = LEVELS["info"], LEVELS["warning"], LEVELS["error"]
    vllm_line = "(APIServer pid=7) WARNING 11-25 01:50:00 [api_server.py:1] slow"
    assert line_level(vllm_line, info) == warning
    assert line_level("INFO:     127.0.0.1:5 - GET /health 200", error) == info
    assert line_level("Traceback (most recent call last):", info) == error
    assert line_level('  File "x.py", line 1, in <module>', error) == error
    assert line_level("x" * 70 + " ERROR in the message text", info) == info


def test_bad_arguments_are_refused_by_the_parser():
    result = subprocess.run(
        [sys.executable, "-m", "splitwise_local", "--connector", "nixl"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "invalid choice: 'nixl'" in result.stderr


def test_first_exception_finds_the_root_cause_not_prose(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text(
        "(APIServer pid=1) WARNING 11-25 [system_utils.py:255] fd limit errors like "
        "`OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n\n"
        "(Worker pid=2) ERROR 11-25 [multiproc_executor.py:1063] Traceback (most recent call):\n"
        "(Worker pid=2) ERROR 11-25 [multiproc_executor.py:1063] ModuleNotFoundError: No module "
        "named 'splitwise_local.serde'\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert first_exception(log) == "ModuleNotFoundError: No module named 'splitwise_local.serde'"
    log.write_text("RuntimeError: fake\n")
    assert first_exception(log) == "RuntimeError: fake"
    assert first_exception(tmp_path / "missing.log") is None
