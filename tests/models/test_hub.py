"""`--model` takes what vLLM takes: a folder, a Hugging Face id, or a short name the project
knows, found in the Hugging Face cache without network, downloaded when the Hub answers, and
otherwise one line saying what to run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir

from tests.models.conftest import (
    SMOLLM2_ID,
    TINY_ID,
    get_model,
    hub_env,
)
from tests.terminal import run_on_a_terminal


def snapshot_of(cache: Path, repo_id: str) -> Path:
    """The snapshot folder huggingface_hub's scanner reports for the repo's main ref."""
    (repo,) = [repo for repo in scan_cache_dir(cache).repos if repo.repo_id == repo_id]
    (revision,) = [rev for rev in repo.revisions if "main" in rev.refs]
    return revision.snapshot_path


def same_files(folder: Path, source: Path) -> bool:
    names = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) and all(
        (folder / name).read_bytes() == (source / name).read_bytes() for name in names
    )


def test_downloads_land_in_the_cache_as_huggingface_hub_lays_it_out(hub_cache):
    for repo_id, source in hub_cache.sources.items():
        folder = snapshot_of(hub_cache.cache, repo_id)
        assert folder.parent.parent.name == "models--" + repo_id.replace("/", "--")
        assert (folder.parent.parent / "refs" / "main").read_text() == folder.name
        assert (folder / "config.json").is_symlink()  # into ../../blobs, deduplicated
        assert same_files(folder, source)


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [
        (SMOLLM2_ID, SMOLLM2_ID),
        ("SmolLM2-135M-Instruct", SMOLLM2_ID),  # a short name the project knows
        (TINY_ID, TINY_ID),
    ],
)
@pytest.mark.parametrize("where", ["HF_HOME", "HF_HUB_CACHE"])
def test_cached_models_resolve_without_network(hub_cache, name, repo_id, where):
    """The Hub is unreachable (connection refused): the cache alone answers."""
    env = hub_env(hub_cache.home)
    if where == "HF_HUB_CACHE":
        env["HF_HOME"] = str(hub_cache.home / "elsewhere")
        env["HF_HUB_CACHE"] = str(hub_cache.cache)
    result = get_model(name, env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot_of(hub_cache.cache, repo_id)
    assert result.stderr == ""  # nothing downloaded, nothing said


def test_a_folder_is_still_a_folder(hub_cache, tmp_path):
    folder = snapshot_of(hub_cache.cache, TINY_ID)
    result = get_model(str(folder), hub_env(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == folder


@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize(
    "command",
    [
        [],  # the launcher: `python -m splitwise_local --model DeepSeek-V2-Lite`
        ["engine", "--role", "plain"],
    ],
)
def test_offline_and_not_cached_is_one_line_that_says_what_to_run(tmp_path, how, command):
    env = hub_env(tmp_path / "empty-home")
    if how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "splitwise_local", *command, "--model", "DeepSeek-V2-Lite"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert "hf download deepseek-ai/DeepSeek-V2-Lite`" in line
    assert str(tmp_path / "empty-home" / "hub") in line  # the cache it looked in
    assert "--model /path/to/checkpoint-folder" in line


def test_an_unknown_id_on_a_reachable_hub_is_named(fake_hub_url, tmp_path):
    result = get_model("nobody/no-such-model", hub_env(tmp_path, fake_hub_url), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: nobody/no-such-model is not a model on the Hugging Face Hub "
        "(a private one needs HF_TOKEN)"
    )


def test_a_name_that_is_neither_is_one_line(tmp_path):
    result = get_model("no-such-name", hub_env(tmp_path), timeout=60)
    assert result.returncode == 1
    assert "neither a Hugging Face id like org/name nor a known name" in result.stderr
    assert "DeepSeek-V2-Lite" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_download_shows_progress_on_a_terminal_and_not_in_a_log(fake_hub_url, tmp_path):
    command = [sys.executable, "-m", "splitwise_local", "model", "get", TINY_ID]
    code, terminal = run_on_a_terminal(command, hub_env(tmp_path / "tty", fake_hub_url))
    assert code == 0, terminal
    assert "downloading splitwise-local/tiny-deepseek-v2 (" in terminal
    assert "100%|" in terminal  # a bar was drawn
    logged = get_model(TINY_ID, hub_env(tmp_path / "log", fake_hub_url), timeout=300)
    assert logged.returncode == 0, logged.stderr
    assert "%|" not in logged.stderr and "\r" not in logged.stderr
    assert logged.stderr.startswith("downloading splitwise-local/tiny-deepseek-v2 (")
