"""Data sets with exact scores, for verifying samplers in tests and benchmarks."""
