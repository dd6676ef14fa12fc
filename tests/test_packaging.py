"""requirements.txt (what setup installs) stays in step with pyproject.toml's dependency groups,
and the library's own dependencies stay free of what only the benchmarks use."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA = re.compile(r"#\s*extra:\s*(\w+)")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_groups(text: str) -> dict[str, list[str]]:
    """requirements.txt's lines per group: "" for the library's, then one per `# extra: NAME`."""
    groups: dict[str, list[str]] = {"": []}
    group = ""
    for line in text.splitlines():
        if found := EXTRA.match(line):
            group = found[1]
            groups[group] = []
        elif line.strip() and not line.startswith("#"):
            groups[group].append(line.strip())
    return groups


def test_requirements_mirror_every_dependency_group():
    declared = {"": project()["dependencies"], **project()["optional-dependencies"]}
    assert requirement_groups((ROOT / "requirements.txt").read_text()) == declared


def test_the_library_does_not_depend_on_what_only_the_benchmarks_use():
    names = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in project()["dependencies"]}
    assert not names & {"matplotlib", "nixl"}
