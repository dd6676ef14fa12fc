"""`python -m splitwise_bench.experiment`: the whole experiment, then its report."""

import sys

from splitwise_bench.experiment.experiment import main

sys.exit(main())
