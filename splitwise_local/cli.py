"""Parses the subcommand and hands over to the module that implements it.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Only the chosen one is imported, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Subcommand(NamedTuple):
    module: str
    help: str


# The library's own; `subcommands()` adds `bench`.
SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand("splitwise_local.serve.launcher", "run store, engines and proxy (default)"),
    "store": Subcommand("splitwise_local.store.server", "run the KV store server"),
    "proxy": Subcommand("splitwise_local.proxy.server", "run the OpenAI-compatible proxy"),
    "engine": Subcommand(
        "splitwise_local.serve.engine", "run one vLLM engine with our KV connector"
    ),
    "model": Subcommand("splitwise_local.models.cli", "prepare the embedded model"),
}
DEFAULT_SUBCOMMAND = "serve"


def subcommands() -> dict[str, Subcommand]:
    """Every subcommand: the library's and `bench`, which hands over to `splitwise_bench`.

    Imported late: the benchmarks are a package apart from the library, their heavy
    dependencies (matplotlib, nixl) an optional extra, and serving never needs them.
    """
    from splitwise_bench import BENCHMARKS

    bench = Subcommand("splitwise_bench", f"benchmarks: {', '.join(BENCHMARKS)}")
    return SUBCOMMANDS | {"bench": bench}


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits off everything after a bare `--`: extra arguments passed through to vLLM."""
    argv = list(argv)
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    if not own or (own[0].startswith("-") and own[0] not in ("-h", "--help")):
        own.insert(0, DEFAULT_SUBCOMMAND)
    parser = argparse.ArgumentParser(
        prog="python -m splitwise_local",
        description="Disaggregated prefill/decode serving on one host.",
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    module = None
    for name, sub in subcommands().items():
        subparser = subparsers.add_parser(name, help=sub.help, description=sub.help)
        if name == own[0]:
            module = importlib.import_module(sub.module)
            module.add_arguments(subparser)
    args = parser.parse_args(own)  # exits for --help and for an unknown subcommand
    assert module is not None
    args.extra = extra
    return int(module.run(args) or 0)
