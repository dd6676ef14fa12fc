"""Imports the module behind a subcommand only when it is chosen.

The top-level command line (cli.py) and `bench` (one module per benchmark) both list more
subcommands than one run needs; importing only the chosen one keeps `--help` instant, and a
subcommand whose module does not exist yet says so plainly instead of failing with a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def load_subcommand(module_name: str) -> ModuleType | None:
    """Imports a subcommand module, or returns None if that module does not exist yet."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
