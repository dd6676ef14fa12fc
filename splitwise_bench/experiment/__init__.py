"""The Splitwise experiment on public traces: colocated, dp, 1P1D and auto on the same cores.

goals.yaml fixes the SLO families, the goals and how much is sent (plan.py reads it); run.py
starts each system (systems.py) and replays the traces against it with `bench serve`, reading
the engines' counters meanwhile (timeline.py); the report (report.py, plots.py) is written from
the run folder alone, through analysis.py (the numbers) and verdicts.py (the goals).
"""
