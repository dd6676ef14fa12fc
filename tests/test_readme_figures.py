"""Every figure in the README's goals table comes from a committed benchmark JSON.

The table's last column names the JSON files a row's figures come from (paths in backticks).
Each number in the row's "measured" cell must be a value of one of those files (as a number
shown at its printed precision: seconds shown as ms, fractions shown as %, are the same value),
and each file records the command that wrote it, the commit and the machine; a file from before
that was recorded must be labelled in the row with the commit it came from. A goal no committed run
measured stays in the table with no figure, no JSON and the verdict "not measured".

Outside the table (the README's prose and docs/*.md), each JSON a paragraph cites is committed,
and one that records no command and commit is labelled in that paragraph with a commit that
holds it.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TABLE_HEADING = "**Every goal, measured**"
# A figure may end in "x" (3.4x); a digit inside a name (1P1D, avx512) is not a figure.
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?!\.\d)(?!x\w)(?![^\Wx])")
SOURCE = re.compile(r"`(docs/benchmarks/[^`]+\.json)`")
# In prose a path may sit inside a longer code span (a command) or wrap onto its own line.
CITED = re.compile(r"docs/benchmarks/[\w./-]+\.json")
COMMIT = re.compile(r"commit\s+([0-9a-f]{7,40})")
RECORDED = {"command", "commit", "machine"}  # what a JSON records of the run that wrote it
SCALES = (1.0, 1e3, 1e-3, 100.0, 1e6, 1e-6, 1 / 1024**2, 1 / 1024**3, 1e-9)


def goal_rows() -> list[dict[str, str]]:
    """The goals table's rows, as lists of cells (header and rule left out)."""
    text = README.read_text()
    start = text.index(TABLE_HEADING)
    rows, seen_table = [], False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            seen_table = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif seen_table:
            break
    header, rule, *body = rows
    assert "measured" in header and "source" in header[-1], header
    assert set(rule[0]) <= {"-", ":", " "}
    return [dict(zip(header, row, strict=True)) for row in body]


def leaves(value: object) -> Iterator[float]:
    """Every number in a JSON document, however deep."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)


def shown(number: float, decimals: int) -> float:
    return round(number, decimals)


def found(figure: str, decimals: int, values: list[float]) -> bool:
    """Whether `figure` (as printed, with `decimals` places) is one of `values` in some unit;
    an integer figure may also be a value rounded to a whole number (e.g. "1,980 ms")."""
    target = float(figure.replace(",", ""))
    for value in values:
        for scale in SCALES:
            if shown(value * scale, decimals) == target:
                return True
            if decimals == 0 and abs(value * scale - target) < 0.5 + 1e-9:
                return True
            # Ratios are printed either way round (0.25 or 4x).
            if value and shown(scale / value, decimals) == target:
                return True
    return False


def figures(cell: str) -> Iterator[tuple[str, int]]:
    for match in NUMBER.finditer(cell):
        yield match.group(0), len(match.group(2) or "")


ROWS = goal_rows()


def committed(path: str) -> dict[str, Any]:
    """The JSON at `path`, which must be committed (a figure from an uncommitted run counts
    for nothing)."""
    tracked = ["git", "ls-files", "--error-unmatch", path]
    assert subprocess.run(tracked, cwd=REPO, capture_output=True).returncode == 0, (
        f"{path} is not committed"
    )
    document: dict[str, Any] = json.loads((REPO / path).read_text())
    return document


def prose_paragraphs() -> Iterator[tuple[str, str]]:
    """(file, paragraph) for the README outside its tables and for docs/*.md; reports beside
    their JSON (docs/benchmarks/*.md) are written by the benchmarks themselves."""
    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for paragraph in re.split(r"\n\s*\n", path.read_text()):
            lines = paragraph.strip().splitlines()
            if lines and not all(line.startswith("|") for line in lines):
                yield path.name, paragraph


def unlabelled(paragraph: str) -> list[str]:
    """The JSONs `paragraph` cites that record no command and commit and that no commit label
    in it (a commit holding that file) accounts for."""
    missing = []
    for path in sorted(set(CITED.findall(paragraph))):
        if set(committed(path)) >= RECORDED:
            continue
        labels = COMMIT.findall(paragraph)
        holds = [["git", "cat-file", "-e", f"{label}:{path}"] for label in labels]
        if not any(
            subprocess.run(git, cwd=REPO, capture_output=True).returncode == 0 for git in holds
        ):
            missing.append(path)
    return missing


def test_each_json_cited_in_prose_is_committed_and_labelled_when_it_records_no_commit():
    cited = [(name, p) for name, p in prose_paragraphs() if CITED.search(p)]
    assert len(cited) >= 15, "the README and docs cite their runs"
    problems = [(name, path, p[:80]) for name, p in cited for path in unlabelled(p)]
    assert not problems, problems


def test_a_citation_without_its_commit_label_is_found():
    labelled = "0.033 (`docs/benchmarks/connector-cpu-naive.json`, commit 3a0074f)."
    assert unlabelled(labelled) == []
    assert unlabelled(labelled.replace(", commit 3a0074f", "")) == [
        "docs/benchmarks/connector-cpu-naive.json"
    ]
    # A label must name a commit that holds the file, not any commit.
    assert unlabelled(labelled.replace("3a0074f", "3a02dc7")) == [
        "docs/benchmarks/connector-cpu-naive.json"
    ]
    recorded = "+6 ms (`docs/benchmarks/save-stall-cpu.json`)"
    assert unlabelled(recorded) == []


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["goal"][:60])
def test_each_goal_figure_is_in_the_json_it_cites(row):
    cited = SOURCE.findall(row[list(row)[-1]])
    shown_figures = list(figures(row["measured"]))
    if not cited:
        assert not shown_figures and "not measured" in row["verdict"], (
            f"no JSON cited for {row['goal']!r}: every figure needs a committed run"
        )
        return
    values: list[float] = []
    for path in cited:
        document = committed(path)
        if not set(document) >= RECORDED:
            label = COMMIT.search(row[list(row)[-1]])
            assert label, f"{path} records no command and commit: label the row with its commit"
            git = ["git", "cat-file", "-e", f"{label.group(1)}^{{commit}}"]
            assert subprocess.run(git, cwd=REPO).returncode == 0, label.group(1)
        values.extend(leaves(document))
    missing = [f for f, d in shown_figures if not found(f, d, values)]
    assert not missing, f"{missing} of {row['measured']!r} not in {cited}"


def test_the_checker_finds_a_figure_that_is_not_there():
    values = [0.785, 2.54, 434.0]
    assert found("0.785", 3, values) and found("2,540", 0, values) and found("434", 0, values)
    assert found("78.5", 1, values)  # a fraction shown as a percentage
    assert not found("0.9", 1, values) and not found("436", 0, values)


def test_figures_are_read_whole():
    cell = "6,944 / 1,140 ms = 6.1x (1P1D: 0.15x), kivi 1.18–1.77 GB/s, 68%"
    assert list(figures(cell)) == [
        ("6,944", 0),
        ("1,140", 0),
        ("6.1", 1),
        ("0.15", 2),
        ("1.18", 2),
        ("1.77", 2),
        ("68", 0),
    ]
