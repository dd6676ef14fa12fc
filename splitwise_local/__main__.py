"""Entry point: `python -m splitwise_local [subcommand] ...`; parsing lives in cli.py."""

import sys

from splitwise_local.cli import main

if __name__ == "__main__":
    sys.exit(main())
