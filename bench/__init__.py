"""Benchmarks. Each script runs its comparison side by side in one run and prints the table it adds to BENCHMARKS.md."""
