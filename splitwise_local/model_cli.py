"""`python -m splitwise_local model ...`: prepare the embedded model and print its folder."""

from __future__ import annotations

import argparse
import sys

from splitwise_local.model import ModelError, check_model_dir, prepare_default_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("prepare", help="convert the embedded SmolLM2 once; print its folder")
    check = actions.add_parser("check", help="check that a folder is a servable checkpoint")
    check.add_argument("folder")


def run(args: argparse.Namespace) -> int:
    try:
        folder = check_model_dir(args.folder) if args.action == "check" else prepare_default_model()
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0
