"""The test harness: the one way to start a system (store, engines, the launcher) that the
tests, the benchmarks and the experiment share, and the fakes that stand in for its parts."""
