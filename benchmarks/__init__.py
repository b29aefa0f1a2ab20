"""loopserve.benchmarks."""
