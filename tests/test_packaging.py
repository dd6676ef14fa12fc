"""requirements.txt stays in step with pyproject.toml's dependencies."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def names(lines) -> set[str]:
    return {re.split(r"[<>=\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines}


def test_requirements_list_every_runtime_and_test_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = names(project["dependencies"]) | names(project["optional-dependencies"]["test"])
    lines = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert names(lines) == declared
