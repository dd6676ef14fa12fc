"""`--model` as vLLM takes it: a checkpoint folder, a Hugging Face model id, or a short name.

vLLM's `--model` accepts a folder or a Hub id and finds the id in the local Hugging Face cache
(`HF_HOME` / `HF_HUB_CACHE`) before it goes to the network. The launcher and `engine` take the
same, plus the short names this project documents (`DeepSeek-V2-Lite`). Ids are resolved with
huggingface_hub itself: the cache first, without network; a download with a progress bar when
the Hub answers; otherwise one line saying what to run. The engines are then given the snapshot
folder, so they never reach for the network themselves (they run with `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitwise_local.models.checkpoint import ModelError, check_model_dir, prepare_default_model
from splitwise_local.models.tiny_deepseek import NAME as TINY_DEEPSEEK
from splitwise_local.models.tiny_deepseek import prepare_tiny_deepseek

# Short names the README uses, and the Hub ids they stand for.
SHORT_NAMES: dict[str, str] = {
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "DeepSeek-V2-Lite": "deepseek-ai/DeepSeek-V2-Lite",
    "DeepSeek-V2-Lite-Chat": "deepseek-ai/DeepSeek-V2-Lite-Chat",
}
# Names of checkpoints this project builds itself (never downloaded).
BUILT_HERE: dict[str, Callable[[], Path]] = {TINY_DEEPSEEK: prepare_tiny_deepseek}
# Files vLLM never reads from a model repo: other runtimes' weights and the originals some
# repos keep beside the converted checkpoint.
SKIPPED_FILES = ["*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot", "original/*", "onnx/*"]


@dataclass(frozen=True)
class Model:
    """A servable checkpoint folder, and the name clients ask for it by."""

    folder: Path
    name: str


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def resolve_model(spec: str | None, say: Callable[[str], None] = _stderr) -> Model:
    """The checkpoint `spec` names: None is the embedded default; then, as in vLLM, an existing
    folder wins over an id. Raises ModelError with one line for the user. `say` reports a
    download before it starts."""
    if spec is None:
        folder = prepare_default_model()
        return Model(folder, folder.name)
    path = Path(spec).expanduser()
    if path.exists():
        folder = check_model_dir(path)
        return Model(folder, folder.name)
    if spec in BUILT_HERE:
        return Model(BUILT_HERE[spec](), spec)
    repo_id = SHORT_NAMES.get(spec, spec)
    if not is_repo_id(repo_id):
        known = ", ".join([*SHORT_NAMES, *BUILT_HERE])
        raise ModelError(
            f"model folder not found: {path} (and {spec!r} is neither a Hugging Face id like "
            f"org/name nor a known name: {known})"
        )
    return Model(check_model_dir(hub_snapshot(repo_id, spec, say)), spec)


def is_repo_id(text: str) -> bool:
    """`org/name` with the characters the Hub allows (a path like ./x or /a/b is not one)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def cache_dir() -> Path:
    """Where huggingface_hub keeps models: `HF_HUB_CACHE`, else `$HF_HOME/hub`."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of the repo's main revision, complete, or None; never networks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, local_files_only=True, ignore_patterns=SKIPPED_FILES)
        )
    except LocalEntryNotFoundError:
        return None


def fetch_command(repo_id: str) -> str:
    """The command a user runs to put `repo_id` into this cache: huggingface_hub's `hf` CLI,
    by the path beside this interpreter (`.venv/bin/hf`) when it is not on PATH."""
    beside = Path(sys.executable).with_name("hf")
    hf = "hf"
    if not shutil.which("hf") and beside.is_file():
        hf = os.path.relpath(beside) if beside.is_relative_to(Path.cwd()) else str(beside)
    return f"{hf} download {repo_id}"


def hub_snapshot(repo_id: str, spec: str, say: Callable[[str], None]) -> Path:
    """The repo's snapshot folder: from the cache, else downloaded into it (after a dry run,
    which finds out without downloading whether the Hub answers and how much there is)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import DryRunError, GatedRepoError, RepositoryNotFoundError

    from splitwise_local.progress import Progress

    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    named = spec if spec == repo_id else f"{spec} ({repo_id})"
    offline = (
        f"{named} is not in the Hugging Face cache ({cache_dir()}) and the Hub cannot be reached"
        f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}: fetch it with "
        f"`{fetch_command(repo_id)}` where the Hub is reachable, into this cache (HF_HUB_CACHE), "
        "or pass --model /path/to/checkpoint-folder"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelError(offline)
    try:
        plan = snapshot_download(
            repo_id, ignore_patterns=SKIPPED_FILES, dry_run=True, tqdm_class=Progress
        )
    except DryRunError as exc:  # the real cause is chained: offline, missing, gated, Hub down
        if isinstance(exc.__cause__, GatedRepoError):
            raise ModelError(
                f"{repo_id} is gated on the Hugging Face Hub: accept its terms there, set HF_TOKEN"
            ) from None
        if isinstance(exc.__cause__, RepositoryNotFoundError):
            raise ModelError(
                f"{repo_id} is not a model on the Hugging Face Hub (a private one needs HF_TOKEN)"
            ) from None
        raise ModelError(offline) from None
    size = sum(entry.file_size or 0 for entry in plan if entry.will_download)
    say(
        f"downloading {repo_id} ({len(plan)} files, {size / 1e9:.2f} GB) from the Hugging Face "
        f"Hub into {cache_dir()}"
    )
    return Path(snapshot_download(repo_id, ignore_patterns=SKIPPED_FILES, tqdm_class=Progress))
