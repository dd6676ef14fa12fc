"""The Splitwise experiment: every system on the same cores and requests (experiment.py), and
its report, written from the run folder (experiment_report.py)."""
