"""`python -m splitwise_local model ...`: prepare, fetch or check a model; print its folder."""

from __future__ import annotations

import argparse
import sys

from splitwise_local.models.checkpoint import ModelError, check_model_dir, prepare_default_model
from splitwise_local.models.hub import resolve_model
from splitwise_local.models.tiny_deepseek import prepare_tiny_deepseek


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("prepare", help="convert the embedded SmolLM2 once; print its folder")
    actions.add_parser(
        "tiny-deepseek-v2",
        help="build a random-weight DeepSeek-V2 (MLA, MoE) once; print its folder",
    )
    get = actions.add_parser(
        "get",
        help="find a model as --model does (folder, Hugging Face id, short name), from the "
        "Hugging Face cache or downloaded; print its folder",
    )
    get.add_argument("model")
    check = actions.add_parser("check", help="check that a folder is a servable checkpoint")
    check.add_argument("folder")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "check":
            folder = check_model_dir(args.folder)
        elif args.action == "get":
            folder = resolve_model(args.model).folder
        elif args.action == "tiny-deepseek-v2":
            folder = prepare_tiny_deepseek()
        else:
            folder = prepare_default_model()
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0
