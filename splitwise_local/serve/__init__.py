"""Serving one host: the launcher, its supervisor and child processes, and each component's
command line (store, engines, Mooncake's master). Above every component package; none of them
imports from here. README.md gives the reading order."""
