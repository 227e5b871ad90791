"""Ratio benchmarks (`make bench`): each bench_*.py module's main() measures and prints a table."""
